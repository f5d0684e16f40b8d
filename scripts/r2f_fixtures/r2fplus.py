#!/usr/bin/env python3
"""Reference outputs of the OFFICIAL R2F+ pipeline on the tiny SD3 fixtures.

Usage (part of scripts/make_fixtures.py, which passes --official through; alone:)
    cd scripts && python -m r2f_fixtures.r2fplus --official DIR_OR_FILE [--fixtures ../tests/fixtures]
                                                 [--out ../tests/fixtures/ref]

--official is one of
  * the file R2Fplus_Diffusion_sd3.py of krafton-ai/Rare-to-Frequent (commit 834f459),
  * a checkout directory that holds it,
  * a git directory (bare mirror or .git) of that repository: the file is read with
    `git show 834f459…:R2Fplus_Diffusion_sd3.py` into a temporary directory.
The file is imported UNMODIFIED and never copied into this repository (its license differs);
only its outputs are written.  Its sha256 must be the pinned one (--allow-unpinned records a
different file with commit null).

Writes (under --out):
    sd3-r2fplus.json          versions, official file sha256 + commit, and per case: the run
                              parameters, the plan, the per-step prompt and token indices the
                              official get_current_prompt_and_object_indices returned (recorded,
                              called through), and the discrimination numbers.
    sd3-r2fplus.safetensors   per case (prefix "<name>."): final_latents, image, noise.<k>,
                              mask.<#key>, object.<#key>.step0/.step19, overall.step0_guided,
                              overall.step0_fused.

How the official pipeline is run without weights, detectors or a GPU (docs: r2fplus-spec.md §4):
  * components of StableDiffusion3Pipeline.from_pretrained(<tiny folder>, fp32), with
    detector_model/detector_processor/segmentor_model/segmentor_processor = None;
  * a subclass of the official R2FplusDiffusion3Pipeline whose get_single_object_mask returns a
    deterministic bool HxW mask (`box` or `ellipse`, below) of the CENTRED box that __call__ passed
    by keyword `bbox=` to generate_single_object (remembered by the subclass); every other override
    only records and calls through;
  * `import PIL.ImageDraw` before the import (the official file uses PIL.ImageDraw after `import PIL`);
  * generator=torch.Generator("cpu").manual_seed(seed): noise draws are object #1..#n, then overall;
  * final latents are captured by wrapping scheduler.step (output_type="latent" crashes in __call__);
  * square sizes only, N = 50 steps, CPU fp32.
Everything is deterministic: two runs give byte-identical files.

Discrimination: every case is rerun (a) with bbox_guidance_steps=0 and (b) with an all-false mask
(no fusion; the noise draws stay identical).  no_guidance_rel / no_fusion_rel are
max|x_variant - x_ref| / max|x_ref| over the final latents; each must be >= MIN_REL.
"""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import argparse
import copy
import hashlib
import inspect
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .official import OFFICIAL_FILE, OFFICIAL_REPO, load_official  # noqa: F401

OUT_STEM = "sd3-r2fplus"
STEPS = 50
GUIDANCE = 7.0
MIN_REL = 1e-2
OBJECT_STEPS = (0, 19)  # object-run latents stored (after that step, before the roll)

# Knobs of the official __call__ recorded per case (values: the official defaults unless a case
# overrides them; read from the signature at run time).
KNOBS = (
    "visual_detail_level_to_transition_step", "alt_step", "max_sequence_length",
    "latent_fusion_steps", "bbox_guidance_steps", "bbox_guidance_iterations", "bbox_loss_scale",
    "use_centered_bbox",
)


def obj(prompt, object, r2f, levels, bbox):
    return {"prompt": prompt, "object": object, "r2f": r2f, "visual_detail_levels": levels, "bbox": bbox}


