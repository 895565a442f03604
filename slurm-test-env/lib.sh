# Shared by the slurm-test-env scripts: names, addresses and small helpers.
# Every host is a network namespace (own address on the test bridge) plus a UTS and
# mount namespace held by an anchor process; commands enter a host with nsenter.

set -euo pipefail

ENV_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$ENV_DIR")
STATE=${BERTH_TEST_STATE:-/var/lib/berth-test-env}      # removed by down
CACHE=${BERTH_TEST_CACHE:-/var/cache/berth-test-env}    # built images; kept across down
IMAGES=${BERTH_TEST_IMAGES:-$CACHE/images}
BRIDGE=berth-tb0
SUBNET=10.203.77
HEAD_ADDR=$SUBNET.10
REGISTRY_ADDR=$HEAD_ADDR:5000
TEST_USERS=(alice bob)
MAX_NODES=4

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

# Runs a command as root on host $1 (in its network, UTS and mount namespaces).
in_host() {
  local host=$1 pid
  shift
  pid=$(anchor_pid "$host") || die "host $host is not up (run slurm-test-env/up)"
  nsenter --target "$pid" --net --uts --mount -- "$@"
}

is_up() { [ -f "$STATE/nodes" ] && anchor_pid head >/dev/null; }
