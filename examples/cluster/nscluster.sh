#!/usr/bin/env bash
# A real Ray cluster on one Linux machine, for trying simfed's multi-node path (run as root).
#
# Each node is a network namespace with its own address on a bridge, plus a mount namespace with
# its own /tmp and /dev/shm (so nothing is shared between nodes unless it is meant to be: Ray's
# session directory, run directories and local stores stay on their node). An S3-protocol server
# (moto) on the bridge holds what every node must reach: the partition store and engine.storage.
# Ray runs on every node with token authentication, the same token everywhere.
#
#   sudo NSC_PYTHON=/path/to/venv/bin/python examples/cluster/nscluster.sh up
#   sudo examples/cluster/nscluster.sh exec head simfed launch exp.toml --address 10.231.7.10:6379
#   sudo examples/cluster/nscluster.sh down
#
# Commands: up | down | add NODE | ray-head NODE | ray-join NODE | s3 | exec NODE CMD... |
#           kill NODE | pids NODE | env
# Settings (environment): NSC_PREFIX (names: netns PREFIX-NODE, bridge PREFIX-br), NSC_NET (the
# bridge's /24, first three octets), NSC_NODES, NSC_CPUS (Ray CPUs per node), NSC_PYTHON (a Python
# with simfed, ray and moto), NSC_STATE (pids, logs and the token).
# The tests drive this script through tests/cluster/netns.py; docs/clusters.md explains each step.
set -euo pipefail

PREFIX=${NSC_PREFIX:-snc7}
NET=${NSC_NET:-10.231.7}
NODES=${NSC_NODES:-head w1 w2}
CPUS=${NSC_CPUS:-2}
PY=${NSC_PYTHON:-python3}
STATE=${NSC_STATE:-/var/tmp/simfed-nscluster/$PREFIX}
RAY_PORT=6379
S3_PORT=9000
BRIDGE=$PREFIX-br

die() { echo "nscluster: $*" >&2; exit 2; }
holder() { cat "$STATE/$1.pid" 2>/dev/null || die "no node $1 (run: $0 add $1)"; }
node_ip() { cat "$STATE/$1.ip"; }

# Run a command inside NODE: its network, its mounts (/tmp, /dev/shm) and its hostname, with the
# cluster's token in the environment (as every process of a real node would have it).
in_node() {
    local node=$1; shift
    nsenter -t "$(holder "$node")" -m -n -u -- env RAY_TMPDIR=/tmp/ray RAY_AUTH_MODE=token \
        RAY_AUTH_TOKEN="$(cat "$STATE/token")" "$@"
}