# bbox_loss_scale: the official 30 where that already moves the final latents by >= MIN_REL;
# raised (linear regime: the shift grows ~proportionally) where random tiny weights make the
# guidance too weak.  A full-frame box has an identically zero loss term ((1 - mask) = 0), so in
# full_frame_ellipse_a64 only #2 is guided (its stage-B term divided by 2).
CASES = [
    # one object, box mask, tiny-b 32x32 (VAE factor 2: the mask resize is a 2x2 area mean).
    # Dyadic bbox with exact ties: centred y grid bounds 1.5 -> 2 and 6.5 -> 6, original x0 grid
    # bound 0.5 -> 0, latent x shift -2.5 -> -2 (Python round = half to even).
    dict(
        name="one_object_box_b32", model="sd3-tiny-b", height=32, width=32, seed=11,
        region_mask="box", overrides={"bbox_loss_scale": 300},
        plan={
            "original_prompt": "a furry frog sitting on a beach",
            "base_prompt": "#1 sitting on a beach",
            "objects": {
                "#1": obj("#1 sitting on a beach", "a furry frog", ["a furry animal"], [3],
                          [0.0625, 0.1875, 0.625, 0.8125]),
            },
        },
    ),
    # two overlapping boxes, ellipse masks, a two-level object, tiny-b 48x48
    dict(
        name="overlap_two_level_ellipse_b48", model="sd3-tiny-b", height=48, width=48, seed=2024,
        region_mask="ellipse", overrides={},
        plan={
            "original_prompt": "a hairy shark and a horned monkfish in the ocean",
            "base_prompt": "#1 and #2 in the ocean",
            "objects": {
                "#1": obj("#1", "a hairy shark", ["a hairy animal"], [5], [0.05, 0.2, 0.6, 0.7]),
                "#2": obj("#2 in the ocean", "a horned monkfish", ["a horned animal", "a horned fish"],
                          [1, 2], [0.4, 0.35, 0.95, 0.9]),
            },
        },
    ),
    # an object with an empty r2f list, box masks, tiny-a 64x64 (VAE factor 8: 2x2 centre pixels)
    dict(
        name="empty_r2f_box_a64", model="sd3-tiny-a", height=64, width=64, seed=3,
        region_mask="box", overrides={"bbox_loss_scale": 300},
        plan={
            "original_prompt": "a red apple next to a wooden clock on a table",
            "base_prompt": "#1 next to #2 on a table",
            "objects": {
                "#1": obj("#1 on a table", "a red apple", [], [], [0.1, 0.5, 0.45, 0.9]),
                "#2": obj("#2", "a wooden clock", ["a wooden object"], [2], [0.5, 0.1, 0.9, 0.6]),
            },
        },
    ),
    # a full-frame box [0,0,1,1] (with a level-0 frequent phrase that is never used), ellipse
    # masks, tiny-a 64x64
    dict(
        name="full_frame_ellipse_a64", model="sd3-tiny-a", height=64, width=64, seed=99,
        region_mask="ellipse", overrides={"bbox_loss_scale": 1000},
        plan={
            "original_prompt": "a pyramid behind a spotted camel in the desert",
            "base_prompt": "#1 behind #2 in the desert",
            "objects": {
                "#1": obj("#1 in the desert", "a pyramid", ["a building", "a stone building"], [0, 1],
                          [0.0, 0.0, 1.0, 1.0]),
                "#2": obj("#2", "a spotted camel", ["a spotted animal"], [4], [0.55, 0.5, 0.95, 0.95]),
            },
        },
    ),
    # three objects, two of them the same phrase (diff-based indices pick each occurrence), box
    # masks, tiny-b 32x32 (RareBench multi 1and, first plan)
    dict(
        name="three_objects_box_b32", model="sd3-tiny-b", height=32, width=32, seed=42,
        region_mask="box", overrides={"bbox_loss_scale": 100},
        plan={
            "original_prompt": "a hairy shark and two spotted clams",
            "base_prompt": "#1 and #2 and #3",
            "objects": {
                "#1": obj("#1", "a hairy shark", ["a hairy animal"], [5], [0.1, 0.2, 0.4, 0.6]),
                "#2": obj("#2", "a spotted clam", ["a spotted object"], [2], [0.6, 0.4, 0.8, 0.6]),
                "#3": obj("#3", "a spotted clam", ["a spotted object"], [2], [0.7, 0.7, 0.9, 0.9]),
            },
        },
    ),
]


