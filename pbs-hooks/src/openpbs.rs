//! The OpenPBS hook actions (`berth-pbs openpbs EVENT ...`), each run as root by the
//! site hook `berth.py` (docs/admin.md) with the job's fields as arguments:
//!
//! - `check --resource VALUE` (queuejob, on the server): the `container` resource
//!   parses (the same options as Torque's `-l other=`) and names an image reference;
//!   else one line for qsub's stderr.
//! - `begin --job J --user U --uid N --resource VALUE [--nodefile F] [--exec-host H]
//!   [--select S] [--submit-dir D]` (execjob_begin, on every node of the job): Torque's prologue
//!   (`hooks::prologue`): create, then wire with the nodes of the job's nodefile
//!   (a sister has it then), else those of exec_host and schedselect (the mother
//!   superior writes its nodefile after the begin hook), slots always counted as
//!   numbers and capped, never expanded. A failure is
//!   recorded for the launch (`launch::record_failure`) and the hook accepts: a
//!   rejecting begin hook gets the job requeued 21 times, silently, and then held, so
//!   the launch prints the line into the job's error file and fails the job instead.
//! - `end --job J` (execjob_epilogue, execjob_end, execjob_abort): destroy,
//!   idempotent.
//!
//! Owns the translation of OpenPBS's hook fields; never holds container logic.

use crate::entry::Caller;
use crate::hooks::{self, Role};
use crate::request::{Pelog, Request};
use berth_engine::config::Config;
use std::ffi::OsString;

#[derive(Debug, thiserror::Error)]
pub enum OpenPbsError {
    #[error("usage: berth-pbs openpbs check --resource VALUE | begin --job J --user U --uid N --resource VALUE [--nodefile F] [--exec-host H] [--select S] [--submit-dir D] | end --job J")]
    Usage,
    #[error("container={value}: {why}")]
    Bad { value: String, why: String },
    #[error("{0}")]
    Hook(String),
}

/// `--name value` pairs after the event.
fn options(args: &[String]) -> Result<Vec<(&str, &str)>, OpenPbsError> {
    args.chunks(2)
        .map(|pair| match pair {
            [name, value] if name.starts_with("--") => Ok((&name[2..], value.as_str())),
            _ => Err(OpenPbsError::Usage),
        })
        .collect()
}

fn option<'a>(options: &[(&str, &'a str)], name: &str) -> Option<&'a str> {
    options.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

/// The request in the `container` resource's value.
pub fn request(value: &str) -> Result<Request, OpenPbsError> {
    let bad = |why: String| OpenPbsError::Bad { value: value.to_string(), why };
    let request = Request::from_resource_list(&format!("container={value}")).map_err(|e| bad(e.to_string()))?.ok_or_else(|| bad("no image".into()))?;
    berth_engine::reference::Reference::parse(&request.image).map_err(|e| bad(e.to_string()))?;
    Ok(request)
}

/// What OpenPBS writes to `PBS_NODEFILE` (`generate_pbs_nodefile`), counted instead of
/// written out: for each chunk of the job, in exec_host order (`node1/0*2+node2/0`, or
/// exec_host2's `node1:15002/0*2+...`, which MoM hooks see), its host with the
/// `mpiprocs` of that chunk in schedselect (`1:ncpus=2:mpiprocs=2+2:ncpus=1`, a count
/// before the first `:` repeats a chunk; mpiprocs defaults to 1). Lazy: a chunk count
/// or mpiprocs of the user's (`select=2000000000:...`) is never expanded.
pub fn chunk_slots<'a>(exec_host: &'a str, select: &'a str) -> impl Iterator<Item = (String, u64)> + 'a {
    let per_chunk = select.split('+').filter(|s| !s.trim().is_empty()).flat_map(|spec| {
        let mut parts = spec.split(':');
        let first = parts.next().unwrap_or("");
        let (count, mut rest): (u64, Vec<&str>) = match first.parse() {
            Ok(n) => (n, parts.collect()),
            Err(_) => (1, std::iter::once(first).chain(parts).collect()),
        };
        let mpiprocs: u64 = rest.iter_mut().find_map(|r| r.strip_prefix("mpiprocs=")).and_then(|v| v.parse().ok()).unwrap_or(1);
        std::iter::repeat_n(mpiprocs, usize::try_from(count).unwrap_or(usize::MAX))
    });
    let mut per_chunk = per_chunk.fuse();
    exec_host.split('+').filter_map(move |chunk| {
        let mpiprocs = per_chunk.next().unwrap_or(1);
        let host = chunk.split('/').next().unwrap_or("").split(':').next().unwrap_or("").trim();
        (!host.is_empty()).then(|| (host.to_string(), mpiprocs))
    })
}

