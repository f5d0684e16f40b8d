#!/usr/bin/env python3
"""Side-by-side CPU benchmark: ms per denoising step of r2f and of diffusers (eager), on the same
models with the same random weights, loaded by both from one folder.

Usage (the project's virtualenv: torch, diffusers, safetensors):
    /var/cache/r2f/venv/bin/python scripts/bench_vs_diffusers.py [--r2f PATH] [--dir DIR]
        [--only sd3|sdxl] [--width 512] [--height 512] [--steps 3] [--warmup 1]
        [--repeats 3] [--threads N] [--json FILE]

Models (random weights, fp32, written once with save_pretrained into --dir and reused while the
config and seed stay the same; --regenerate rewrites them):
  * <dir>/sd3/transformer/  an SD3Transformer2DModel of 4 joint blocks at SD3-medium width
    (24 heads x 64, joint_attention_dim 4096, caption_projection_dim 1536, pooled 2048, 16
    channels, patch 2, sample_size 128, pos_embed_max_size 192);
  * <dir>/sdxl/unet/        an SDXL-shaped UNet2DConditionModel at reduced width: channels
    [192, 384, 768] with [3, 6, 12] heads (SDXL's 64 per head), transformer_layers_per_block
    [1, 2, 2], SDXL's block types, "text_time" added embeddings (256, 2816), cross-attention
    2048, linear projections.
Every parameter is drawn from torch.manual_seed(SEED): matrices and conv kernels
N(0, 1/fan_in) (variance preserving, so activations stay O(1): no overflow, no denormals),
biases N(0, 0.02), norm scales 1 + N(0, 0.02); zero-initialised layers (adaLN, proj_out,
conv_out, ...) are therefore non-zero too.  Buffers (SD3's sincos pos_embed) keep their values.

One step, on both sides, is what `r2f bench` times (src/bench/mod.rs): classifier-free guidance at
batch 2 (latents [1, C, H/8, W/8] concatenated twice), one denoiser forward with random
conditioning of batch 2 (SD3: context [2, --context-tokens, 4096], pooled [2, 2048]; SDXL:
context [2, 77, 2048], text_embeds [2, 1280], time_ids [2, 6] = (H, W, 0, 0, H, W)), timestep
the flow-match (shift 3) schedule's t_i expanded to 2, CFG combine `u + (c - u) * 7`, and the
Euler update `(x.float() + v.float() * (sigma_{i+1} - sigma_i)).to(x.dtype)`.  K warm-up steps
run first (step index i % N), then N timed steps from the initial latents.  The diffusers side
runs under torch.no_grad() (as r2f's no_grad_guard and diffusers' pipelines; --inference-mode
switches to torch.inference_mode()), eager, no torch.compile.

r2f side: `r2f bench --model sd3|sdxl --weights <dir>/<model> --device cpu --dtype fp32 ...`
in a subprocess with LD_LIBRARY_PATH set to this torch's lib folder, and OMP_NUM_THREADS /
MKL_NUM_THREADS = --threads (libtorch's default intra-op thread count follows them:
at::intraop_default_num_threads reads OMP_NUM_THREADS, then MKL_NUM_THREADS).  The diffusers
side calls torch.set_num_threads(--threads).  r2f bench also decodes the latents with a
random VAE after the timed steps; that is outside its ms_per_step.

Runs are interleaved (r2f, diffusers, r2f, diffusers, ...) --repeats times per model; the table
shows the medians and the ratio r2f / diffusers (< 1: r2f faster), with min-max spread.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SEED = 0
# Bump when the weight initialisation changes, so that cached model folders are rewritten.
INIT_VERSION = 1
GUIDANCE = 7.0

SD3_CONFIG = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 4,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
}

SDXL_CONFIG = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [192, 384, 768],
    "layers_per_block": 2,
    # diffusers' naming quirk, as in SDXL's config: these are head counts (64 per head here).
    "attention_head_dim": [3, 6, 12],
    "transformer_layers_per_block": [1, 2, 2],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}

SDXL_CONTEXT_TOKENS = 77  # what `r2f bench --model sdxl` uses, whatever --context-tokens says


def log(msg: str) -> None:
    print(f"[bench_vs_diffusers] {msg}", file=sys.stderr, flush=True)


def machine_busy_s() -> float | None:
    """CPU seconds the whole machine spent busy since boot (/proc/stat, all cores)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(v) for v in fields[:8]]
    busy = sum(ticks) - ticks[3] - ticks[4]  # minus idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and its waited-for children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class ForeignLoad:
    """The cores that OTHER processes kept busy while a run lasted: the machine's busy CPU time
    minus this process's and its children's, over the wall time.  Near 0 on a quiet machine."""

    def __enter__(self):
        self.m0, self.o0, self.t0 = machine_busy_s(), own_cpu_s(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        m1, o1, wall = machine_busy_s(), own_cpu_s(), time.perf_counter() - self.t0
        self.cores = (None if self.m0 is None or m1 is None
                      else max(0.0, ((m1 - self.m0) - (o1 - self.o0)) / wall))
        return False


def idle_fraction(seconds: float = 3.0) -> float | None:
    m0, t0 = machine_busy_s(), time.perf_counter()
    time.sleep(seconds)
    m1, wall = machine_busy_s(), time.perf_counter() - t0
    if m0 is None or m1 is None:
        return None
    return 1.0 - (m1 - m0) / (wall * os.cpu_count())


def default_r2f() -> str:
    root = Path(__file__).resolve().parent.parent
    candidates = []
    target = os.environ.get("CARGO_TARGET_DIR")
    if target:
        candidates += [Path(target) / "debug" / "r2f", Path(target) / "release" / "r2f"]
    candidates += [root / "target" / "release" / "r2f", root / "target" / "debug" / "r2f"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return str(candidates[0])


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--r2f", default=default_r2f(),
                   help="the r2f binary (default: $CARGO_TARGET_DIR/debug/r2f, then "
                        "$CARGO_TARGET_DIR/release/r2f, target/release/r2f, target/debug/r2f)")
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "r2f-bench-vs-diffusers"),
                   help="folder of the random-weight models (written when missing or stale)")
    p.add_argument("--only", choices=["sd3", "sdxl"], help="one model only (default: both)")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="timed denoising steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs of each side")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="intra-op threads of both sides (default: all usable cores)")
    p.add_argument("--context-tokens", type=int, default=333,
                   help="SD3 context length (77 CLIP + 256 T5); SDXL always uses 77")
    p.add_argument("--inference-mode", action="store_true",
                   help="diffusers under torch.inference_mode() instead of torch.no_grad()")
    p.add_argument("--regenerate", action="store_true", help="rewrite the model folders")
    p.add_argument("--r2f-timeout", type=float, default=3600.0, help="seconds per r2f run")
    p.add_argument("--json", type=Path, help="write everything measured here")
    a = p.parse_args()
    if a.width <= 0 or a.height <= 0 or a.width % 16 or a.height % 16:
        p.error("--width and --height must be positive multiples of 16")
    if a.steps < 1 or a.warmup < 0 or a.repeats < 1 or a.threads < 1:
        p.error("--steps, --repeats and --threads must be >= 1, --warmup >= 0")
    return a


