//! `$BERTH_HOSTFILE` for Slurm jobs: the job's nodes, one line per slot (the form of
//! Torque's `PBS_NODEFILE`, which Open MPI's `-hostfile` and MPICH's `-f` both read),
//! written inside the job's container on each node at [`PATH`]. Nodes come from
//! `SLURM_JOB_NODELIST` and slots from `SLURM_JOB_CPUS_PER_NODE`: the allocation's, the
//! same in every step of the job, so any task may (re)write it. The MPIs still launch
//! through `srun` inside a Slurm job; the hostfile only chooses nodes and slots.
//!
//! Owns the hostlist and count syntax and the file's text; writes only that file, and
//! only through `container::inroot`.

use berth_engine::container::inroot;
use std::os::fd::AsFd;
use std::path::Path;

/// Where the hostfile is inside a Slurm job's container.
pub const PATH: &str = "/.berth/slurm/hostfile";

/// The most node names a hostlist expands to: six times the nodes of the largest
/// machine (Fugaku, 158,976). The lists come from the job's environment
/// (`SLURM_JOB_NODELIST`, `SLURM_JOB_CPUS_PER_NODE`), the user's data as far as this
/// plugin can tell, and root expands them: `r[1-100000]n[1-100000]` must stop here.
const MAX_NODES: usize = 1 << 20;

/// Expands a Slurm hostlist (`node[1-3,7],gpu[01-02]-a,login`) into names, in order.
pub fn expand_hostlist(list: &str) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    for item in split_top_level(list) {
        expand_item(item, &mut names).map_err(|why| format!("bad hostlist '{list}': {why}"))?;
    }
    Ok(names)
}

/// Splits at commas outside brackets.
fn split_top_level(list: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&list[start..]);
    parts.into_iter().map(str::trim).filter(|p| !p.is_empty()).collect()
}

/// One item: a prefix, then bracketed ranges and more text, possibly several times.
fn expand_item(item: &str, out: &mut Vec<String>) -> Result<(), String> {
    let Some(open) = item.find('[') else {
        out.push(item.to_string());
        return Ok(());
    };
    let close = item[open..].find(']').map(|i| open + i).ok_or("unclosed '['")?;
    let (prefix, ranges, rest) = (&item[..open], &item[open + 1..close], &item[close + 1..]);
    let mut tails = Vec::new();
    expand_item(rest, &mut tails)?;
    for range in ranges.split(',') {
        let (lo, hi) = range.split_once('-').unwrap_or((range, range));
        let width = lo.len();
        let lo: u64 = lo.parse().map_err(|_| format!("bad range '{range}'"))?;
        let hi: u64 = hi.parse().map_err(|_| format!("bad range '{range}'"))?;
        if hi < lo || hi - lo > 100_000 {
            return Err(format!("bad range '{range}'"));
        }
        for n in lo..=hi {
            if out.len().saturating_add(tails.len()) > MAX_NODES {
                return Err(format!("more than {MAX_NODES} nodes"));
            }
            for tail in &tails {
                out.push(format!("{prefix}{n:0width$}{tail}"));
            }
        }
    }
    Ok(())
}

/// Expands Slurm's per-node counts (`SLURM_JOB_CPUS_PER_NODE`, `SLURM_TASKS_PER_NODE`):
/// `2(x3),1` is 2, 2, 2, 1.
pub fn expand_counts(counts: &str) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for part in counts.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("bad per-node counts '{counts}'");
        let (count, times) = match part.split_once("(x") {
            Some((count, times)) => (count, times.strip_suffix(')').ok_or_else(bad)?.parse::<usize>().map_err(|_| bad())?),
            None => (part, 1),
        };
        let count: u32 = count.parse().map_err(|_| bad())?;
        if out.len().saturating_add(times) > MAX_NODES {
            return Err(format!("bad per-node counts '{counts}': more than {MAX_NODES} nodes"));
        }
        out.extend(std::iter::repeat_n(count, times));
    }
    Ok(out)
}

/// The hostfile's text: each node once per slot, in allocation order; counts above the
/// engine's caps (`files::check_slots`) are refused before anything is expanded.
pub fn text(nodes: &[String], slots: &[u32]) -> Result<String, String> {
    use berth_engine::wiring::files;
    if nodes.len() != slots.len() {
        return Err(format!("{} nodes but {} per-node counts", nodes.len(), slots.len()));
    }
    let slots = files::check_slots(nodes.iter().map(String::as_str).zip(slots.iter().map(|&s| u64::from(s))))?;
    Ok(files::hostfile_of(nodes.iter().map(String::as_str).zip(slots)))
}

/// Writes the hostfile at [`PATH`]; call inside the container (after `join`, as root).
/// Through the engine's `inroot`: never through a symlink or onto a mount of the image's
/// choosing, and a temp file renamed into place, so tasks writing at once never show a
/// partial file.
pub fn write(text: &str) -> Result<(), inroot::InRootError> {
    let root = inroot::current_root()?;
    inroot::replace(root.as_fd(), Path::new(PATH), text, 0o644)
}

/// Whether the hostfile is already there (a regular file, reached without symlinks).
pub fn exists() -> bool {
    inroot::current_root().is_ok_and(|root| inroot::is_file(root.as_fd(), Path::new(PATH)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostlists_expand_like_slurms() {
        assert_eq!(expand_hostlist("node1").unwrap(), ["node1"]);
        assert_eq!(expand_hostlist("node[1-3,7]").unwrap(), ["node1", "node2", "node3", "node7"]);
        assert_eq!(expand_hostlist("gpu[08-10]-a,login").unwrap(), ["gpu08-a", "gpu09-a", "gpu10-a", "login"]);
        assert_eq!(expand_hostlist("r[1-2]n[1-2]").unwrap(), ["r1n1", "r1n2", "r2n1", "r2n2"]);
        assert!(expand_hostlist("node[1-").unwrap_err().contains("node[1-"));
        assert!(expand_hostlist("node[3-1]").is_err());
    }

    #[test]
    fn per_node_counts_expand_their_repeats() {
        assert_eq!(expand_counts("2(x3),1").unwrap(), [2, 2, 2, 1]);
        assert_eq!(expand_counts("4").unwrap(), [4]);
        assert!(expand_counts("2(x").is_err());
    }

    #[test]
    fn the_hostfile_has_a_line_per_slot_in_node_order() {
        let nodes = expand_hostlist("node[1-2]").unwrap();
        assert_eq!(text(&nodes, &expand_counts("2(x2)").unwrap()).unwrap(), "node1\nnode1\nnode2\nnode2\n");
        assert!(text(&nodes, &[1]).is_err());
    }

    #[test]
    fn forged_lists_and_counts_stop_at_the_caps_before_they_are_expanded() {
        assert!(expand_hostlist("r[1-100000]n[1-100000]").unwrap_err().contains("more than 1048576 nodes"));
        assert!(expand_counts("1(x4000000000)").unwrap_err().contains("more than 1048576 nodes"));
        let nodes = expand_hostlist("node[1-2]").unwrap();
        let absurd = text(&nodes, &expand_counts("2000000000(x2)").unwrap()).unwrap_err();
        assert!(absurd.starts_with("node 'node1' would get 2000000000 slots"), "{absurd}");
    }
}
