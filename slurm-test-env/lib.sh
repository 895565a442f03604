# Shared by the slurm-test-env scripts: names, addresses and small helpers.
# Every host is a network namespace (own address on the test bridge) plus a UTS and
# mount namespace held by an anchor process; commands enter a host with nsenter.

set -euo pipefail

ENV_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$ENV_DIR")
# Clusters 0..9 can run side by side (say, two developers' test runs); 0 by default.
CLUSTER=${BERTH_TEST_CLUSTER:-0}
[[ "$CLUSTER" =~ ^[0-9]$ ]] || { echo "slurm-test-env: error: BERTH_TEST_CLUSTER must be 0..9" >&2; exit 1; }
if [ "$CLUSTER" = 0 ]; then suffix=; else suffix=-$CLUSTER; fi
STATE=${BERTH_TEST_STATE:-/var/lib/berth-test-env$suffix}   # removed by down
CACHE=${BERTH_TEST_CACHE:-/var/cache/berth-test-env}        # built images; kept, shared
IMAGES=${BERTH_TEST_IMAGES:-$CACHE/images}
BRIDGE=berth-tb$CLUSTER
NS_PREFIX=berth$CLUSTER-       # network namespaces: berth0-head, berth0-node1, ...
VETH_PREFIX=bt$CLUSTER-        # host ends of the veth pairs (names up to 15 characters)
SUBNET=10.203.$((77 + CLUSTER))
HEAD_ADDR=$SUBNET.10
REGISTRY_ADDR=$HEAD_ADDR:5000
# A second registry that requires a login (htpasswd basic auth), for per-user credentials.
AUTH_REGISTRY_ADDR=$HEAD_ADDR:5001
AUTH_REGISTRY_LOGIN=berth-test:not-a-secret-test-only
# An HTTP proxy (tinyproxy) on the head host, for HTTP_PROXY/NO_PROXY tests.
PROXY_ADDR=$HEAD_ADDR:3128
TEST_USERS=(alice bob)
MAX_NODES=4
# Slurm 24.11 runs from a Debian trixie root (Debian 12 ships 22.05): see trixie-root.
TRIXIE_ROOT=$CACHE/trixie

step() { printf 'slurm-test-env: %s\n' "$*"; }
die() { printf 'slurm-test-env: error: %s\n' "$*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "run as root (it creates network namespaces and starts daemons)"; }

node_addr() { echo "$SUBNET.$((10 + ${1#node}))"; }   # node1 -> .11
host_addr() { if [ "$1" = head ]; then echo "$HEAD_ADDR"; else node_addr "$1"; fi; }

# The hosts of the running cluster: head, node1..nodeN.
cluster_nodes() { [ -f "$STATE/nodes" ] && cat "$STATE/nodes"; }

anchor_pid() {
  local pid
  pid=$(cat "$STATE/hosts/$1.pid" 2>/dev/null) || return 1
  [ -d "/proc/$pid" ] || return 1
  echo "$pid"
}

# Runs a command as root on host $1 (in its network, UTS and mount namespaces, under
# its root: the machine's own for Slurm 22.05, the trixie root for 24.11).
in_host() {
  local host=$1 pid
  shift
  pid=$(anchor_pid "$host") || die "host $host is not up (run slurm-test-env/up)"
  nsenter --target "$pid" --net --uts --mount --root --wd -- "$@"
}

# The Slurm version the running cluster was brought up with (22.05 or 24.11).
cluster_slurm() { cat "$STATE/slurm-version" 2>/dev/null || echo 22.05; }

# The machine's cgroup v2 hierarchy (its first cgroup2 mount), if it has one.
cgroup2_root() { findmnt -n -t cgroup2 -o TARGET 2>/dev/null | head -1; }
# This cluster's cgroups, one per daemon that asks (removed by down).
DAEMON_CGROUPS=berth-test-$CLUSTER

# Makes the cgroup v2 group for daemon $1 of this cluster and prints its path; prints
# nothing where the machine has no cgroup v2 hierarchy.
daemon_cgroup() {
  local root
  root=$(cgroup2_root)
  [ -n "$root" ] || return 0
  mkdir -p "$root/$DAEMON_CGROUPS/$1"
  echo "$root/$DAEMON_CGROUPS/$1"
}

is_up() { [ -f "$STATE/nodes" ] && anchor_pid head >/dev/null; }