# ---------------------------------------------------------------------------------------------
# Models with random weights


def randomize(model) -> dict:
    """Draws every parameter (see the module docstring); returns counts for the report."""
    import torch

    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm)
    norm_params = set()
    for m in model.modules():
        if isinstance(m, norm_types) or type(m).__name__ in ("RMSNorm", "LayerNorm", "GroupNorm"):
            for name, q in m.named_parameters(recurse=False):
                if name == "weight":
                    norm_params.add(id(q))
    counts = {"matrices": 0, "biases": 0, "norm_scales": 0, "other_1d": 0, "parameters": 0}
    with torch.no_grad():
        for _, q in model.named_parameters():
            counts["parameters"] += q.numel()
            if id(q) in norm_params:
                q.normal_(1.0, 0.02)
                counts["norm_scales"] += 1
            elif q.dim() >= 2:
                fan_in = q[0].numel()
                q.normal_(0.0, fan_in ** -0.5)
                counts["matrices"] += 1
            else:
                q.normal_(0.0, 0.02)
                counts["biases" if q.dim() == 1 else "other_1d"] += 1
    return counts


def marker_for(kind: str, config: dict) -> dict:
    return {"model": kind, "config": config, "seed": SEED, "init_version": INIT_VERSION}


def ensure_model(kind: str, root: Path, regenerate: bool) -> dict:
    """Writes <root>/<kind>/{transformer,unet}/ unless an identical one is there."""
    import torch

    sub = "transformer" if kind == "sd3" else "unet"
    config = SD3_CONFIG if kind == "sd3" else SDXL_CONFIG
    folder = root / kind / sub
    marker_path = root / kind / "bench_vs_diffusers.json"
    want = marker_for(kind, config)
    if not regenerate and marker_path.is_file() and (folder / "config.json").is_file():
        try:
            have = json.loads(marker_path.read_text())
        except json.JSONDecodeError:
            have = None
        if have and {k: have.get(k) for k in want} == want:
            log(f"{kind}: reusing {folder}")
            return have
    log(f"{kind}: writing random weights (seed {SEED}) to {folder}")
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    torch.manual_seed(SEED)
    cls = SD3Transformer2DModel if kind == "sd3" else UNet2DConditionModel
    model = cls(**config).eval()  # float32: torch's default dtype
    counts = randomize(model)
    sanity = sanity_forward(kind, model)
    log(f"{kind}: {counts['parameters'] / 1e6:.1f}M parameters; tiny forward: {sanity}")
    if not sanity["finite"]:
        raise SystemExit(f"{kind}: the random model's output is not finite")
    marker_path.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.safetensors*"):
        old.unlink()
    model.save_pretrained(folder, safe_serialization=True)
    del model
    gc.collect()
    info = dict(want, parameter_counts=counts, tiny_forward=sanity,
                files=sorted(p.name for p in folder.iterdir()))
    marker_path.write_text(json.dumps(info, indent=2) + "\n")
    return info


