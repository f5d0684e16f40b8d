#!/usr/bin/env python3
"""The diffusers side of the GPU check's anchor table: ms per denoising step of diffusers' SD3
transformer or SDXL UNet, eager and under torch.compile, at exactly the shapes `r2f bench` times
(src/bench/mod.rs), so that the two can be compared in the same call on the same card.

Usage (torch and diffusers importable; scripts/gpu_check.sh runs it):
    python3 scripts/diffusers_anchor.py --preset sd3|sdxl|sd3-tiny|sdxl-tiny --device cuda|cpu
        --dtype fp16|bf16|fp32 [--width 1024] [--height 1024] [--steps 20] [--warmup 3]
        [--context-tokens 333] [--compile default|eager-backend|none] [--json FILE]

The shapes, as `r2f bench` draws them: classifier-free guidance at batch 2 (latents
[1, C, H/8, W/8] concatenated twice), conditioning of batch 2 (SD3: context [2, --context-tokens
(333 = 77 CLIP + 256 T5, r2f bench's default), joint_attention_dim], pooled [2, pooled dim];
SDXL: context [2, 77, cross_attention_dim], text_embeds, time_ids (H, W, 0, 0, H, W)), the
flow-match (shift 3) timesteps, the CFG combine at guidance 7 and the Euler update in float32
(the step of scripts/bench_vs_diffusers.py, whose weight initialisation this reuses).  The
presets mirror r2f's (`sd3` = SD3-medium, `sdxl` = SDXL base, and the two tiny smoke presets).
Weights are random (timing does not depend on them; N(0, 1/fan_in), so no overflow in fp16).

`--compile default` times `torch.compile(model)` after its warm-up (the compile time is reported
apart); `eager-backend` runs torch.compile with the eager backend (dynamo only: what the CPU smoke
run uses, in seconds instead of minutes); `none` skips it.  The report also names the attention
kernel PyTorch's SDPA picks for the model's largest attention (torch._fused_sdp_choice) and the
cuDNN version, the facts to compare with what r2f's libtorch picks (its bench report).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_diffusers import SEED, DiffusersSide, randomize  # noqa: E402

SD3_MEDIUM = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "out_channels": 16,
    "pos_embed_max_size": 192,
}
# r2f's sd3-tiny preset (src/bench/mod.rs): SD3-medium with 2 layers of 2 heads.
SD3_TINY = dict(SD3_MEDIUM, num_layers=2, num_attention_heads=2, caption_projection_dim=128,
                joint_attention_dim=256, pooled_projection_dim=64)
SDXL_BASE = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280], "layers_per_block": 2,
    # diffusers' naming quirk, as in SDXL's config: head counts.
    "attention_head_dim": [5, 10, 20], "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32,
}
# r2f's sdxl-tiny preset.
SDXL_TINY = dict(SDXL_BASE, block_out_channels=[32, 64, 64], attention_head_dim=[2, 4, 4],
                 transformer_layers_per_block=[1, 1, 1], cross_attention_dim=64,
                 projection_class_embeddings_input_dim=6 * 256 + 64)
PRESETS = {"sd3": ("sd3", SD3_MEDIUM), "sd3-tiny": ("sd3", SD3_TINY),
           "sdxl": ("sdxl", SDXL_BASE), "sdxl-tiny": ("sdxl", SDXL_TINY)}
SDXL_CONTEXT_TOKENS = 77
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def log(msg: str) -> None:
    print(f"[diffusers_anchor] {msg}", file=sys.stderr, flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--context-tokens", type=int, default=333)
    p.add_argument("--compile", choices=["default", "eager-backend", "none"], default="default")
    p.add_argument("--json")
    return p.parse_args()


class Side:
    def __init__(self, a: argparse.Namespace):
        import torch
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.a = a
        self.kind, config = PRESETS[a.preset]
        self.device = torch.device(a.device)
        self.dtype = getattr(torch, DTYPES[a.dtype])
        torch.manual_seed(SEED)
        t0 = time.perf_counter()
        if self.kind == "sd3":
            from diffusers import SD3Transformer2DModel

            model = SD3Transformer2DModel(**config)
        else:
            from diffusers import UNet2DConditionModel

            model = UNet2DConditionModel(**config)
        self.parameters = randomize(model)["parameters"]
        self.model = model.to(self.device, self.dtype).eval()
        self.build_s = time.perf_counter() - t0
        c = self.model.config
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        sched.set_timesteps(a.steps)
        self.timesteps = sched.timesteps.to(self.device, self.dtype)
        self.dts = [float(sched.sigmas[i + 1] - sched.sigmas[i]) for i in range(a.steps)]
        opts = {"device": self.device, "dtype": self.dtype}
        lh, lw = a.height // 8, a.width // 8
        if self.kind == "sd3":
            self.context = torch.randn(2, a.context_tokens, c.joint_attention_dim, **opts)
            self.pooled = torch.randn(2, c.pooled_projection_dim, **opts)
        else:
            self.context = torch.randn(2, SDXL_CONTEXT_TOKENS, c.cross_attention_dim, **opts)
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            self.pooled = torch.randn(2, pooled, **opts)
            h, w = float(a.height), float(a.width)
            self.time_ids = torch.tensor([[h, w, 0.0, 0.0, h, w]], **opts).repeat(2, 1)
        self.latents = torch.randn(1, c.in_channels, lh, lw, **opts)
        self.forward = self.model

    # The step of the CPU side-by-side (the same attributes: kind, timesteps, dts, context,
    # pooled, time_ids, forward).
    step = DiffusersSide.step

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time_steps(self) -> dict:
        """Warm-up steps (the first also compiles), then the timed steps."""
        import torch

        with torch.no_grad():
            x = self.latents
            t0 = time.perf_counter()
            for i in range(max(self.a.warmup, 1)):
                x = self.step(x, i % self.a.steps)
            self.sync()
            warmup_s = time.perf_counter() - t0
            x = self.latents
            t0 = time.perf_counter()
            for i in range(self.a.steps):
                x = self.step(x, i)
            self.sync()
            elapsed = time.perf_counter() - t0
        return {"ms_per_step": elapsed * 1e3 / self.a.steps, "warmup_s": warmup_s,
                "final_latents_finite": bool(torch.isfinite(x).all())}

    def attention_choice(self) -> dict:
        """The SDPA kernel PyTorch picks for the model's largest attention at these shapes."""
        import torch

        c = self.model.config
        if self.kind == "sd3":
            tokens = (self.a.height // 8 // c.patch_size) * (self.a.width // 8 // c.patch_size)
            tokens += self.a.context_tokens
            heads, dim = c.num_attention_heads, c.attention_head_dim
        else:
            # The first level with transformers (a quarter of the latent side's squared tokens).
            tokens = (self.a.height // 16) * (self.a.width // 16)
            heads = c.attention_head_dim[1]
            dim = c.block_out_channels[1] // heads
        q = torch.randn(2, heads, tokens, dim, device=self.device, dtype=self.dtype)
        try:
            from torch.nn.attention import SDPBackend

            choice = SDPBackend(torch._fused_sdp_choice(q, q, q)).name
        except Exception as e:  # an older or CPU-only build may lack it
            choice = f"unknown ({e})"
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        return {"shape": [2, heads, tokens, dim], "sdp_backend": choice, "cudnn_version": cudnn}


def main() -> int:
    a = parse_args()
    import diffusers
    import torch

    side = Side(a)
    log(f"{a.preset}: {side.parameters / 1e6:.0f} M parameters built in {side.build_s:.1f} s "
        f"on {a.device} ({a.dtype})")
    report = {
        # Spelled as r2f's bench report spells it (cpu, cuda:N).
        "preset": a.preset,
        "device": (f"cuda:{side.device.index if side.device.index is not None else torch.cuda.current_device()}"
                   if side.device.type == "cuda" else side.device.type),
        "dtype": a.dtype, "width": a.width,
        "height": a.height, "steps": a.steps, "warmup": a.warmup,
        "context_tokens": a.context_tokens if side.kind == "sd3" else SDXL_CONTEXT_TOKENS,
        "batch": 2, "parameters": side.parameters, "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "gpu": torch.cuda.get_device_name(side.device) if side.device.type == "cuda" else None,
        "attention": side.attention_choice(),
    }
    report["eager"] = side.time_steps()
    log(f"eager: {report['eager']['ms_per_step']:.1f} ms/step")
    if a.compile != "none":
        backend = "inductor" if a.compile == "default" else "eager"
        side.forward = torch.compile(side.model, backend=backend)
        report["compiled"] = dict(side.time_steps(), backend=backend)
        log(f"torch.compile ({backend}): {report['compiled']['ms_per_step']:.1f} ms/step "
            f"(warm-up with compilation {report['compiled']['warmup_s']:.0f} s)")
    if side.device.type == "cuda":
        report["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(side.device)
    text = json.dumps(report, indent=1)
    if a.json:
        Path(a.json).write_text(text + "\n")
    print(text)
    ok = report["eager"]["final_latents_finite"] and report.get("compiled", {}).get(
        "final_latents_finite", True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
