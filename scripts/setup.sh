#!/usr/bin/env bash
# Sets up what r2f needs to build, test and run: a Python virtualenv holding libtorch (the
# torch==2.11.0 wheel that tch 0.24 expects) and the pinned tools that generate the test
# fixtures. Idempotent and quick when already done. The Rust toolchain (cargo) must be present.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${R2F_VENV:-$root/.venv}
cd "$root"

command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust (rustup) first" >&2; exit 1; }
py=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating virtualenv $venv"
  "$py" -m venv "$venv"
fi
want=$(cat scripts/requirements-torch.txt scripts/requirements-fixtures.txt | sha256sum | cut -c1-16)
stamp="$venv/.r2f-setup-$want"
if [ ! -f "$stamp" ]; then
  echo "setup: installing libtorch (torch wheel) and fixture tools into $venv (several GB the first time)"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -r scripts/requirements-torch.txt
  "$venv/bin/python" -m pip install -q -r scripts/requirements-fixtures.txt
  # open-clip-torch only for its CLIP BPE vocabulary file; its dependencies are not needed.
  "$venv/bin/python" -m pip install -q --no-deps "$(grep '^open-clip-torch' scripts/requirements-fixtures.txt || echo open-clip-torch==3.3.0)"
  rm -f "$venv"/.r2f-setup-*
  touch "$stamp"
fi
# The client examples' one-line setups (the test suite runs both examples).
ex_want=$(cat examples/python/requirements.txt examples/typescript/package-lock.json | sha256sum | cut -c1-16)
if [ ! -f "$venv/.r2f-examples-$ex_want" ] || [ ! -x examples/typescript/node_modules/.bin/tsx ]; then
  echo "setup: installing the client examples' dependencies (aio-pika, amqplib)"
  "$venv/bin/python" -m pip install -q -r examples/python/requirements.txt
  command -v npm >/dev/null || { echo "setup: npm not found; install Node.js 20+ for the TypeScript example" >&2; exit 1; }
  npm ci --prefix examples/typescript --no-audit --no-fund --loglevel=error
  rm -f "$venv"/.r2f-examples-*
  touch "$venv/.r2f-examples-$ex_want"
fi
# c2patool, the reference C2PA validator that tests/c2pa.rs checks signed images with, built
# from crates.io into the virtualenv (about 15 CPU-minutes the first time, OpenSSL included;
# 0.28 needs Rust 1.96). Without its networking feature: it only reads local files here. In a
# temporary target directory, not the project's.
c2patool_version=0.27.22
if ! "$venv/c2patool/bin/c2patool" --version 2>/dev/null | grep -qx "c2patool $c2patool_version"; then
  echo "setup: building c2patool $c2patool_version into $venv/c2patool (about 15 CPU-minutes the first time)"
  env -u CARGO_TARGET_DIR cargo install --quiet --locked --no-default-features \
    --version "$c2patool_version" --root "$venv/c2patool" c2patool
fi
"$venv/bin/python" -c 'import torch; assert torch.__version__.startswith("2.11.0"), torch.__version__' \
  || { echo "setup: the virtualenv does not hold torch 2.11.0" >&2; exit 1; }
echo "setup: ok ($venv, torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)'))"
