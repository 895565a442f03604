//! The text of the files one job's wiring puts in a container: the ssh client config,
//! known_hosts, authorized_keys, sshd_config, the hostfile, the wrapper MPI launchers
//! run as `ssh`, and the lines added to the container's /etc/passwd, /etc/group and
//! /etc/hosts. Pure functions of their inputs; must never touch a file itself.

use std::net::IpAddr;

/// Where the wiring dir is mounted (read-only) inside the container.
pub const MOUNT_POINT: &str = "/.berth/wiring";

/// A node of the job as the other nodes reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub addr: IpAddr,
    pub slots: u32,
}

/// Paths inside the container.
pub fn path(file: &str) -> String {
    format!("{MOUNT_POINT}/{file}")
}

/// The alias every node's host key is known under (all nodes of a job share it).
pub fn host_alias(job: &str) -> String {
    format!("berth-job-{job}")
}

/// The PBS_NODEFILE form: one line per slot, node names in allocation order.
pub fn hostfile(nodes: &[Node]) -> String {
    hostfile_of(nodes.iter().map(|n| (n.name.as_str(), n.slots)))
}

/// The most slots (ranks) berth lists for one node: eight times the most CPUs a Linux
/// kernel runs on (8,192, x86_64's largest `NR_CPUS`), so every real node fits, even
/// oversubscribed. Slot counts come from what the user asks (`mpiprocs`, `ppn`, Slurm's
/// variables in the job's environment) and the hostfile has a line per slot, written by
/// root on the node (the runtime dir, usually tmpfs): `mpiprocs=2000000000` must stop here.
pub const MAX_SLOTS_PER_NODE: u64 = 65_536;

/// The most slots berth lists for a whole job: twice the ranks of the largest MPI runs
/// (Fugaku's whole machine, 158,976 nodes of 48 cores, 7.6 M ranks), so the hostfile
/// stays below a few hundred MB however many nodes a user's forged list names.
pub const MAX_SLOTS: u64 = 1 << 24;

/// Checks slot counts (per node, in the order given, summed as u64 by the caller)
/// against [`MAX_SLOTS_PER_NODE`] and [`MAX_SLOTS`] before anything is expanded; the
/// counts as the hostfile takes them, or the one line to show.
pub fn check_slots<'a>(nodes: impl IntoIterator<Item = (&'a str, u64)>) -> Result<Vec<u32>, String> {
    let mut total: u64 = 0;
    let mut out = Vec::new();
    for (name, slots) in nodes {
        if slots > MAX_SLOTS_PER_NODE {
            return Err(format!("node '{name}' would get {slots} slots (MPI ranks, from mpiprocs, ppn or the per-node counts); berth lists at most {MAX_SLOTS_PER_NODE} on one node"));
        }
        total += slots;
        if total > MAX_SLOTS {
            return Err(format!("the job's nodes would get more than {MAX_SLOTS} slots (MPI ranks) in all; berth lists no more"));
        }
        out.push(slots as u32);
    }
    Ok(out)
}

/// A hostfile as MPI launchers read it: each node once per slot, in the order given.
/// Also the Slurm plugin's `$BERTH_HOSTFILE`, so both schedulers' files read alike. The
/// counts must have passed [`check_slots`]: the file has a line per slot.
pub fn hostfile_of<'a>(nodes: impl IntoIterator<Item = (&'a str, u32)>) -> String {
    nodes.into_iter().map(|(name, slots)| format!("{name}\n").repeat(slots as usize)).collect()
}

/// The ssh client config (read through `ssh -F`, so no other config interferes):
/// each node name goes to its address and the job's port, checked against the job's
/// host key, logging in with the job's client key. No `User`: the client's name for its
/// uid comes from the same image's /etc/passwd as the server's. With `unlisted_nodes`
/// any other name goes to the job's port too: a host that is not one of the job's
/// nodes has no sshd with the job's host key there, so the login fails.
pub fn ssh_config(job: &str, nodes: &[Node], port: u16, unlisted_nodes: bool) -> String {
    let mut out = format!("# berth: MPI wiring of job {job}. Generated; changes are lost.\n");
    for n in nodes {
        out.push_str(&format!("Host {}\n  HostName {}\n", n.name, n.addr));
    }
    let names: Vec<&str> = if unlisted_nodes { vec!["*"] } else { nodes.iter().map(|n| n.name.as_str()).collect() };
    out.push_str(&format!(
        "Host {names}\n  Port {port}\n  HostKeyAlias {alias}\n  UserKnownHostsFile {known}\n  \
         GlobalKnownHostsFile {known}\n  StrictHostKeyChecking yes\n  CheckHostIP no\n  UpdateHostKeys no\n  \
         IdentityFile {key}\n  IdentitiesOnly yes\n  PubkeyAuthentication yes\n  PasswordAuthentication no\n  \
         KbdInteractiveAuthentication no\n  BatchMode yes\n  ConnectionAttempts 10\n  ConnectTimeout 10\n  \
         ForwardX11 no\n  ForwardAgent no\n  LogLevel ERROR\n",
        names = names.join(" "),
        alias = host_alias(job),
        known = path("known_hosts"),
        key = path("id_ed25519"),
    ));
    out
}

