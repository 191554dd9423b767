#!/usr/bin/env bash
# Stop the cluster that start.sh recorded in CLUSTER_DIR, and nothing else: only processes
# whose command line names that cluster's own temp dir are signalled.
#
#   cluster/local/stop.sh [CLUSTER_DIR=/tmp/vitad-cluster]
set -uo pipefail
dir=${1:-/tmp/vitad-cluster}
[ -f "$dir/temp_dir" ] || { echo "no cluster recorded in $dir" >&2; exit 1; }
tmp=$(cat "$dir/temp_dir")
pids() { pgrep -f -- "$tmp" || true; }
for sig in TERM TERM KILL; do
  p=$(pids)
  [ -z "$p" ] && break
  # shellcheck disable=SC2086
  kill -$sig $p 2>/dev/null
  sleep 2
done
left=$(pids)
rm -rf "$tmp" "$dir/address"
[ -z "$left" ] && echo "stopped the cluster of $dir" || { echo "still running: $left" >&2; exit 1; }
