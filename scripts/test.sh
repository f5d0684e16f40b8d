#!/usr/bin/env bash
# The whole test suite: set up (idempotent), make sure the local services are up, check
# formatting, run every test.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh
# The reference C2PA validator tests/c2pa.rs checks signed images with (scripts/setup.sh).
export R2F_C2PATOOL=${R2F_C2PATOOL:-$R2F_VENV/c2patool/bin/c2patool}
scripts/services.sh
cargo fmt --check
scripts/check_ops.sh
cargo test --all-targets --no-fail-fast "$@"
# The broker-facing tests again with quorum queues (README, "Quorum queues").
R2F_TEST_QUEUE_TYPE=quorum cargo test --no-fail-fast --test worker --test fleet \
  --test worker_faults --test soak --test drain --test replay "$@"
