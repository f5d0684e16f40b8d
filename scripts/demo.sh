#!/usr/bin/env bash
# The main job on a fresh machine, for now: set up, build, and generate one image with the bundled
# tiny SD3 model (random weights: the picture is noise-like, the pipeline is the real one). Pass
# R2F_DEMO_MODEL=<folder, Hub id or logical name> to use a real model.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh
cargo build --release
model=${R2F_DEMO_MODEL:-tests/fixtures/sd3-tiny-a}
mkdir -p out
target/release/r2f generate --model "$model" --prompt "A hairy frog warrior holding a tiny golden sword" \
  --seed 42 --out out/demo.png "$@"
echo "demo: image written to $root/out/demo.png"