make_bridge() {
    mkdir -p "$STATE"
    ip link show "$BRIDGE" >/dev/null 2>&1 && return
    ip link add "$BRIDGE" type bridge
    # A fixed MAC: a bridge left to itself takes the lowest MAC of its ports, so a node added later
    # (a random veth MAC) can change it, and every node's ARP entry for the S3 server's address
    # then points nowhere for up to a minute.
    ip link set "$BRIDGE" address "$(printf '02:53:4e:43:%02x:01' "${NET##*.}")"
    ip addr add "$NET.1/24" dev "$BRIDGE"   # the host's address on the bridge: the S3 server's
    ip link set "$BRIDGE" up
}

# A node: a network namespace joined to the bridge by a veth pair, and a process that holds a
# private mount namespace (fresh tmpfs on /tmp and /dev/shm) and UTS namespace for it.
add_node() {
    local node=$1 ip known
    known=$(shopt -s nullglob; set -- "$STATE"/*.ip; echo $#)
    ip="$NET.$((10 + known))"
    ip netns add "$PREFIX-$node"
    # IPv4 only: a node's addresses are loopback and its bridge address, nothing else to listen on.
    ip netns exec "$PREFIX-$node" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
    ip link add "$PREFIX-$node" type veth peer name "$PREFIX-${node}p"
    ip link set "$PREFIX-$node" master "$BRIDGE" up
    ip link set "$PREFIX-${node}p" netns "$PREFIX-$node"
    ip -n "$PREFIX-$node" link set "$PREFIX-${node}p" name eth0
    ip -n "$PREFIX-$node" addr add "$ip/24" dev eth0
    ip -n "$PREFIX-$node" link set eth0 up
    ip -n "$PREFIX-$node" link set lo up
    ip netns exec "$PREFIX-$node" unshare --mount --uts --propagation private sh -c \
        "mount -t tmpfs -o size=4g tmpfs /tmp && mount -t tmpfs -o size=2g tmpfs /dev/shm && hostname $node &&
         exec sleep infinity" </dev/null >"$STATE/$node.log" 2>&1 &
    echo $! >"$STATE/$node.pid"
    echo "$ip" >"$STATE/$node.ip"
    for _ in $(seq 50); do   # the holder has mounted its /tmp
        [ "$(stat -c %i "/proc/$!/ns/mnt")" != "$(stat -c %i /proc/self/ns/mnt)" ] &&
            grep -q " /dev/shm tmpfs" "/proc/$!/mounts" && return
        sleep 0.1
    done
    die "node $node did not start: $(cat "$STATE/$node.log")"
}

new_token() {
    [ -s "$STATE/token" ] && return
    (umask 077 && "$PY" -c 'import secrets; print(secrets.token_hex(32))' >"$STATE/token")
}

# `ray start` on a node, token authentication on. The GCS checks raylets every second (Ray's
# default takes ~15 s to call a killed node dead). Ray gives a starting node 30 s to register,
# which a loaded machine can miss: then the node's Ray processes go and it starts again.
ray_start() {
    local node=$1 attempt; shift
    for attempt in 1 2 3; do
        in_node "$node" RAY_health_check_period_ms=1000 RAY_health_check_timeout_ms=1000 \
            RAY_health_check_failure_threshold=3 "$PY" -m ray.scripts.scripts start \
            --node-ip-address="$(node_ip "$node")" --node-name="$node" --num-cpus="$CPUS" \
            --disable-usage-stats --object-store-memory=300000000 "$@" >>"$STATE/$node.ray.log" 2>&1 && return
        stop_ray "$node"
    done
    die "ray start failed on $node: $(tail -3 "$STATE/$node.ray.log")"
}

# Every process of the node but the one holding its namespaces (never `ray stop`: it would end
# the Ray processes of every node on this machine).
stop_ray() {
    local pid
    for pid in $(ip netns pids "$PREFIX-$1" 2>/dev/null); do
        [ "$pid" != "$(holder "$1")" ] && { kill -9 "$pid" 2>/dev/null || true; }
    done
    return 0
}

s3_start() {
    [ -s "$STATE/s3.pid" ] && kill -0 "$(cat "$STATE/s3.pid")" 2>/dev/null && return
    "$PY" -m moto.server -H "$NET.1" -p "$S3_PORT" </dev/null >"$STATE/s3.log" 2>&1 &
    echo $! >"$STATE/s3.pid"
    "$PY" - "$NET.1:$S3_PORT" <<'EOF'
import sys, time
import pyarrow.fs as pafs
for _ in range(100):
    try:
        fs, _ = pafs.FileSystem.from_uri(f"s3://testing:testing@simfed?endpoint_override={sys.argv[1]}"
                                         "&scheme=http&region=us-east-1&allow_bucket_creation=true")
        fs.create_dir("simfed")
        break
    except OSError:
        time.sleep(0.2)
else:
    sys.exit("nscluster: the S3 server did not answer")
EOF
}

kill_node() {
    local pids
    pids=$(ip netns pids "$PREFIX-$1" 2>/dev/null || true)
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
}

# Everything this prefix made, also after a crashed run whose state directory is gone.
down() {
    local ns
    for ns in $(ip netns list | awk '{print $1}' | grep "^$PREFIX-" || true); do
        kill_node "${ns#"$PREFIX-"}"
        ip netns del "$ns" 2>/dev/null || true
    done
    [ -s "$STATE/s3.pid" ] && kill "$(cat "$STATE/s3.pid")" 2>/dev/null || true
    for link in $(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | grep "^$PREFIX-" || true); do
        ip link del "$link" 2>/dev/null || true
    done
    rm -rf "$STATE"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    up)
        make_bridge
        new_token
        s3_start
        for node in $NODES; do add_node "$node"; done
        first=${NODES%% *}
        ray_start "$first" --head --port="$RAY_PORT" --include-dashboard=false
        for node in ${NODES#"$first"}; do ray_start "$node" --address="$(node_ip "$first"):$RAY_PORT"; done
        echo "head $(node_ip "$first"):$RAY_PORT; S3 endpoint $NET.1:$S3_PORT; token in $STATE/token"
        ;;
    down) down ;;
    add) make_bridge; add_node "$1" ;;
    ray-head) ray_start "$1" --head --port="$RAY_PORT" --include-dashboard=false ;;
    ray-join) ray_start "$1" --address="$(node_ip "${NODES%% *}"):$RAY_PORT" ;;
    s3) make_bridge; s3_start ;;
    exec) in_node "$@" ;;
    kill) kill_node "$1" ;;
    pids) ip netns pids "$PREFIX-$1" ;;
    env) echo "RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(cat "$STATE/token")" ;;
    *) die "usage: $0 up | down | add NODE | ray-head NODE | ray-join NODE | s3 | exec NODE CMD... | kill NODE | pids NODE | env" ;;
esac