/// Runs one event; `Ok(())` also when a begin failure was recorded for the launch.
pub fn run(config: &Config, caller: &Caller, args: &[String], start: std::time::Instant) -> Result<(), OpenPbsError> {
    let (event, rest) = args.split_first().ok_or(OpenPbsError::Usage)?;
    let options = options(rest)?;
    let need = |name| option(&options, name).ok_or(OpenPbsError::Usage);
    match event.as_str() {
        "check" => request(need("resource")?).map(|_| ()),
        "begin" => {
            let id = need("job")?;
            let job = &berth_pbs::launch::runtime_job(id);
            let uid: u32 = need("uid")?.parse().map_err(|_| OpenPbsError::Usage)?;
            let pelog = Pelog { job: job.to_string(), user: need("user")?.to_string(), resources: format!("container={}", need("resource")?), script: Default::default() };
            let mut vars: Vec<(OsString, OsString)> = Vec::new();
            let nodefile = option(&options, "nodefile").filter(|f| std::path::Path::new(f).is_file());
            let role = match (nodefile, option(&options, "exec-host")) {
                // A sister has the nodefile before its begin hook runs.
                (Some(file), _) => {
                    vars.push(("PBS_NODEFILE".into(), file.into()));
                    Ok(Role::MotherSuperior)
                }
                // The mother superior writes it only after: the same from the job's fields.
                (None, Some(exec_host)) => hooks::nodes_and_slots(chunk_slots(exec_host, option(&options, "select").unwrap_or("")))
                    .map(|(nodes, slots)| Role::Known(nodes, slots))
                    .map_err(|e| e.to_string()),
                (None, None) => Ok(Role::Sister),
            };
            if let Some(dir) = option(&options, "submit-dir") {
                vars.push(("PBS_O_WORKDIR".into(), dir.into()));
            }
            let caller = caller.with(vars);
            let checked = request(need("resource")?);
            let made = match (checked, role) {
                (Err(e), _) => Err(e.to_string()),
                (Ok(_), Err(why)) => Err(why),
                (Ok(_), Ok(role)) => hooks::prologue(config, &caller, &pelog, role, start).map(|_| ()).map_err(|e| match e {
                    // The budget is Torque's default $prologalarm share; here no such file is set.
                    hooks::HookError::Timeout { action, .. } => format!(
                        "{action}: not done in the time berth gives it within the begin hook's alarm (a first pull of a large image takes longest): ask the admin, or try again once the image is on the nodes"
                    ),
                    e => e.to_string(),
                }),
            };
            if let Err(why) = made {
                let line = format!("berth-pbs begin: job {id} on {}: {why}", hooks::this_host());
                // The hook's log has it too.
                eprintln!("{line}");
                berth_pbs::launch::record_failure(config, job, uid, &line)
                    .map_err(|e| OpenPbsError::Hook(format!("{line}; and cannot record it for the launch: {e}")))?;
            }
            Ok(())
        }
        "end" => hooks::destroy(config, caller, &berth_pbs::launch::runtime_job(need("job")?)).map_err(|e| OpenPbsError::Hook(e.to_string())),
        _ => Err(OpenPbsError::Usage),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodefile_text(exec_host: &str, select: &str) -> String {
        chunk_slots(exec_host, select).map(|(host, n)| format!("{host}\n").repeat(n as usize)).collect()
    }

    #[test]
    fn the_nodefile_follows_exec_host_and_mpiprocs() {
        assert_eq!(nodefile_text("node1/0*2+node2/0*2", "2:ncpus=2"), "node1\nnode2\n");
        assert_eq!(nodefile_text("node1/0*2", "1:ncpus=2:mpiprocs=2"), "node1\nnode1\n");
        assert_eq!(nodefile_text("node2/0+node1/0*3", "ncpus=1+1:ncpus=3:mpiprocs=3"), "node2\nnode1\nnode1\nnode1\n");
        assert_eq!(nodefile_text("node1/0+node1/1", ""), "node1\nnode1\n");
        assert_eq!(nodefile_text("node1:15002/0*2+node2:15002/0*2", "2:ncpus=2:mpiprocs=2"), "node1\nnode1\nnode2\nnode2\n");
        assert_eq!(nodefile_text("", "1:ncpus=1"), "");
    }

    #[test]
    fn huge_chunk_counts_and_mpiprocs_stay_numbers_and_are_refused_with_one_line() {
        let chunks: Vec<(String, u64)> = chunk_slots("node1/0+node2/0", "2000000000:ncpus=1:mpiprocs=2000000000").collect();
        assert_eq!(chunks, [("node1".to_string(), 2_000_000_000), ("node2".to_string(), 2_000_000_000)]);
        let refused = hooks::nodes_and_slots(chunk_slots("node2:15002/0", "1:host=node2:ncpus=1:mpiprocs=1000000")).unwrap_err().to_string();
        assert_eq!(refused, "node 'node2' would get 1000000 slots (MPI ranks, from mpiprocs, ppn or the per-node counts); berth lists at most 65536 on one node: ask for fewer MPI processes per node");
        let (nodes, slots) = hooks::nodes_and_slots(chunk_slots("node1/0*2+node1/1*2", "2:ncpus=2:mpiprocs=2")).unwrap();
        assert_eq!((nodes, slots), (vec!["node1".to_string()], vec![4]));
    }

    #[test]
    fn the_resource_names_one_image_reference() {
        assert_eq!(request("registry:5000/mpi:latest").unwrap().image, "registry:5000/mpi:latest");
        let with = request("registry:5000/mpi:latest;container-mounts=/scratch:/data:ro").unwrap();
        assert_eq!(with.mounts, ["/scratch:/data:ro"]);
        let bad = request("Bad Image!").unwrap_err().to_string();
        assert!(bad.starts_with("container=Bad Image!: "), "{bad}");
        assert!(request("").is_err());
        assert!(request("a;container-pull=sometimes").unwrap_err().to_string().contains("expected missing, always or never"));
    }

    #[test]
    fn options_come_in_pairs() {
        assert!(matches!(options(&["--job".into()]), Err(OpenPbsError::Usage)));
        assert_eq!(options(&["--job".into(), "7.head".into()]).unwrap(), [("job", "7.head")]);
    }
}
