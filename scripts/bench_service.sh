#!/usr/bin/env bash
# Service benchmark with the bundled tiny model: starts a worker on the local RabbitMQ/Redis
# (its own queue names, local-folder storage), pushes N plain jobs through the broker and prints
# jobs per second and the per-job overhead of everything but the model.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh >/dev/null
# shellcheck source=scripts/env.sh
source scripts/env.sh
scripts/services.sh >/dev/null
# R2F_BIN: benchmark another build (for example an older commit's) instead of building.
if [ -n "${R2F_BIN:-}" ]; then
  r2f=$R2F_BIN
else
  cargo build --profile "$R2F_PROFILE" --bin r2f -q
  r2f=$(r2f_bin)
fi
jobs=${1:-100}
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
name="bench$$"
r2f_worker_toml "$name" tiny "$root/tests/fixtures/sd3-tiny-a" "$work/storage" 127.0.0.1:0 \
  'device = "cpu"' 'dtype = "fp32"' 'progress_interval_ms = 1000000' >"$work/config.toml"
"$r2f" worker --config "$work/config.toml" 2>"$work/worker.log" &
pid=$!
for _ in $(seq 1 300); do
  grep -q consuming "$work/worker.log" && break
  sleep 0.2
done
grep -q consuming "$work/worker.log" || { cat "$work/worker.log"; exit 1; }
"$r2f" bench-service --config "$work/config.toml" --jobs "$jobs"
