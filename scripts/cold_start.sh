#!/usr/bin/env bash
# Cold start of a worker: seconds from process start to the first HTTP 200 of /readyz (model
# loaded, broker connected, consuming), with a model folder on local disk.
#
#   scripts/cold_start.sh MODEL_DIR [DEVICE] [DTYPE]     # e.g. /var/tmp/sd3 cpu bf16
#
# MODEL_DIR: a diffusers-layout folder, for example the random-weight SD3-medium one written by
#   r2f bench --write-model /var/tmp/sd3 --model sd3 --dtype fp16
# It uses the local RabbitMQ and its own queue names; storage is a temporary folder. R2F_BIN
# chooses the binary (default: the $R2F_PROFILE build). The page cache is as it is: run it twice
# to see a warm start, after `echo 3 > /proc/sys/vm/drop_caches` (root) for a cold one.
# WARMUP=false skips the worker's warm-up step (a full-size 1024² step takes minutes on a CPU):
# then the figure is process start to ready without it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
model=${1:?usage: scripts/cold_start.sh MODEL_DIR [DEVICE] [DTYPE]}
device=${2:-auto}
dtype=${3:-auto}
model=$(cd "$model" && pwd)
# shellcheck source=scripts/env.sh
source scripts/env.sh
r2f=${R2F_BIN:-$(r2f_bin)}
scripts/services.sh >/dev/null
work=$(mktemp -d)
port=$((20000 + RANDOM % 20000))
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; [ -n "${R2F_KEEP_LOG:-}" ] && cp "$work/worker.log" "$R2F_KEEP_LOG"; rm -rf "$work"' EXIT
name="cold$$"
r2f_worker_toml "$name" cold "$model" "$work/storage" "127.0.0.1:$port" \
  "device = \"$device\"" "dtype = \"$dtype\"" "warmup = ${WARMUP:-true}" >"$work/config.toml"
ready() {
  if command -v curl >/dev/null; then
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/readyz")" = 200 ]
  else
    python3 -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:$port/readyz', timeout=1).status == 200 else 1)" 2>/dev/null
  fi
}
start=$(date +%s.%N)
"$r2f" worker --config "$work/config.toml" 2>"$work/worker.log" &
pid=$!
until ready; do
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "cold_start: the worker exited before it was ready:" >&2
    tail -20 "$work/worker.log" >&2
    exit 1
  fi
  sleep 0.05
done
end=$(date +%s.%N)
loaded=$(grep -o '"seconds":[0-9.]*\|seconds=[0-9.]*' "$work/worker.log" | head -1 | grep -o '[0-9.]*$' || true)
size=$(du -sb "$model" | cut -f1)
warm=$(grep -o 'warm-up step done seconds=[0-9.]*' "$work/worker.log" | grep -o '[0-9.]*$' || true)
printf 'cold start: %.2f s to /readyz (model load %s s, warm-up step %s; %s, %.1f GB on disk, device %s, dtype %s)\n' \
  "$(echo "$end - $start" | bc -l)" "${loaded:-?}" "${warm:-skipped}${warm:+ s}" "$model" "$(echo "$size / 1000000000" | bc -l)" "$device" "$dtype"
