# Sourced by start-local-ray.sh, start-node2.sh, stop-node2.sh and stop-local-ray.sh: the settings of the
# local two-node Ray and the functions that start, find and stop one of its nodes. Not run on its own.
#
# The head is `ray start --head --block`; node2 is join_node.py (the same Ray `Node` that `ray start`
# builds: `ray start` itself cannot keep a worker node on 127.0.0.1, see that file). Each runs as the leader
# of its own session (setsid), so every process of a node (raylet, its workers and agents; on the head also
# GCS, dashboard, log monitor) is in one process group whose id is that pid, recorded in nodes.env. Stopping
# node2 alone is then signalling that pid: `ray stop` would stop every Ray process on the host, and node2's
# processes cannot be told from the head's by name (workers rename themselves "ray::IDLE").
#
# Ports, all on 127.0.0.1 (README.md in this folder has the `ss -ltnp` check):
#   FTL_RAY_PORT (6390)              GCS; +1 the Ray client server, +2 and +3 the autoscaler's and the
#                                    dashboard's Prometheus metrics (head only; Ray's defaults 44217, 44227)
#   FTL_RAY_DASHBOARD_PORT (8265)    dashboard and job submission (head only)
#   FTL_RAY_PORT+10*N+1..+6          node N (1 = head, 2 = node2): node manager, object manager, dashboard
#                                    agent HTTP and gRPC, metrics export, runtime-env agent
#   FTL_RAY_WORKER_PORT (11000)+200*(N-1), 200 ports    node N's worker processes
# Both nodes have the same IP, so every port is set, or node2's defaults (52365 for the agent, 10002-19999
# for workers, ...) would collide with the head's.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
RAY_BIN=${RAY_BIN:-${VENV:-$REPO/.venv}/bin/ray}
case $RAY_BIN in /*) ;; *) RAY_BIN=$REPO/$RAY_BIN ;; esac
RAY_PYTHON=$(dirname "$RAY_BIN")/python  # runs join_node.py with the same Ray
# The nodes' processes inherit PATH: a job's entrypoint `python ...` then means this venv's python.
export PATH="$(dirname "$RAY_BIN"):$PATH"
RAY_TMP=${FTL_RAY_TMP:-/tmp/ftl-ray}  # short: Ray's unix sockets live under it (108-byte path limit)
RAY_PORT=${FTL_RAY_PORT:-6390}
DASHBOARD_PORT=${FTL_RAY_DASHBOARD_PORT:-8265}
WORKER_PORT=${FTL_RAY_WORKER_PORT:-11000}
TIMEOUT_S=${FTL_RAY_TIMEOUT_S:-90}
OBJECT_STORE_BYTES=$((200 * 1024 * 1024))
GCS_ADDRESS=127.0.0.1:$RAY_PORT
DASHBOARD_URL=http://127.0.0.1:$DASHBOARD_PORT
NODES_ENV=$RAY_TMP/nodes.env

# Token auth turns on by itself when ~/.ray/auth_token exists; these nodes are loopback-only test nodes.
export RAY_AUTH_MODE=disabled
export RAY_USAGE_STATS_ENABLED=0
# On Linux this only stops Ray from replacing 127.0.0.1 by the host's external IP (node IP, `--address`,
# RAY_ADDRESS: ray/_private/services.py get_node_ip_address): without it the head binds GCS, raylet and
# agents on all interfaces, and a driver given 127.0.0.1:PORT dials the external IP. Every process of both
# nodes inherits it, so job drivers on them reach the GCS at 127.0.0.1 too.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export AUTOSCALER_METRIC_PORT=$((RAY_PORT + 2)) DASHBOARD_METRIC_PORT=$((RAY_PORT + 3))

die() { echo "$SCRIPT: $*" >&2; exit 1; }
log() { echo "$SCRIPT: $*" >&2; }

# nodes.env: HEAD_PID, HEAD_ID, NODE2_PID, NODE2_ID (PID: the node's leader process, = its group id).
HEAD_PID='' HEAD_ID='' NODE2_PID='' NODE2_ID=''
read_nodes_env() { [ -f "$NODES_ENV" ] && . "$NODES_ENV"; return 0; }
write_nodes_env() {
    printf 'HEAD_PID=%s\nHEAD_ID=%s\nNODE2_PID=%s\nNODE2_ID=%s\n' \
        "$HEAD_PID" "$HEAD_ID" "$NODE2_PID" "$NODE2_ID" >"$NODES_ENV.tmp"
    mv "$NODES_ENV.tmp" "$NODES_ENV"
}

group_alive() { [ -n "$1" ] && kill -0 -- "-$1" 2>/dev/null; }

# The command that runs node N in the foreground: `ray start --head --block` for 1, join_node.py for 2.
node_command() {
    local n=$1 base=$((RAY_PORT + 10 * $1)) workers=$((WORKER_PORT + 200 * ($1 - 1)))
    local node_flags=(
        --node-ip-address=127.0.0.1 --temp-dir="$RAY_TMP"
        --num-cpus=1 --num-gpus=0 --object-store-memory="$OBJECT_STORE_BYTES" --resources="{\"node$n\": 1}"
        --node-manager-port=$((base + 1)) --object-manager-port=$((base + 2))
        --dashboard-agent-listen-port=$((base + 3)) --dashboard-agent-grpc-port=$((base + 4))
        --metrics-export-port=$((base + 5)) --runtime-env-agent-port=$((base + 6))
        --min-worker-port="$workers" --max-worker-port=$((workers + 199))
    )
    if [ "$n" -eq 1 ]; then
        printf '%s\n' "$RAY_BIN" start --head --block --disable-usage-stats "${node_flags[@]}" \
            --port="$RAY_PORT" --ray-client-server-port=$((RAY_PORT + 1)) \
            --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT"
    else
        printf '%s\n' "$RAY_PYTHON" "$REPO/tests/ray/join_node.py" --address="$GCS_ADDRESS" "${node_flags[@]}"
    fi
}

# Start node N in the background as its own session; print its pid (= its process group id).
start_node() {
    local n=$1 command
    mapfile -t command < <(node_command "$n")
    : >"$RAY_TMP/node$n.log"  # now, not in the background: own_node_id must not read the last run's id
    setsid "${command[@]}" >"$RAY_TMP/node$n.log" 2>&1 </dev/null &
    echo $!
}

# The ids of the alive nodes holding custom resource nodeN, one a line, from the dashboard's state API.
alive_node_ids() {
    curl -sf --max-time 5 "$DASHBOARD_URL/api/v0/nodes?detail=1&limit=100" 2>/dev/null | python3 -c '
import json, sys
for node in json.load(sys.stdin)["data"]["result"]["result"]:
    if node["state"] == "ALIVE" and node["resources_total"].get(sys.argv[1]):
        print(node["node_id"])' "node$1" 2>/dev/null || true
}

dashboard_up() { curl -sf --max-time 5 "$DASHBOARD_URL/api/version" >/dev/null 2>&1; }

# The node id join_node.py printed for node2 ('' until it did).
own_node_id() { sed -n 's/^join_node: node \([0-9a-f]*\) at .*/\1/p' "$RAY_TMP/node$1.log" 2>/dev/null || true; }

