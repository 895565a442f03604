//! Torque's qsub submit filter (`SUBMITFILTER` in `torque.cfg`): lets users write
//! `#PBS -l container=IMAGE` (and every other berth item the same way) although
//! Torque knows no `container` resource. qsub runs the filter as the submitting user
//! with the job script on stdin and qsub's own arguments as argv, and submits what the
//! filter prints; a non-zero exit refuses the submission (Torque 6.1.3,
//! src/cmds/qsub_functions.c).
//!
//! The filter rewrites the berth items of the script's `-l` directives into the one
//! `other=` resource the hooks read (`request.rs`), merged with an `other=` the user
//! wrote, and leaves every other byte of the script as it was. qsub reads directives
//! only before the first command line of the script (`isexecutable`), so the filter
//! does too. qsub gives the filter no way to change its command line, and the command
//! line's resources win over the script's, so berth items (or an `other=`) on the
//! command line together with berth items in the script fail with a line that says what
//! to write instead. Owns rewriting text; never reads the node or the job's files.

use crate::request;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("qsub -l {item}: Torque has no such resource; write `#PBS -l {item}` in the job script (berth's submit filter turns it into -l other=...), or `-l other={item}` on the command line")]
    CommandLineItem { item: String },
    #[error("-l other={other} on the qsub command line would replace the berth items of the script's #PBS lines; move it into the script as `#PBS -l other={other}`")]
    CommandLineOther { other: String },
    #[error("line {line} of the job script: {why}")]
    Directive { line: usize, why: String },
    #[error("{how}: a job root directory is refused on this cluster (pbs_mom would run berth's job starter, as root, inside it); submit without it")]
    RootDir { how: String },
}

/// qsub's options (`GETOPT_ARGS`, src/cmds/qsub_functions.c): a letter followed by
/// `:` takes a value.
const QSUB_OPTIONS: &str = "a:A:b:c:C:d:D:e:EfF:hi:Ij:J:k:K:l:L:m:M:nN:o:p:P:q:r:S:t:T:u:v:Vw:W:Xxz-:";

/// The options among `words` as getopt reads them: (letter, value).
fn options(words: &[String]) -> Vec<(char, Option<String>)> {
    let mut out = Vec::new();
    let mut words = words.iter();
    while let Some(word) = words.next() {
        let Some(flags) = word.strip_prefix('-').filter(|f| !f.is_empty()) else { continue };
        let chars = flags.char_indices();
        for (at, letter) in chars {
            let takes_value = QSUB_OPTIONS.find(letter).is_some_and(|i| QSUB_OPTIONS[i + letter.len_utf8()..].starts_with(':'));
            if !takes_value {
                out.push((letter, None));
                continue;
            }
            let rest = &flags[at + letter.len_utf8()..];
            let value = if rest.is_empty() { words.next().cloned() } else { Some(rest.to_string()) };
            out.push((letter, value));
            break;
        }
    }
    out
}

/// A job root directory (`-D DIR`, `PBS_O_ROOTDIR` passed with `-v`, or with `-V` from
/// the submitter's environment) in qsub's arguments or a directive. pbs_mom chroots
/// into it before it execs the job starter, which berth needs run as root, so the
/// program at the starter's path would be the user's. The filter runs as the user and
/// can be bypassed (libtorque's `pbs_submit`): it keeps honest jobs from a silent
/// failure, not attackers out (docs/security.md, open issues).
fn refuse_root_dir(words: &[String], where_: &str, root_dir_env: bool) -> Result<(), FilterError> {
    for (letter, value) in options(words) {
        let how = match (letter, value.as_deref()) {
            ('D', _) => format!("{where_}: -D"),
            ('v', Some(list)) if list.contains("PBS_O_ROOTDIR") => format!("{where_}: -v PBS_O_ROOTDIR"),
            ('V', _) if root_dir_env => format!("{where_}: -V with PBS_O_ROOTDIR set"),
            _ => continue,
        };
        return Err(FilterError::RootDir { how });
    }
    Ok(())
}