# --------------------------------------------------------------------------------------------
# Region masks (replace GroundingDINO + SAM).  Exactly as in r2fplus-spec.md §2.2.
# --------------------------------------------------------------------------------------------

def box_mask(bbox, height, width):
    """m[r,c] = 1 iff rhe(y0*H) <= r < rhe(y1*H) and rhe(x0*W) <= c < rhe(x1*W)."""
    x0, y0, x1, y1 = bbox
    m = torch.zeros((height, width), dtype=torch.bool)
    r0, r1 = round(y0 * height), round(y1 * height)
    c0, c1 = round(x0 * width), round(x1 * width)
    for r in range(height):
        for c in range(width):
            if r0 <= r < r1 and c0 <= c < c1:
                m[r, c] = True
    return m


def ellipse_mask(bbox, height, width):
    """m[r,c] = 1 iff dx*dx + dy*dy <= 1 (Python floats = f64), dx = (c + 0.5 - cx)/rx, ..."""
    x0, y0, x1, y1 = bbox
    m = torch.zeros((height, width), dtype=torch.bool)
    cx = (x0 + x1) / 2 * width
    cy = (y0 + y1) / 2 * height
    rx = (x1 - x0) / 2 * width
    ry = (y1 - y0) / 2 * height
    if rx <= 0 or ry <= 0:
        return m
    for r in range(height):
        dy = (r + 0.5 - cy) / ry
        for c in range(width):
            dx = (c + 0.5 - cx) / rx
            if dx * dx + dy * dy <= 1:
                m[r, c] = True
    return m


def empty_mask(bbox, height, width):
    return torch.zeros((height, width), dtype=torch.bool)


MASKS = {"box": box_mask, "ellipse": ellipse_mask, "none": empty_mask}


# --------------------------------------------------------------------------------------------
# The official file.
# --------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------
# Recording subclass of the official pipeline.
# --------------------------------------------------------------------------------------------

def new_record(mask_kind):
    return {
        "mask_kind": mask_kind,
        "stage": None,          # ("object", key) or ("overall", None)
        "bbox": None,           # centred box passed to generate_single_object (by keyword)
        "centered_bbox": {},
        "shifts": {},
        "noise": [],
        "masks": {},
        "object_steps": {},
        "schedule_objects": {},
        "schedule_overall": [],
        "overall_calls": 0,     # scheduler.step calls in the overall run
        "last": None,           # tensor returned by the last scheduler.step
        "overall_step0_guided": None,
        "overall_step0_fused": None,
        "final_latents": None,
    }


def recorder_class(mod):
    Base = mod.R2FplusDiffusion3Pipeline

    def bind(fn, self, args, kwargs):
        b = inspect.signature(fn).bind(self, *args, **kwargs)
        b.apply_defaults()
        return b.arguments

    class R2FplusRecorder(Base):
        """Records only, calls through; get_single_object_mask is the region-mask stub."""

        def prepare_latents(self, *args, **kwargs):
            lat = super().prepare_latents(*args, **kwargs)
            self._rec["noise"].append(lat.detach().clone())
            return lat

        def generate_single_object(self, *args, **kwargs):
            a = bind(Base.generate_single_object, self, args, kwargs)
            rec = self._rec
            key = a["object_key"]
            rec["stage"] = ("object", key)
            rec["bbox"] = list(kwargs["bbox"])  # __call__ passes it by keyword
            rec["centered_bbox"][key] = list(kwargs["bbox"])
            rec["schedule_objects"][key] = []
            image, latents_by_step = super().generate_single_object(*args, **kwargs)
            rec["object_steps"][key] = {
                s: latents_by_step[s].detach().clone() for s in OBJECT_STEPS if s < len(latents_by_step)}
            return image, latents_by_step

        def get_single_object_mask(self, image, object_prompt):
            width, height = image.size
            return MASKS[self._rec["mask_kind"]](self._rec["bbox"], height, width)

        def refine_latents_and_mask(self, *args, **kwargs):
            a = bind(Base.refine_latents_and_mask, self, args, kwargs)
            latents_by_step, mask = super().refine_latents_and_mask(*args, **kwargs)
            rec = self._rec
            key = rec["stage"][1]
            rec["masks"][key] = mask.detach().clone()
            rec["shifts"][key] = list(a["shifts"]) if a["shifts"] is not None else None
            return latents_by_step, mask

        def generate_overall(self, *args, **kwargs):
            rec = self._rec
            rec["stage"] = ("overall", None)
            rec["overall_calls"] = 0
            rec["last"] = None
            image = super().generate_overall(*args, **kwargs)
            rec["final_latents"] = rec["last"].detach().clone()
            return image

        def get_current_prompt_and_object_indices(self, *args, **kwargs):
            a = bind(Base.get_current_prompt_and_object_indices, self, args, kwargs)
            prompt, indices = super().get_current_prompt_and_object_indices(*args, **kwargs)
            entry = {"step": int(a["current_step"]), "prompt": prompt,
                     "indices": {k: [int(x) for x in v.tolist()] for k, v in indices.items()}}
            rec = self._rec
            if rec["stage"][0] == "overall":
                rec["schedule_overall"].append(entry)
            else:
                rec["schedule_objects"][rec["stage"][1]].append(entry)
            return prompt, indices

        def guide_latents_with_bboxes(self, *args, **kwargs):
            a = bind(Base.guide_latents_with_bboxes, self, args, kwargs)
            latent = super().guide_latents_with_bboxes(*args, **kwargs)
            rec = self._rec
            if rec["stage"][0] == "overall" and a["timestep_args"][0] == 0:
                rec["overall_step0_guided"] = latent.detach().clone()
            return latent

    return R2FplusRecorder


