#!/usr/bin/env bash
# The invocation benchmark with the store on a CPU of its own, as a deployment runs it (a
# NATS cluster on its own machines): the bench process — the direct client, the fixture MCP
# server and Switchboard — runs on CPU 0, and every nats-server it starts is moved to CPU 1
# as soon as it appears (with all its threads). Compare its ratios with the plain
# `cargo bench -p gateway --bench invoke`, where all four share both CPUs (docs/performance.md).
#
#   NATS_SERVER_BIN=.tools/bin/nats-server scripts/bench-invoke-store-apart.sh > bench.log
#
# Needs util-linux's `taskset` and a machine with at least two CPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NATS_SERVER_BIN:=$PWD/.tools/bin/nats-server}"
export NATS_SERVER_BIN
bench_cpu=${BENCH_CPU:-0}
store_cpu=${STORE_CPU:-1}

taskset -c "$bench_cpu" cargo bench -p gateway --bench invoke &
bench=$!
while kill -0 "$bench" 2>/dev/null; do
  for pid in $(pgrep -x nats-server || true); do
    if ! grep -Eq "^Cpus_allowed_list:[[:space:]]*${store_cpu}\$" "/proc/$pid/status" 2>/dev/null; then
      taskset -a -p -c "$store_cpu" "$pid" > /dev/null 2>&1 || true
    fi
  done
  sleep 0.1
done
wait "$bench"