/// The script qsub should submit, for a script and qsub's arguments.
pub fn filter(script: &str, args: &[String], prefix_env: Option<&str>, root_dir_env: bool) -> Result<String, FilterError> {
    check_command_line(args)?;
    refuse_root_dir(args, "qsub", root_dir_env)?;
    let prefix = directive_prefix(args, prefix_env);
    let mut out = String::with_capacity(script.len() + 64);
    let mut items: Vec<String> = Vec::new();
    // Where the merged `other=` goes: the first directive line that held a berth item or
    // an `other=`, so it stays among the directives.
    let mut other_at: Option<usize> = None;
    let mut executable = false;
    let mut lines = script.split_inclusive('\n').enumerate().peekable();
    while let Some((index, line)) = lines.next() {
        let directive = if executable || prefix.is_empty() { None } else { line.trim_start().strip_prefix(prefix.as_str()) };
        let Some(rest) = directive else {
            executable = executable || is_executable(line);
            out.push_str(line);
            continue;
        };
        // A directive continued with a trailing backslash is one directive to qsub.
        let mut whole = rest.to_string();
        let mut raw = line.to_string();
        while whole.trim_end_matches('\n').ends_with('\\') {
            let Some((_, next)) = lines.next() else { break };
            whole = format!("{}{}", whole.trim_end_matches('\n').trim_end_matches('\\'), next);
            raw.push_str(next);
        }
        let words = split_words(whole.trim_end_matches(['\n', '\r'])).map_err(|why| FilterError::Directive { line: index + 1, why })?;
        refuse_root_dir(&words, &format!("line {} of the job script", index + 1), root_dir_env)?;
        match rewrite_directive(&words, &mut items) {
            Some(kept) => {
                other_at.get_or_insert(out.len());
                if !kept.is_empty() {
                    let kept: Vec<String> = kept.iter().map(|w| quote(w)).collect();
                    out.push_str(&format!("{prefix} {}\n", kept.join(" ")));
                }
            }
            None => out.push_str(&raw),
        }
    }
    let Some(at) = other_at else { return Ok(out) };
    if items.iter().any(|item| mentions_berth(item)) {
        if let Some(other) = command_line_resources(args).iter().find_map(|r| r.strip_prefix("other=")) {
            return Err(FilterError::CommandLineOther { other: other.to_string() });
        }
    }
    // The site's own `other=` items first: a word after a berth list item
    // (`container-mounts=/a:/b;x`) would read as one more entry of that list.
    let (berth, site): (Vec<String>, Vec<String>) = items.into_iter().partition(|item| mentions_berth(item));
    let merged: Vec<String> = site.into_iter().chain(berth).collect();
    out.insert_str(at, &format!("{prefix} -l other={}\n", quote(&merged.join(";"))));
    Ok(out)
}