def wrap_scheduler_step(pipe):
    sched = pipe.scheduler
    orig = sched.step

    def step(*args, **kwargs):
        rec = pipe._rec
        if rec["stage"][0] == "overall" and rec["overall_calls"] == 1:
            # the step-0 output, fused in place after the step: now final
            rec["overall_step0_fused"] = rec["last"].detach().clone()
        out = orig(*args, **kwargs)
        rec["last"] = out[0] if isinstance(out, tuple) else out.prev_sample
        if rec["stage"][0] == "overall":
            rec["overall_calls"] += 1
        return out

    sched.step = step


def build_pipeline(mod, model_dir):
    from diffusers import StableDiffusion3Pipeline
    base = StableDiffusion3Pipeline.from_pretrained(str(model_dir), dtype=torch.float32)
    names = ["transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2",
             "tokenizer_2", "text_encoder_3", "tokenizer_3"]
    pipe = recorder_class(mod)(
        **{n: getattr(base, n) for n in names},
        detector_model=None, detector_processor=None, segmentor_model=None, segmentor_processor=None)
    pipe.set_progress_bar_config(disable=True)
    wrap_scheduler_step(pipe)
    pipe._rec = new_record("none")
    return pipe


def official_defaults(mod):
    sig = inspect.signature(mod.R2FplusDiffusion3Pipeline.__call__)
    return {k: sig.parameters[k].default for k in KNOBS}


def run_once(mod, pipe, case, mask_kind, overrides):
    pipe._rec = rec = new_record(mask_kind)
    plan = mod.R2FplusDiffusionPrompt.from_json(copy.deepcopy(case["plan"]))
    out = pipe(
        r2fplus_prompt=plan,
        height=case["height"],
        width=case["width"],
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        generator=torch.Generator("cpu").manual_seed(case["seed"]),
        **overrides,
    )
    rec["image"] = np.array(out.images[0], dtype=np.uint8)
    return rec


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def compact_json(obj, indent=0, width=100):
    """Indented JSON whose small containers (and lists of numbers) stay on one line."""
    flat = json.dumps(obj, ensure_ascii=False, allow_nan=False)
    scalars = isinstance(obj, list) and all(not isinstance(x, (list, dict)) for x in obj)
    if not isinstance(obj, (list, dict)) or scalars or len(flat) + indent <= width:
        return flat
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(obj, dict):
        items = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {compact_json(v, indent + 2, width)}"
                 for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}" if items else "{}"
    items = [inner + compact_json(v, indent + 2, width) for v in obj]
    return "[\n" + ",\n".join(items) + "\n" + pad + "]" if items else "[]"


