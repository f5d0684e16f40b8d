#!/usr/bin/env bash
# Soak run: two workers (built with $R2F_PROFILE, default release) on the bundled tiny model
# against the local RabbitMQ and Redis and an in-process S3, N messages (about 10% malformed in
# eight ways), kill -9 of a worker twice, an S3 outage, every broker connection cut once, then
# SIGTERM. Prints what happened to every job (tests/soak.rs). Usage: scripts/soak.sh [N] [OUTAGE_SECS]   (defaults: 500, 30)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh >/dev/null
# shellcheck source=scripts/env.sh
source scripts/env.sh
scripts/services.sh >/dev/null
export R2F_SOAK_JOBS=${1:-500}
export R2F_SOAK_OUTAGE_SECS=${2:-30}
cargo test --profile "$R2F_PROFILE" --test soak -- --nocapture --test-threads 1 2>&1 | grep -E '^soak:|test result|panicked|FAILED'