/// A word as qsub's `make_argv` reads it back: blanks, quotes and backslashes escaped.
fn quote(word: &str) -> String {
    let mut out = String::with_capacity(word.len());
    for c in word.chars() {
        if c.is_whitespace() || matches!(c, '\'' | '"' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The `-l` resources given on qsub's command line, which the filter cannot rewrite: a
/// berth item there fails the submission even when the script has none.
fn check_command_line(args: &[String]) -> Result<(), FilterError> {
    match command_line_resources(args).into_iter().find(|r| is_berth_item(r)) {
        Some(item) => Err(FilterError::CommandLineItem { item }),
        None => Ok(()),
    }
}

/// A directive's words with its berth items (and any `other=`) taken out into `items`;
/// None when it had none (the line stays as written).
fn rewrite_directive(words: &[String], items: &mut Vec<String>) -> Option<Vec<String>> {
    let mut kept: Vec<String> = Vec::new();
    let mut changed = false;
    let mut words = words.iter();
    while let Some(word) = words.next() {
        let list = match word.strip_prefix("-l") {
            Some("") => match words.next() {
                Some(list) => list.clone(),
                None => {
                    kept.push(word.clone());
                    continue;
                }
            },
            Some(list) => list.to_string(),
            None => {
                kept.push(word.clone());
                continue;
            }
        };
        let mut torque: Vec<String> = Vec::new();
        for resource in split_resources(&list) {
            if let Some(other) = resource.strip_prefix("other=") {
                items.push(other.to_string());
                changed = true;
            } else if is_berth_item(&resource) {
                items.push(resource);
                changed = true;
            } else {
                torque.push(resource);
            }
        }
        if !torque.is_empty() {
            kept.push("-l".into());
            kept.push(torque.join(","));
        }
    }
    changed.then_some(kept)
}

/// Splits a `-l` list at its commas, keeping a berth item's list values together
/// (`container-mounts=/a:/a,/b:/b`): a piece without `=` continues the one before.
fn split_resources(list: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for piece in list.split(',').filter(|p| !p.is_empty()) {
        match out.last_mut() {
            Some(last) if !piece.contains('=') && !is_berth_item(piece) && is_berth_item(last) => {
                last.push(',');
                last.push_str(piece);
            }
            _ => out.push(piece.to_string()),
        }
    }
    out
}

fn is_berth_item(resource: &str) -> bool {
    let name = resource.split_once('=').map_or(resource, |(name, _)| name);
    request::KNOWN.contains(&name.trim())
}

fn mentions_berth(item: &str) -> bool {
    item.split([';', ',']).any(|piece| is_berth_item(piece.trim()))
}

/// The `-l` resources of qsub's own arguments.
fn command_line_resources(args: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let list = match arg.strip_prefix("-l") {
            Some("") => args.next().cloned().unwrap_or_default(),
            Some(list) => list.to_string(),
            None => continue,
        };
        out.extend(split_resources(&list));
    }
    out
}

/// qsub's directive prefix: `-C PREFIX` (qsub passes it to the filter as `\PREFIX`),
/// else `$PBS_DPREFIX`, else `#PBS`. An empty prefix turns directives off.
fn directive_prefix(args: &[String], prefix_env: Option<&str>) -> String {
    let given = args.iter().position(|a| a == "-C").and_then(|i| args.get(i + 1));
    match (given, prefix_env) {
        (Some(p), _) => p.strip_prefix('\\').unwrap_or(p).to_string(),
        (None, Some(p)) => p.to_string(),
        (None, None) => "#PBS".to_string(),
    }
}

/// qsub's `isexecutable`: a line that is not blank, not a comment, not `:` or `#!`.
fn is_executable(line: &str) -> bool {
    if line.starts_with(':') || line.starts_with("#!") {
        return false;
    }
    let trimmed = line.trim_start();
    !trimmed.is_empty() && !trimmed.starts_with('#')
}

/// qsub's `make_argv`: words split at blanks, quotes (single or double) and
/// backslashes taken away.
fn split_words(text: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some(q) if q == c => break,
                        Some(other) => word.push(other),
                        None => return Err(format!("unmatched {c}")),
                    }
                }
            }
            '\\' => {
                in_word = true;
                word.extend(chars.next());
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(script: &str) -> Result<String, FilterError> {
        filter(script, &[], None, false)
    }

    #[test]
    fn container_alone_becomes_other() {
        let script = "#!/bin/bash\n#PBS -l container=registry:5000/mpi:latest\n#PBS -l nodes=2:ppn=2\nmpirun ./app\n";
        assert_eq!(run(script).unwrap(), "#!/bin/bash\n#PBS -l other=container=registry:5000/mpi:latest\n#PBS -l nodes=2:ppn=2\nmpirun ./app\n");
    }

    #[test]
    fn berth_items_leave_a_combined_list_and_merge_with_the_users_other() {
        let script = "#!/bin/sh\n#PBS -N job -l nodes=2:ppn=4,container=mpi:latest,walltime=00:10:00\n\
                      #PBS -l container-mounts=/scratch:/data:ro,/tmp/x\n#PBS -l other=site-thing\n#PBS -l no-container-mount-home\necho hi\n";
        let want = "#!/bin/sh\n#PBS -l other=site-thing;container=mpi:latest;container-mounts=/scratch:/data:ro,/tmp/x;no-container-mount-home\n\
                    #PBS -N job -l nodes=2:ppn=4,walltime=00:10:00\necho hi\n";
        let got = run(script).unwrap();
        assert_eq!(got, want);
        // What the hooks read back from the resource list Torque builds.
        let list = "nodes=2:ppn=4,walltime=00:10:00,other=site-thing;container=mpi:latest;container-mounts=/scratch:/data:ro,/tmp/x;no-container-mount-home";
        let request = request::Request::from_resource_list(list).unwrap().unwrap();
        assert_eq!((request.image.as_str(), request.mounts.len(), request.no_home), ("mpi:latest", 2, true));
    }

    #[test]
    fn scripts_without_berth_items_and_lines_after_the_first_command_stay_as_written() {
        let plain = "#!/bin/sh\n#PBS -l nodes=1\n# a comment\n\necho '#PBS -l container=x'\n#PBS -l container=late\n";
        assert_eq!(run(plain).unwrap(), plain);
        let quoted = "#PBS -N 'a b' -l \"container=x\"\n: ok\n";
        assert_eq!(run(quoted).unwrap(), "#PBS -l other=container=x\n#PBS -N a\\ b\n: ok\n");
    }

    #[test]
    fn a_continued_directive_is_one_directive() {
        // qsub reads the next line into the same directive, as here.
        assert_eq!(run("#PBS -l nodes=1,\\\ncontainer=x\nrun\n").unwrap(), "#PBS -l other=container=x\n#PBS -l nodes=1\nrun\n");
    }

    #[test]
    fn the_command_line_cannot_be_rewritten_so_its_berth_items_fail_with_the_form_to_use() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let err = filter("run\n", &args(&["-l", "nodes=2,container=mpi:latest", "job.sh"]), None, false).unwrap_err().to_string();
        assert!(err.contains("`#PBS -l container=mpi:latest`") && err.contains("-l other=container=mpi:latest"), "{err}");
        assert!(filter("run\n", &args(&["-lnodes=2", "-l", "other=container=x"]), None, false).is_ok(), "the other= form is fine");
        let script = "#PBS -l container=x\nrun\n";
        let err = filter(script, &args(&["-l", "other=site"]), None, false).unwrap_err();
        assert_eq!(err, FilterError::CommandLineOther { other: "site".into() });
    }

    #[test]
    fn the_directive_prefix_follows_qsub() {
        let args = vec!["-C".to_string(), "\\#MY".to_string()];
        assert_eq!(filter("#MY -l container=x\nrun\n", &args, None, false).unwrap(), "#MY -l other=container=x\nrun\n");
        assert_eq!(filter("#PBS -l container=x\n", &[], Some(""), false).unwrap(), "#PBS -l container=x\n");
    }

    #[test]
    fn a_job_root_directory_is_refused_wherever_it_is_written() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let refused = |script: &str, argv: &[&str], env: bool| matches!(filter(script, &args(argv), None, env), Err(FilterError::RootDir { .. }));
        assert!(refused("run\n", &["-D", "/home/a/root", "job.sh"], false));
        assert!(refused("run\n", &["-D/home/a/root"], false));
        assert!(refused("run\n", &["-hD", "/x"], false), "a value-less flag and -D in one word");
        assert!(refused("run\n", &["-v", "A=1,PBS_O_ROOTDIR=/x"], false));
        assert!(refused("run\n", &["-V"], true));
        assert!(refused("#PBS -D /x\nrun\n", &[], false));
        assert!(refused("#PBS -l nodes=1 -v PBS_O_ROOTDIR=/x\nrun\n", &[], false));
        assert!(!refused("run\n", &["-N", "-D", "-V", "job.sh"], false), "-N's value, and -V without the variable");
        assert!(!refused("run\n# -D /x\n#PBS -D /x\n", &[], false), "after the first command, no directive");
        assert!(!refused("#PBS -N myDjob\nrun\n", &[], true));
    }
}