# Wait until node N (leader pid $2) is registered alive with the GCS; set NODE_ID to its id. For node2 the
# id is the one it printed: a node2 killed without SIGTERM stays ALIVE in the GCS until its health checks
# time out, next to the new one.
wait_node_alive() {
    local n=$1 pid=$2 deadline=$((SECONDS + TIMEOUT_S)) own
    NODE_ID=''
    while :; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$RAY_TMP/node$n.log" >&2
            die "node$n exited before it came up (log: $RAY_TMP/node$n.log)."
        fi
        if dashboard_up; then
            if [ "$n" -eq 1 ]; then
                NODE_ID=$(alive_node_ids 1 | head -n 1)
            else
                own=$(own_node_id 2)
                NODE_ID=$(alive_node_ids 2 | grep -x "${own:-none yet}" || true)
            fi
            [ -n "$NODE_ID" ] && return 0
        fi
        [ "$SECONDS" -lt "$deadline" ] ||
            die "node$n not alive after $TIMEOUT_S s (dashboard $DASHBOARD_URL; log: $RAY_TMP/node$n.log)."
        sleep 1
    done
}

# Stop the node whose leader is pid $1: SIGTERM to the leader alone, whose handler (Ray's own) drains the
# node, so the GCS marks it dead at once, and stops its processes in order (~1 s for node2, ~5 s for the
# head; a SIGTERM to the whole group at once took over 15 s). SIGKILL to the group for what is left after
# $STOP_GRACE_S (30 s; the full stop uses less: nothing there needs a graceful drain).
stop_node_group() {
    local pid=$1 i grace=${STOP_GRACE_S:-30}
    group_alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null
    for i in $(seq $((grace * 2))); do group_alive "$pid" || return 0; sleep 0.5; done
    log "process group $pid still alive $grace s after SIGTERM; sending SIGKILL"
    kill -KILL -- "-$pid" 2>/dev/null
    for i in $(seq 10); do group_alive "$pid" || return 0; sleep 0.5; done
    die "process group $pid survived SIGKILL."
}