/// known_hosts: the job's host key under the job's alias.
pub fn known_hosts(job: &str, host_public: &str) -> String {
    format!("{} {}\n", host_alias(job), host_public.trim())
}

/// authorized_keys: the job's client key only, with no forwarding of any kind.
pub fn authorized_keys(client_public: &str) -> String {
    format!("restrict,pty {}\n", client_public.trim())
}

/// The sshd config: the job's port and host key, the job's client key as the only way
/// in, and the container's environment in every session. sshd runs as the job user,
/// so it can log in no one else.
pub fn sshd_config(port: u16, env: &[(String, String)]) -> String {
    let mut out = format!(
        "# berth: the job's in-container sshd. Generated; changes are lost.\n\
         Port {port}\nListenAddress 0.0.0.0\nHostKey {host}\nAuthorizedKeysFile {auth}\n\
         AuthorizedPrincipalsFile none\nPermitRootLogin no\nPubkeyAuthentication yes\n\
         PasswordAuthentication no\nKbdInteractiveAuthentication no\nHostbasedAuthentication no\n\
         UsePAM no\nStrictModes yes\nPidFile none\nPrintMotd no\nPrintLastLog no\nX11Forwarding no\n\
         AllowTcpForwarding no\nAllowAgentForwarding no\nAllowStreamLocalForwarding no\nPermitTunnel no\n\
         PermitUserEnvironment no\nMaxStartups 200:30:400\nMaxSessions 200\nLogLevel INFO\n",
        host = path("host_ed25519"),
        auth = path("authorized_keys"),
    );
    let settable: Vec<String> = env
        .iter()
        .filter(|(k, _)| !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .filter(|(_, v)| !v.bytes().any(|b| matches!(b, b'"' | b'\\' | b'\n' | b'\r')))
        .filter(|(k, _)| !matches!(k.as_str(), "HOME" | "USER" | "LOGNAME" | "SHELL" | "MAIL" | "TERM"))
        .map(|(k, v)| format!("\"{k}={v}\""))
        .collect();
    if !settable.is_empty() {
        out.push_str(&format!("SetEnv {}\n", settable.join(" ")));
    }
    out
}

/// What MPI launchers and users run as `ssh`: berth's OpenSSH client through its own
/// loader and libraries, with the job's config only. `/bin/sh` is the image's: ssh-based
/// MPI launchers need a shell on every node anyway.
pub fn ssh_wrapper(loader: &str) -> String {
    format!(
        "#!/bin/sh\n# berth: the job's ssh (berth's OpenSSH, the job's config only).\n\
         exec {dir}/openssh/lib/{loader} --library-path {dir}/openssh/lib {dir}/openssh/ssh -F {dir}/ssh_config \"$@\"\n",
        dir = MOUNT_POINT,
    )
}

/// The line for /etc/passwd when the image has no entry for the user's uid.
pub fn passwd_line(user: &str, uid: u32, gid: u32, home: &str, shell: &str) -> String {
    format!("{user}:x:{uid}:{gid}:berth job user:{home}:{shell}\n")
}

/// The line for /etc/group when the image has no entry for the gid.
pub fn group_line(group: &str, gid: u32) -> String {
    format!("{group}:x:{gid}:\n")
}

/// Whether a passwd or group file already has an entry with this id (third field).
pub fn has_id(file: &str, id: u32) -> bool {
    file.lines().any(|l| l.split(':').nth(2).and_then(|f| f.parse::<u32>().ok()) == Some(id))
}

/// The name a passwd file gives `uid`, if any.
pub fn name_of(passwd: &str, uid: u32) -> Option<String> {
    passwd
        .lines()
        .find(|l| l.split(':').nth(2).and_then(|f| f.parse::<u32>().ok()) == Some(uid))
        .and_then(|l| l.split(':').next().map(String::from))
}

/// The /etc/hosts lines for the nodes the file does not name yet.
pub fn hosts_lines(hosts: &str, nodes: &[Node]) -> String {
    let known = |name: &str| hosts.lines().any(|l| l.split('#').next().unwrap_or("").split_whitespace().skip(1).any(|h| h == name));
    nodes.iter().filter(|n| !known(&n.name)).map(|n| format!("{} {}\n", n.addr, n.name)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes() -> Vec<Node> {
        vec![
            Node { name: "node1".into(), addr: "10.0.0.1".parse().unwrap(), slots: 2 },
            Node { name: "node2".into(), addr: "10.0.0.2".parse().unwrap(), slots: 3 },
        ]
    }

    #[test]
    fn the_hostfile_has_one_line_per_slot() {
        assert_eq!(hostfile(&nodes()), "node1\nnode1\nnode2\nnode2\nnode2\n");
    }

    #[test]
    fn absurd_slot_counts_are_refused_before_anything_is_expanded() {
        assert_eq!(check_slots([("node1", 2), ("node2", MAX_SLOTS_PER_NODE)]).unwrap(), [2, MAX_SLOTS_PER_NODE as u32]);
        let one = check_slots([("node1", 1), ("node2", 2_000_000_000)]).unwrap_err();
        assert_eq!(one, "node 'node2' would get 2000000000 slots (MPI ranks, from mpiprocs, ppn or the per-node counts); berth lists at most 65536 on one node");
        let many = (0..MAX_SLOTS / MAX_SLOTS_PER_NODE + 1).map(|_| ("n", MAX_SLOTS_PER_NODE));
        assert!(check_slots(many).unwrap_err().contains("in all"));
    }

    #[test]
    fn ssh_config_maps_every_node_to_its_address_and_the_jobs_port_and_key() {
        let text = ssh_config("77", &nodes(), 20077, false);
        assert!(text.contains("Host node2\n  HostName 10.0.0.2\n"), "{text}");
        assert!(text.contains("Host node1 node2\n  Port 20077\n  HostKeyAlias berth-job-77\n"), "{text}");
        assert!(text.contains("StrictHostKeyChecking yes"));
        assert!(text.contains("IdentityFile /.berth/wiring/id_ed25519"));
        let partial = ssh_config("77", &nodes(), 20077, true);
        assert!(partial.contains("Host node2\n  HostName 10.0.0.2\n"), "{partial}");
        assert!(partial.contains("Host *\n  Port 20077\n  HostKeyAlias berth-job-77\n"), "{partial}");
    }

    #[test]
    fn sshd_config_passes_plain_environment_and_skips_what_it_cannot_quote() {
        let env = vec![
            ("PATH".to_string(), "/opt/x/bin:/usr/bin".to_string()),
            ("BAD".to_string(), "a\"b".to_string()),
            ("HOME".to_string(), "/root".to_string()),
            ("BERTH_HOSTFILE".to_string(), "/.berth/wiring/hostfile".to_string()),
        ];
        let text = sshd_config(20001, &env);
        assert!(text.contains("SetEnv \"PATH=/opt/x/bin:/usr/bin\" \"BERTH_HOSTFILE=/.berth/wiring/hostfile\"\n"), "{text}");
        assert!(text.contains("UsePAM no\n") && text.contains("Port 20001\n"));
    }

    #[test]
    fn passwd_group_and_hosts_entries_are_added_only_when_missing() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nubuntu:x:1000:1000::/home/ubuntu:/bin/bash\n";
        assert!(has_id(passwd, 1000) && !has_id(passwd, 1001));
        assert_eq!(name_of(passwd, 1000).as_deref(), Some("ubuntu"));
        assert_eq!(passwd_line("bob", 1001, 1001, "/home/bob", "/bin/sh"), "bob:x:1001:1001:berth job user:/home/bob:/bin/sh\n");
        let hosts = "127.0.0.1 localhost\n10.0.0.1 node1 # the head\n";
        assert_eq!(hosts_lines(hosts, &nodes()), "10.0.0.2 node2\n");
    }
}
