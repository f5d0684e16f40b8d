#!/usr/bin/env bash
# The whole test suite: set up (idempotent), make sure the local services are up, check
# formatting, run every test.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh
scripts/services.sh
cargo fmt --check
scripts/check_ops.sh
cargo test --all-targets --no-fail-fast "$@"