def sanity_forward(kind: str, model) -> dict:
    """One forward at a tiny size: finite, and not collapsed to ~0."""
    import torch

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if kind == "sd3":
            c = model.config
            out = model(
                hidden_states=torch.randn(1, c.in_channels, 16, 16, generator=g),
                encoder_hidden_states=torch.randn(1, 8, c.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g),
                timestep=torch.tensor([500.0]),
                return_dict=False,
            )[0]
        else:
            c = model.config
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            out = model(
                torch.randn(1, c.in_channels, 32, 32, generator=g),
                torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 8, c.cross_attention_dim, generator=g),
                added_cond_kwargs={
                    "text_embeds": torch.randn(1, pooled, generator=g),
                    "time_ids": torch.tensor([[256.0, 256.0, 0.0, 0.0, 256.0, 256.0]]),
                },
                return_dict=False,
            )[0]
    return {"finite": bool(torch.isfinite(out).all()), "std": float(out.std()),
            "abs_max": float(out.abs().max())}


# ---------------------------------------------------------------------------------------------
# The r2f side


def r2f_env(threads: int) -> dict:
    import torch

    env = dict(os.environ)
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    env["LD_LIBRARY_PATH"] = lib + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    return env


def run_r2f(a: argparse.Namespace, kind: str, root: Path, env: dict) -> dict:
    context = a.context_tokens if kind == "sd3" else SDXL_CONTEXT_TOKENS
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r2f.json"
        cmd = [a.r2f, "bench", "--model", kind, "--weights", str(root / kind),
               "--device", "cpu", "--dtype", "fp32",
               "--width", str(a.width), "--height", str(a.height),
               "--steps", str(a.steps), "--warmup", str(a.warmup),
               "--context-tokens", str(context), "--json", str(out)]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        # The most OS threads the process had (the OpenMP pool is threads - 1 of them, plus
        # the runtime's own): a check that OMP_NUM_THREADS reached libtorch.
        max_threads = [0]
        stop = threading.Event()

        def watch() -> None:
            task = Path(f"/proc/{proc.pid}/task")
            while not stop.wait(0.25):
                try:
                    max_threads[0] = max(max_threads[0], len(os.listdir(task)))
                except OSError:
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            stdout, stderr = proc.communicate(timeout=a.r2f_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            raise SystemExit(f"r2f bench timed out after {a.r2f_timeout} s:\n{stderr[-4000:]}")
        finally:
            stop.set()
            watcher.join()
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise SystemExit(
                f"r2f bench failed (exit {proc.returncode}): {' '.join(cmd)}\n{stderr[-4000:]}")
        report = json.loads(out.read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "ms_per_step": float(report["ms_per_step"]),
        "report": report,
        "process_wall_s": wall,
        "process_cpu_s": cpu,
        "process_max_os_threads": max_threads[0],
        "command": cmd,
    }


# ---------------------------------------------------------------------------------------------
# The diffusers side


class DiffusersSide:
    """The model loaded from the same folder, and the same random inputs r2f bench draws."""

    def __init__(self, a: argparse.Namespace, kind: str, root: Path):
        import torch
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.a, self.kind = a, kind
        dtype = torch.float32
        t0 = time.perf_counter()
        if kind == "sd3":
            from diffusers import SD3Transformer2DModel

            self.model = SD3Transformer2DModel.from_pretrained(root / "sd3" / "transformer",
                                                               torch_dtype=dtype)
        else:
            from diffusers import UNet2DConditionModel

            self.model = UNet2DConditionModel.from_pretrained(root / "sdxl" / "unet",
                                                              torch_dtype=dtype)
        self.model.eval()
        # What a step calls (scripts/diffusers_anchor.py puts torch.compile's wrapper here).
        self.forward = self.model
        self.load_s = time.perf_counter() - t0
        c = self.model.config
        self.attn_processors = sorted({type(p).__name__ for p in self.model.attn_processors.values()})
        # SD3's scheduler (shift 3), as r2f's FlowMatchSchedule reproduces it; r2f bench uses it
        # for the SDXL UNet too.
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        sched.set_timesteps(a.steps)
        self.timesteps = sched.timesteps.to(dtype)
        self.dts = [float(sched.sigmas[i + 1] - sched.sigmas[i]) for i in range(a.steps)]
        torch.manual_seed(SEED)
        lh, lw = a.height // 8, a.width // 8
        if kind == "sd3":
            self.context = torch.randn(2, a.context_tokens, c.joint_attention_dim, dtype=dtype)
            self.pooled = torch.randn(2, c.pooled_projection_dim, dtype=dtype)
        else:
            self.context = torch.randn(2, SDXL_CONTEXT_TOKENS, c.cross_attention_dim, dtype=dtype)
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            self.pooled = torch.randn(2, pooled, dtype=dtype)
            h, w = float(a.height), float(a.width)
            self.time_ids = torch.tensor([[h, w, 0.0, 0.0, h, w]], dtype=dtype).repeat(2, 1)
        self.latents = torch.randn(1, c.in_channels, lh, lw, dtype=dtype)

    def step(self, x, i: int):
        """One CFG step (guidance 7) and the flow-matching Euler update, as r2f bench's."""
        import torch

        t = self.timesteps[i : i + 1].expand(2)
        inp = torch.cat([x, x], 0)
        if self.kind == "sd3":
            v = self.forward(hidden_states=inp, timestep=t, encoder_hidden_states=self.context,
                             pooled_projections=self.pooled, return_dict=False)[0]
        else:
            v = self.forward(inp, t, encoder_hidden_states=self.context,
                             added_cond_kwargs={"text_embeds": self.pooled,
                                                "time_ids": self.time_ids},
                             return_dict=False)[0]
        uncond, cond = v.chunk(2, 0)
        guided = uncond + (cond - uncond) * GUIDANCE
        return (x.to(torch.float32) + guided.to(torch.float32) * self.dts[i]).to(x.dtype)

    def run(self) -> dict:
        import torch

        mode = torch.inference_mode() if self.a.inference_mode else torch.no_grad()
        with mode:
            x = self.latents
            for i in range(self.a.warmup):
                x = self.step(x, i % self.a.steps)
            x = self.latents
            t0 = time.perf_counter()
            for i in range(self.a.steps):
                x = self.step(x, i)
            elapsed = time.perf_counter() - t0
        return {"ms_per_step": elapsed * 1e3 / self.a.steps, "denoise_ms": elapsed * 1e3,
                "final_latents_finite": bool(torch.isfinite(x).all())}


# ---------------------------------------------------------------------------------------------


def busy_note(run: dict) -> str:
    c = run.get("foreign_cores")
    return f"; other processes kept {c:.2f} cores busy meanwhile" if c and c > 0.1 else ""


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": values}


def versions(a: argparse.Namespace) -> dict:
    import diffusers
    import safetensors
    import torch

    try:
        import transformers

        tv = transformers.__version__
    except Exception:  # noqa: BLE001 - optional here
        tv = None
    root = Path(__file__).resolve().parent.parent
    git = {}
    with contextlib.suppress(Exception):
        git["commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                                       capture_output=True, text=True, check=True).stdout.strip()
        git["dirty"] = bool(subprocess.run(["git", "-C", str(root), "status", "--porcelain"],
                                           capture_output=True, text=True).stdout.strip())
    cpu = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    r2f = Path(a.r2f)
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": tv,
        "safetensors": safetensors.__version__,
        "torch_parallel_info": torch.__config__.parallel_info(),
        "cpu": cpu,
        "usable_cores": len(os.sched_getaffinity(0)),
        "r2f_binary": str(r2f),
        "r2f_binary_mtime": time.strftime("%Y-%m-%dT%H:%M:%S",
                                          time.localtime(r2f.stat().st_mtime)),
        "r2f_profile": "debug" if r2f.parent.name == "debug" else r2f.parent.name,
        "git": git,
    }


def main() -> int:
    a = parse_args()
    if not (os.path.isfile(a.r2f) and os.access(a.r2f, os.X_OK)):
        raise SystemExit(f"no r2f binary at {a.r2f} (build it, or pass --r2f)")
    import torch

    torch.set_num_threads(a.threads)
    root = Path(a.dir).resolve()
    kinds = [a.only] if a.only else ["sd3", "sdxl"]
    env = r2f_env(a.threads)
    results = {
        "parameters": {k: getattr(a, k) for k in
                       ("width", "height", "steps", "warmup", "repeats", "threads",
                        "context_tokens", "inference_mode")} | {"dir": str(root),
                                                                 "guidance": GUIDANCE,
                                                                 "dtype": "fp32"},
        "versions": versions(a),
        "diffusers_mode": "torch.inference_mode()" if a.inference_mode else "torch.no_grad()",
        "load_average_start": os.getloadavg(),
        "models": {},
    }
    idle = results["idle_fraction_start"] = idle_fraction()
    if idle is not None and idle < 0.9:
        log(f"warning: the CPUs were only {idle:.0%} idle before the run: other work on this "
            "machine skews both sides (see foreign_cores per run in --json)")
    for kind in kinds:
        model_info = ensure_model(kind, root, a.regenerate)
        side = DiffusersSide(a, kind, root)
        log(f"{kind}: diffusers loaded in {side.load_s:.1f} s ({', '.join(side.attn_processors)}); "
            f"torch threads {torch.get_num_threads()}")
        r2f_runs, diff_runs = [], []
        for r in range(a.repeats):
            log(f"{kind}: repeat {r + 1}/{a.repeats}: r2f ...")
            with ForeignLoad() as fl:
                rr = run_r2f(a, kind, root, env)
            rr["foreign_cores"] = fl.cores
            r2f_runs.append(rr)
            log(f"{kind}:   r2f {rr['ms_per_step']:.1f} ms/step (process {rr['process_wall_s']:.1f} s,"
                f" {rr['process_cpu_s'] / rr['process_wall_s']:.2f} cores, "
                f"{rr['process_max_os_threads']} threads){busy_note(rr)}")
            log(f"{kind}: repeat {r + 1}/{a.repeats}: diffusers ...")
            with ForeignLoad() as fl:
                dr = side.run()
            dr["foreign_cores"] = fl.cores
            diff_runs.append(dr)
            log(f"{kind}:   diffusers {dr['ms_per_step']:.1f} ms/step{busy_note(dr)}")
        r2f_s = spread([r["ms_per_step"] for r in r2f_runs])
        diff_s = spread([r["ms_per_step"] for r in diff_runs])
        context = a.context_tokens if kind == "sd3" else SDXL_CONTEXT_TOKENS
        results["models"][kind] = {
            "config": model_info.get("config"),
            "model_info": model_info,
            "context_tokens": context,
            "latent": [a.height // 8, a.width // 8],
            "diffusers_attn_processors": side.attn_processors,
            "diffusers_load_s": side.load_s,
            "r2f": r2f_s | {"details": r2f_runs},
            "diffusers": diff_s | {"details": diff_runs},
            "ratio_r2f_over_diffusers": r2f_s["median"] / diff_s["median"],
        }
        del side
        gc.collect()
    results["load_average_end"] = os.getloadavg()

    header = ("model", "size", "threads", "r2f ms/step", "diffusers ms/step", "ratio")
    rows = []
    for kind, m in results["models"].items():
        r, d = m["r2f"], m["diffusers"]
        rows.append((kind, f"{a.width}x{a.height}", str(a.threads),
                     f"{r['median']:.1f} [{r['min']:.1f}-{r['max']:.1f}]",
                     f"{d['median']:.1f} [{d['min']:.1f}-{d['max']:.1f}]",
                     f"{m['ratio_r2f_over_diffusers']:.3f}"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    print(f"fp32 CPU, {a.steps} timed steps after {a.warmup} warm-up, CFG batch 2, "
          f"median of {a.repeats} interleaved runs [min-max]; ratio = r2f / diffusers "
          f"(diffusers eager under {results['diffusers_mode']})")
    print(line(header))
    for row in rows:
        print(line(row))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=2) + "\n")
        log(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
