#!/usr/bin/env bash
# The project's test command: installs what the tests need (nats-server 2.15.1, checksum
# verified, into .tools/) and runs the whole test suite. Extra arguments go to `cargo test`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/install-nats-server.sh"
# The testkit finds nats-server through NATS_SERVER_BIN first; pin it to the verified binary so
# an older nats-server on PATH (Debian ships 2.9) is never picked up.
export NATS_SERVER_BIN="${NATS_SERVER_BIN:-$root/.tools/bin/nats-server}"
cd "$root"
cargo test --workspace --locked --no-fail-fast "$@"
