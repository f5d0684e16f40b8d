#!/usr/bin/env bash
# The one command to run on a lent GPU machine (docs/gpu.md says how to get it there). It builds
# nothing: it takes the release binary built elsewhere (R2F_BIN, default target/release/r2f) and
# the repository's bundled fixtures, and in a few minutes measures:
#   1. CUDA visible through tch;
#   2. the tiny-model parity cases on CUDA in fp32 (expected within 1e-4 of the CPU references)
#      and in fp16 (reported);
#   3. `r2f bench` for SD3-medium and SDXL at 1024² (ms per denoising step, VAE decode, memory);
#   4. `r2f bench --e2e` for both (whole plain and R2F jobs, and an R2F+ job with 2 objects for
#      SD3; random weights built on the device);
#   3b. the anchors: diffusers' SD3 transformer and SDXL UNet, eager and under torch.compile, at
#      the same shapes, dtype and card as step 3 (scripts/diffusers_anchor.py), with the ratio
#      r2f / diffusers and the attention kernel each side picks. diffusers travels as wheels:
#      put them in .whl/ (see docs/gpu.md) and carry it; they are installed to /tmp/site;
# then prints one short table and leaves every report as JSON under $OUT.
#
#   scripts/gpu_check.sh              # on the GPU machine
#   scripts/gpu_check.sh --cpu-smoke  # the same steps with the tiny presets on the CPU (the test
#                                     # suite runs this, so the script cannot rot)
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
mode=gpu
if [ "${1:-}" = --cpu-smoke ]; then
  mode=cpu
elif [ -n "${1:-}" ]; then
  echo "usage: $0 [--cpu-smoke]" >&2
  exit 2
fi
bin=${R2F_BIN:-$root/target/release/r2f}
# A gzip-compressed binary (what travels best: the working tree that goes to a lent machine is
# limited to 64 MiB) is unpacked first.
if [ "${bin%.gz}" != "$bin" ] && [ -f "$bin" ]; then
  unpacked=$(mktemp -d)/r2f
  gunzip -c "$bin" >"$unpacked" && chmod +x "$unpacked" && bin=$unpacked
fi
if [ ! -x "$bin" ]; then
  echo "gpu_check: no r2f binary at $bin (build it with cargo build --release, or set R2F_BIN)" >&2
  exit 2
fi
# Every step writes its log and JSON report into a work folder; what is left under $OUT at the end
# is one combined report (gpu_check.json) and one archive of the logs (gpu_check_logs.tar.gz):
# a lent machine hands back at most 8 files.
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
work=$(mktemp -d)
py=$(command -v python3 || true)