def versions():
    import diffusers
    import transformers
    return {
        "torch": torch.__version__.split("+")[0],
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def check_finite(name, tensors):
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise SystemExit(f"[{name}] non-finite values in {bad}")


def compute_case(mod, pipe, case, defaults):
    name = case["name"]
    knobs = dict(defaults)
    knobs.update(case["overrides"])
    t0 = time.perf_counter()
    ref = run_once(mod, pipe, case, case["region_mask"], case["overrides"])
    t_ref = time.perf_counter() - t0
    no_guid = run_once(mod, pipe, case, case["region_mask"],
                       {**case["overrides"], "bbox_guidance_steps": 0})
    no_fuse = run_once(mod, pipe, case, "none", case["overrides"])
    t_all = time.perf_counter() - t0

    for other in (no_guid, no_fuse):
        assert len(other["noise"]) == len(ref["noise"])
        for a, b in zip(other["noise"], ref["noise"]):
            assert torch.equal(a, b), "noise draws differ between variants"
    final = ref["final_latents"]
    disc = {"no_guidance_rel": rel(no_guid["final_latents"], final),
            "no_fusion_rel": rel(no_fuse["final_latents"], final)}

    keys = list(case["plan"]["objects"].keys())
    tensors = {"final_latents": final,
               "image": torch.from_numpy(np.ascontiguousarray(ref["image"])),
               "overall.step0_guided": ref["overall_step0_guided"],
               "overall.step0_fused": ref["overall_step0_fused"]}
    for k, n in enumerate(ref["noise"]):
        tensors[f"noise.{k}"] = n
    for key in keys:
        tensors[f"mask.{key}"] = ref["masks"][key]
        for s in OBJECT_STEPS:
            tensors[f"object.{key}.step{s}"] = ref["object_steps"][key][s]
    tensors = {f"{name}.{k}": v.detach().contiguous() for k, v in tensors.items()}
    check_finite(name, tensors)

    empty = [(run, e["step"], k)
             for run, sched in [*ref["schedule_objects"].items(), ("overall", ref["schedule_overall"])]
             for e in sched for k, v in e["indices"].items() if not v]

    meta = {
        "name": name,
        "model": case["model"],
        "height": case["height"],
        "width": case["width"],
        "seed": case["seed"],
        "steps": STEPS,
        "guidance_scale": GUIDANCE,
        "negative_prompt": "",
        "region_mask": case["region_mask"],
        "visual_detail_level_to_transition_step": list(knobs["visual_detail_level_to_transition_step"]),
        "alt_step": knobs["alt_step"],
        "max_sequence_length": knobs["max_sequence_length"],
        "latent_fusion_steps": knobs["latent_fusion_steps"],
        "bbox_guidance_steps": knobs["bbox_guidance_steps"],
        "bbox_guidance_iterations": knobs["bbox_guidance_iterations"],
        "bbox_loss_scale": knobs["bbox_loss_scale"],
        "use_centered_bbox": knobs["use_centered_bbox"],
        "plan": case["plan"],
        "centered_bbox": ref["centered_bbox"],
        "shifts": ref["shifts"],
        "schedule": {"objects": ref["schedule_objects"], "overall": ref["schedule_overall"]},
        "discrimination": disc,
        "tensors": {k[len(name) + 1:]: {"dtype": str(v.dtype).replace("torch.", ""),
                                         "shape": list(v.shape)} for k, v in sorted(tensors.items())},
    }
    stats = {"seconds_ref": t_ref, "seconds_all": t_all, "empty_index_sets": empty}
    return tensors, meta, stats


def compute_r2fplus_references(fixtures_dir, official_dir, out_dir, allow_unpinned=False, cases=None):
    """Run every case through the official pipeline; write <out_dir>/sd3-r2fplus.{json,safetensors}."""
    from safetensors.torch import save_file

    fixtures_dir, out_dir = Path(fixtures_dir), Path(out_dir)
    cases = CASES if cases is None else cases
    with tempfile.TemporaryDirectory() as tmp:
        mod, info = load_official(official_dir, tmp, allow_unpinned)
        defaults = official_defaults(mod)
        pipes = {}
        all_tensors, metas, summary = {}, [], []
        for case in cases:
            if case["model"] not in pipes:
                pipes[case["model"]] = build_pipeline(mod, fixtures_dir / case["model"])
            tensors, meta, stats = compute_case(mod, pipes[case["model"]], case, defaults)
            all_tensors.update(tensors)
            metas.append(meta)
            summary.append((meta, stats))
            d = meta["discrimination"]
            print(f"[{meta['name']}] {meta['model']} {meta['height']}x{meta['width']} "
                  f"{meta['region_mask']} objects={len(meta['plan']['objects'])} "
                  f"loss_scale={meta['bbox_loss_scale']} no_guidance_rel={d['no_guidance_rel']:.4g} "
                  f"no_fusion_rel={d['no_fusion_rel']:.4g} ref run {stats['seconds_ref']:.1f}s, "
                  f"with variants {stats['seconds_all']:.1f}s"
                  + (f", EMPTY index sets: {stats['empty_index_sets']}" if stats["empty_index_sets"] else ""),
                  flush=True)
    weak = [(m["name"], m["discrimination"]) for m in metas
            if min(m["discrimination"].values()) < MIN_REL]
    if weak:
        raise SystemExit(f"not discriminating (< {MIN_REL}): {weak}; raise bbox_loss_scale for those cases")

    doc = {
        "note": ("Official R2F+ (R2Fplus_Diffusion_sd3.py, imported unmodified) on tiny random-weight "
                 "SD3 folders, CPU fp32, generator=torch.Generator('cpu').manual_seed(seed) (noise "
                 "draws: objects in plan order, then overall = noise.0..noise.n). Detectors replaced by "
                 "region_mask of the centred box at image size (box: Python-round half-to-even bounds; "
                 "ellipse: f64 inscribed ellipse). Tensors per case under '<name>.': final_latents = "
                 "overall latents after the last scheduler step (before VAE scaling); image = uint8 HxWx3; "
                 "mask.<key> = after refine_latents_and_mask (1,1,h,w) fp32; object.<key>.stepS = object "
                 "run latents after step S, before the roll; overall.step0_guided = the latent returned "
                 "by the first guide_latents_with_bboxes call of the overall run; overall.step0_fused = "
                 "the overall latent after the step-0 fusion. schedule = what "
                 "get_current_prompt_and_object_indices returned per step (indices: rows of the 77+T5 "
                 "text sequence). discrimination: max|x_variant - x_ref| / max|x_ref| of final_latents, "
                 "variants: bbox_guidance_steps=0 (no_guidance_rel) and an all-false mask (no_fusion_rel)."),
        "versions": versions(),
        "official": info,
        "official_defaults": {k: (list(v) if isinstance(v, (list, tuple)) else v)
                              for k, v in defaults.items()},
        "min_discrimination_rel": MIN_REL,
        "cases": metas,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(all_tensors, str(out_dir / f"{OUT_STEM}.safetensors"), metadata={"format": "pt"})
    with open(out_dir / f"{OUT_STEM}.json", "w", encoding="utf-8") as f:
        f.write(compact_json(doc) + "\n")
    return doc, summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", required=True,
                    help=f"{OFFICIAL_FILE}, a directory holding it, or a git dir of {OFFICIAL_REPO}")
    here = Path(__file__).resolve().parent.parent.parent
    ap.add_argument("--fixtures", default=str(here / "tests" / "fixtures"))
    ap.add_argument("--out", default=None, help="default: <fixtures>/ref")
    ap.add_argument("--allow-unpinned", action="store_true")
    ap.add_argument("--case", action="append", help="run only these cases (repeatable)")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.fixtures) / "ref"
    cases = CASES if not args.case else [c for c in CASES if c["name"] in set(args.case)]
    t0 = time.perf_counter()
    compute_r2fplus_references(args.fixtures, args.official, out, args.allow_unpinned, cases)
    for p in (out / f"{OUT_STEM}.json", out / f"{OUT_STEM}.safetensors"):
        print(f"  {p.stat().st_size:>10,d}  {hashlib.sha256(p.read_bytes()).hexdigest()[:16]}  {p}")
    print(f"total {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main(sys.argv[1:])
