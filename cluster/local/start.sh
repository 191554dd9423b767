#!/usr/bin/env bash
# Start a Ray cluster on this machine: one head and N worker raylets, all on 127.0.0.1.
#
#   cluster/local/start.sh [WORKERS=1] [CLUSTER_DIR=/tmp/vitad-cluster]
#
# Each node gets its own CPU count, memory and object-store share and its own ports; the
# dashboard (which also serves `ray job submit`) listens on 127.0.0.1 only. Ray's core processes
# listen on every interface whatever the node address, so token auth is on (RAY_AUTH_MODE=token):
# the token is Ray's usual one (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, made
# there if there is none), and clients need RAY_AUTH_MODE=token and the same token.
# RAY_AUTH_MODE=disabled turns it off. Prints the address to use (RAY_ADDRESS) and records what
# it started in CLUSTER_DIR; stop.sh stops exactly that.
set -euo pipefail
workers=${1:-1}
dir=${2:-/tmp/vitad-cluster}
cpus=${NODE_CPUS:-1}
mem=${NODE_MEMORY:-2000000000}
store=${NODE_OBJECT_STORE:-500000000}
port=${HEAD_PORT:-$((20000 + RANDOM % 20000))}
ray=${RAY_BIN:-ray}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
export RAY_USAGE_STATS_ENABLED=0
default_token="$HOME/.ray/auth_token"
if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}${RAY_AUTH_TOKEN_PATH:-}" ] &&
   [ ! -e "$default_token" ]; then
  "$ray" get-auth-token --generate >/dev/null  # the token stays off stdout
  chmod 600 "$default_token"  # Ray writes it readable by every user of the machine
fi
mkdir -p "$dir"
# Ray's socket paths must stay short: the temp dir is a short path recorded beside the state.
tmp=$(mktemp -d /tmp/vr-XXXXXX)
echo "$tmp" > "$dir/temp_dir"
echo "$port" > "$dir/port"

node_ports() {  # distinct port ranges per node: base = head port + 100 * node index
  local base=$(($1 + 100 * $2))
  echo "--node-manager-port $((base + 1)) --object-manager-port $((base + 2))" \
       "--min-worker-port $((base + 10)) --max-worker-port $((base + 60))" \
       "--runtime-env-agent-port $((base + 3)) --dashboard-agent-grpc-port $((base + 4))" \
       "--dashboard-agent-listen-port $((base + 5)) --metrics-export-port $((base + 6))"
}

# shellcheck disable=SC2046
"$ray" start --head --node-ip-address 127.0.0.1 --port "$port" --num-cpus "$cpus" \
  --memory "$mem" --object-store-memory "$store" --temp-dir "$tmp" --include-dashboard true \
  --dashboard-host 127.0.0.1 --dashboard-port $((port + 8)) --ray-client-server-port $((port + 7)) --disable-usage-stats $(node_ports "$port" 0) >"$dir/head.log" 2>&1
for i in $(seq 1 "$workers"); do
  # shellcheck disable=SC2046
  "$ray" start --address "127.0.0.1:$port" --node-ip-address 127.0.0.1 --num-cpus "$cpus" \
    --memory "$mem" --object-store-memory "$store" --temp-dir "$tmp" --disable-usage-stats \
    $(node_ports "$port" "$i") >"$dir/worker-$i.log" 2>&1
done
echo "127.0.0.1:$port" > "$dir/address"
echo "http://127.0.0.1:$((port + 8))" > "$dir/dashboard"
echo "RAY_ADDRESS=127.0.0.1:$port"
echo "RAY_AUTH_MODE=$RAY_AUTH_MODE"
echo "jobs: ray job submit --address http://127.0.0.1:$((port + 8)) --working-dir . -- python jobs/<step>.py ..."