if [ "$mode" = gpu ]; then
  # The image's libtorch (docs/gpu.md): the binary was linked against the same 2.11.0 build.
  # The image's torch is in python3 or in /opt/torch/.venv (docs/gpu.md).
  # The machine may set LD_LIBRARY_PATH already (the NVIDIA driver's folders): libtorch's
  # folder goes in front of whatever is there.
  for p in "$py" /opt/torch/.venv/bin/python3 /usr/bin/python3; do
    [ -n "$p" ] && [ -x "$p" ] || continue
    lib=$("$p" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null || true)
    if [ -n "$lib" ]; then
      export LD_LIBRARY_PATH=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
      py=$p # the Python with torch runs the diffusers anchors too
      break
    fi
  done
  echo "gpu_check: LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-unset}" >&2
  device=cuda
  sd3=sd3 sdxl=sdxl size=1024 half=fp16 steps=20 warmup=3 plain_steps="" r2f_steps=50
  bench_dtype=fp16 compile=default
  # diffusers and what it needs, as wheels carried in .whl/ (pure Python, or built for the
  # image's Python): installed beside the image's torch, never over it.
  if ls "$root"/.whl/*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$root"/.whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
else
  device=cpu
  # bf16 stands in for fp16 on the CPU (the half-precision path of every op).
  sd3=sd3-tiny sdxl=sdxl-tiny size=64 half=bf16 steps=2 warmup=1 plain_steps="--plain-steps 2" r2f_steps=4
  # Dynamo without inductor: the compile path in seconds. The project's virtualenv has torch and
  # diffusers.
  bench_dtype=fp32 compile=eager-backend
  [ -x "${R2F_VENV:-}/bin/python" ] && py=$R2F_VENV/bin/python
fi

# The table, from the JSON reports (python3's standard library only).
summarize() { # [quiet]: writes gpu_check.json and the logs archive under $OUT; prints the table unless quiet
  tar czf "$out/gpu_check_logs.tar.gz" -C "$work" .
  [ -n "$py" ] || return 0
  "$py" - "$work" "$sd3" "$sdxl" "$half" "$out/gpu_check.json" "${1:-}" <<'EOF'
import glob, json, os, sys
work, sd3, sdxl, half, combined, quiet = sys.argv[1:7]
reports = {}
for p in sorted(glob.glob(os.path.join(work, "*.json"))):
    try:
        reports[os.path.basename(p)[:-5]] = json.load(open(p))
    except (OSError, ValueError):
        pass  # a step cut short mid-write
json.dump(reports, open(combined, "w"), indent=1)
if quiet:
    sys.exit(0)
def load(name):
    return reports.get(name[:-5])
rows = []
for dt in ("fp32", "fp32-tf32", half):
    r = load(f"parity-{dt}.json")
    if r:
        worst = max(c["latents_rel_err"] for c in r["cases"])
        pix = min(c["pixels_within_1"] for c in r["cases"])
        rows.append((f"parity {dt} ({r['device']})", f"worst latents rel err {worst:.2e}, pixels within 1 >= {pix*100:.2f}%"))
for m in (sd3, sdxl):
    r = load(f"bench-{m}.json")
    if r:
        mem = r.get("peak_gpu_bytes")
        mem = f", peak {mem/2**30:.1f} GiB" if mem else ""
        att = r.get("attention") or {}
        rows.append((f"bench {m} {r['width']}x{r['height']} {r['dtype']}", f"{r['ms_per_step']:.1f} ms/step, VAE decode {r['vae_decode_ms']:.0f} ms{mem}; SDPA {att.get('sdp_backend')}"))
for m in (sd3, sdxl):
    a, b = load(f"anchor-{m}.json"), load(f"bench-{m}.json")
    if a:
        own = b["ms_per_step"] if b else None
        cells = []
        for side in ("eager", "compiled"):
            if side in a:
                ms = a[side]["ms_per_step"]
                ratio = f", r2f/{side} {own / ms:.2f}" if own else ""
                extra = f" (compile {a[side]['warmup_s']:.0f} s)" if side == "compiled" else ""
                cells.append(f"{side} {ms:.1f} ms{extra}{ratio}")
        att = a.get("attention", {})
        cells.append(f"SDPA {att.get('sdp_backend')} at {att.get('shape')}, cuDNN {att.get('cudnn_version')}")
        rows.append((f"anchor {m} diffusers {a['diffusers']} {a['dtype']}", "; ".join(cells)))
for m in (sd3, sdxl):
    r = load(f"e2e-{m}.json")
    if r:
        for j in r["jobs"]:
            rows.append((f"e2e {m} {j['job']} {j['steps']} steps", f"total {j['total_s']:.2f} s (encode {j['encode_s']:.2f}, denoise {j['denoise_s']:.2f}, guidance {j['guidance_s']:.2f}, decode {j['decode_s']:.2f}, png {j['png_s']:.2f})"))
        mem = r.get("peak_gpu_bytes")
        if mem:
            rows.append((f"e2e {m} peak GPU memory", f"{mem/2**30:.1f} GiB"))
w = max((len(a) for a, _ in rows), default=0)
print(f"gpu_check summary ({combined})")
for a, b in rows:
    print(f"  {a:<{w}}  {b}")
EOF
}

failures=0
step() { # name, command...: runs one step, its output to $work/<name>.log, notes a failure
  local name=$1
  shift
  local t0=$SECONDS
  echo "== $name: $*" >&2
  if "$@" >"$work/$name.log" 2>&1; then
    echo "   ok ($((SECONDS - t0)) s)" >&2
  else
    echo "   FAILED ($((SECONDS - t0)) s), see $name.log in $out/gpu_check_logs.tar.gz:" >&2
    tail -5 "$work/$name.log" >&2
    failures=$((failures + 1))
  fi
  # What is done so far is under $OUT after every step: a call cut short by its time limit
  # still hands back the steps that finished.
  summarize quiet
}

# 0. The machine, for the record (GPU mode; best effort).
if [ "$mode" = gpu ] && command -v nvidia-smi >/dev/null; then
  nvidia-smi >"$work/nvidia-smi.log" 2>&1 || true
fi
# 1. CUDA through tch: a one-step bench on the device fails at once when libtorch sees no GPU.
step device "$bin" bench --model sd3-tiny --device "$device" --width 64 --height 64 --steps 1 --warmup 0 \
  --json "$work/device.json"
# 2. Parity: fp32 within 1e-4 of the CPU references; the half type reported.
#    cuDNN runs fp32 convolutions in TF32 by default (PyTorch's default too: the SDXL UNet's convs
#    then land about 5e-4 from the fp32 references); NVIDIA_TF32_OVERRIDE=0 turns TF32 off in
#    every CUDA library for this step, so fp32 means fp32.
step parity-fp32 env NVIDIA_TF32_OVERRIDE=0 "$bin" parity --device "$device" --dtype fp32 --tolerance 1e-4 --json "$work/parity-fp32.json"
step parity-fp32-tf32 "$bin" parity --device "$device" --dtype fp32 --json "$work/parity-fp32-tf32.json"
step "parity-$half" "$bin" parity --device "$device" --dtype "$half" --json "$work/parity-$half.json"
# 3. Denoiser and VAE speed.
for m in "$sd3" "$sdxl"; do
  step "bench-$m" "$bin" bench --model "$m" --device "$device" --dtype "$bench_dtype" --width "$size" --height "$size" \
    --steps "$steps" --warmup "$warmup" --json "$work/bench-$m.json"
done
# 3b. The diffusers anchors at the shapes of step 3 (same card, same call).
for m in "$sd3" "$sdxl"; do
  step "anchor-$m" "$py" scripts/diffusers_anchor.py --preset "$m" --device "$device" --dtype "$bench_dtype" \
    --width "$size" --height "$size" --steps "$steps" --warmup "$warmup" --compile "$compile" \
    --json "$work/anchor-$m.json"
done
# 4. Whole jobs (R2F+ for SD3; a non-square smoke size runs it in clean mode, few steps).
e2e_h=$size
[ "$mode" = cpu ] && e2e_h=48
# shellcheck disable=SC2086
step "e2e-$sd3" "$bin" bench --e2e --r2fplus --model "$sd3" --device "$device" --width "$size" --height "$e2e_h" \
  --r2f-steps "$r2f_steps" $plain_steps --json "$work/e2e-$sd3.json"
# shellcheck disable=SC2086
step "e2e-$sdxl" "$bin" bench --e2e --model "$sdxl" --device "$device" --width "$size" --height "$e2e_h" \
  --r2f-steps "$r2f_steps" $plain_steps --json "$work/e2e-$sdxl.json"

# 5. Optional (COLD_START=1, GPU mode): write a random-weight SD3-medium folder (15 GB, fp16) and
#    time a process from start to its first image with it: the model load (logged as "SD3 model
#    loaded seconds=…") is what a worker's cold start adds to the broker connection (no broker
#    runs on the lent machine; scripts/cold_start.sh measures the whole /readyz path elsewhere).
if [ "${COLD_START:-0}" = 1 ] && [ "$mode" = gpu ]; then
  cold_dir=${COLD_START_DIR:-/tmp/r2f-sd3-medium-random}
  [ -f "$cold_dir/model_index.json" ] ||
    step write-model "$bin" bench --write-model "$cold_dir" --model sd3 --dtype fp16 --device cpu
  t0=$(date +%s.%N)
  step cold-start "$bin" generate --model "$cold_dir" --device cuda --dtype fp16 --steps 1 \
    --prompt "a furry frog warrior" --out "$work/cold-start.png"
  echo "   process start to first image: $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s;" \
    "$(grep -o 'SD3 model loaded seconds=[0-9.]*' "$work/cold-start.log" || true)" >&2
fi

summarize && rm -rf "$work"
echo "gpu_check: $failures failed step(s); reports in $out (gpu_check.json, gpu_check_logs.tar.gz)" >&2
[ "$failures" -eq 0 ]
