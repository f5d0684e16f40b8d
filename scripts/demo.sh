#!/usr/bin/env bash
# The main job on a fresh machine: set up, build, start the worker daemon against the local
# RabbitMQ and Redis with the bundled tiny SD3 model (config/demo.toml), enqueue the sample jobs
# (config/demo-jobs.jsonl: plain, R2F with plans, R2F+ with a plan, one invalid job), wait for their results and
# print where the images are; then drain the worker with SIGTERM.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh
scripts/services.sh
cargo build --profile "$R2F_PROFILE" --bin r2f
r2f=$(r2f_bin)
config=${R2F_DEMO_CONFIG:-config/demo.toml}
jobs=${R2F_DEMO_JOBS:-config/demo-jobs.jsonl}
storage=out/demo-storage
mkdir -p out
# Results of an earlier run would be re-published, not generated again: start clean.
rm -rf "$storage"

"$r2f" worker --config "$config" 2> out/demo-worker.log &
worker=$!
trap 'kill -TERM "$worker" 2>/dev/null || true' EXIT
echo "demo: worker started (pid $worker, log out/demo-worker.log); waiting until ready"
for _ in $(seq 1 600); do
  curl -fs http://127.0.0.1:9464/readyz >/dev/null 2>&1 && break
  kill -0 "$worker" 2>/dev/null || { cat out/demo-worker.log; exit 1; }
  sleep 0.5
done
# enqueue checks every line as a worker would and refuses the invalid one (exit 65)...
"$r2f" enqueue --config "$config" "$jobs" || echo "demo: enqueue refused the invalid line (exit $?)"
# ...which is sent once more unchecked, to show how a worker rejects and dead-letters a job.
grep '"demo-invalid"' "$jobs" | "$r2f" enqueue --config "$config" --no-validate - || true

ids=$(grep -o '"id": *"[^"]*"' "$jobs" | sed 's/.*"\([^"]*\)"$/\1/' | grep -v invalid)
echo "demo: waiting for $(echo "$ids" | wc -w) results"
for _ in $(seq 1 1200); do
  missing=0
  for id in $ids; do [ -f "$storage/$id/result.json" ] || missing=1; done
  [ "$missing" = 0 ] && break
  sleep 0.5
done
for id in $ids; do
  if [ -f "$storage/$id/result.json" ]; then
    echo "demo: $id: $(grep -o '"status": *"[^"]*"' "$storage/$id/result.json" | head -1)"
    ls "$root/$storage/$id/"*.png | sed 's/^/        /'
  else
    echo "demo: $id: no result (see out/demo-worker.log)"
  fi
done
echo "demo: the invalid job was dead-lettered to r2f.demo.jobs.dead:"
grep -h "dead-lettered" out/demo-worker.log | tail -1 || true
echo "demo: metrics at http://127.0.0.1:9464/metrics; draining the worker"
kill -TERM "$worker"
wait "$worker" || true
trap - EXIT