# Exit 3 when Ray is not installed, the one failure tests skip on (tests/cluster/ray_fixture.py).
check_ray_installed() {
    local fix="pip install -c constraints.txt -e '.[dev]', or set RAY_BIN"
    [ -x "$RAY_BIN" ] || { log "no Ray at $RAY_BIN ($fix)."; exit 3; }
    "$RAY_PYTHON" -c 'import ray' 2>/dev/null || { log "$RAY_PYTHON cannot import ray ($fix)."; exit 3; }
    mkdir -p "$RAY_TMP"
}

# The head is up when its process group lives, the dashboard answers and the GCS lists it alive; node2
# when its process group lives and the id it printed is alive. Each sets HEAD_ID / NODE2_ID.
head_up() {
    group_alive "$HEAD_PID" && dashboard_up || return 1
    HEAD_ID=$(alive_node_ids 1 | head -n 1)
    [ -n "$HEAD_ID" ]
}
node2_up() {
    group_alive "$NODE2_PID" || return 1
    NODE2_ID=$(own_node_id 2)
    [ -n "$NODE2_ID" ] && alive_node_ids 2 | grep -qx "$NODE2_ID"
}

# Start the head unless it is up; a head that is half up (its process alive, the dashboard or the node not)
# is stopped first, with node2.
ensure_head() {
    if head_up; then write_nodes_env; return 0; fi
    stop_node_group "$NODE2_PID"
    stop_node_group "$HEAD_PID"
    if (exec 3<>"/dev/tcp/127.0.0.1/$RAY_PORT") 2>/dev/null; then
        die "port $RAY_PORT answers but is not this script's Ray: stop that Ray, or set FTL_RAY_PORT."
    fi
    local t0=$SECONDS
    HEAD_PID=$(start_node 1) HEAD_ID='' NODE2_PID='' NODE2_ID=''
    write_nodes_env
    wait_node_alive 1 "$HEAD_PID"
    HEAD_ID=$NODE_ID
    write_nodes_env
    log "head $HEAD_ID up in $((SECONDS - t0)) s"
}

# Start node2 unless it is up; the head must be up.
ensure_node2() {
    if node2_up; then write_nodes_env; return 0; fi
    stop_node_group "$NODE2_PID"
    local t0=$SECONDS
    NODE2_PID=$(start_node 2) NODE2_ID=''
    write_nodes_env
    wait_node_alive 2 "$NODE2_PID"
    NODE2_ID=$NODE_ID
    write_nodes_env
    log "node2 $NODE2_ID up in $((SECONDS - t0)) s"
}
