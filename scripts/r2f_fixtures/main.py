"""Orchestration: tokenizers, then the SD3 folders and references, the SD3 R2F run, the SDXL
folders and references, the SDXL R2F run (in that order: later steps never touch earlier outputs),
then a printed summary."""

import argparse
import hashlib
import shutil
from pathlib import Path

from safetensors.torch import load_file

from . import __doc__ as PACKAGE_DOC
from .common import dump_json, save_reference
from .r2f import R2F_RUN, SDXL_R2F_RUN, compute_r2f_reference, compute_sdxl_r2f_reference
from .sd3 import CONFIGS, compute_references, write_sd3_model
from .sdxl import SDXL_CONFIGS, check_layouts_agree, compute_sdxl_references, write_sdxl_model
from .tokenizer_files import TokenizerFiles, tokenizer_reference


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=PACKAGE_DOC.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures")
    ap.add_argument("--official", default=None,
                    help="R2Fplus_Diffusion_sd3.py of krafton-ai/Rare-to-Frequent @ 834f459 (the "
                         "file, a checkout or a git dir): regenerates the R2F+ references; without "
                         "it the existing ref/sd3-r2fplus.* are kept")
    return ap.parse_args(argv)


R2FPLUS_FILES = ("sd3-r2fplus.json", "sd3-r2fplus.safetensors")


def clean_out_dir(out):
    """Remove the folders this script writes (and nothing else); returns the empty ref/."""
    out.mkdir(parents=True, exist_ok=True)
    ref_dir = out / "ref"
    for d in [ref_dir] + [out / n for n in list(CONFIGS) + list(SDXL_CONFIGS)]:
        if d.exists():
            shutil.rmtree(d)
    ref_dir.mkdir()
    return ref_dir


def make_sd3(out, ref_dir, tokenizer_files, tokenizers):
    """The SD3 folders, their references and ref/tokenizers.json; returns the summary."""
    summary, tok_ref = {}, None
    for name, cfg in CONFIGS.items():
        model_dir = out / name
        perturbed = write_sd3_model(model_dir, cfg, tokenizer_files, tokenizers)
        pipe, tensors, meta = compute_references(model_dir, name, cfg)
        save_reference(ref_dir, name, tensors, meta)
        summary[name] = dict(perturbed_params=perturbed, tensors=meta["tensors"])
        # tokenizers are identical in every folder: check and write the token reference once
        tr = tokenizer_reference(pipe, model_dir / "tokenizer_3" / "tokenizer.json")
        if tok_ref is None:
            tok_ref = tr
        assert tr == tok_ref
        del pipe
    dump_json(ref_dir / "tokenizers.json", tok_ref)
    return summary


def make_r2f(out, ref_dir, run, compute, strict_json):
    """One R2F reference (after its plain reference exists); returns its meta."""
    name = run["config"]
    plain_ref = load_file(ref_dir / f"{name}.safetensors")
    tensors, meta = compute(out / name, plain_ref)
    save_reference(ref_dir, f"{name}-r2f", tensors, meta, strict_json=strict_json)
    return meta


def make_sdxl(out, ref_dir, tokenizer_files, tokenizers):
    """The SDXL folders and their references (after all SD3 outputs, which they do not touch)."""
    summary = {}
    sd3_dir = out / next(iter(CONFIGS))
    for name, cfg in SDXL_CONFIGS.items():
        model_dir = out / name
        perturbed = write_sdxl_model(model_dir, sd3_dir, cfg, tokenizer_files, tokenizers)
        pipe, tensors, meta = compute_sdxl_references(model_dir, name, cfg)
        del pipe
        save_reference(ref_dir, name, tensors, meta, strict_json=True)
        summary[name] = dict(perturbed_params=perturbed, meta=meta)
    check_layouts_agree(out, SDXL_CONFIGS)
    return summary


# --------------------------------------------------------------------------------------------
# Summary.
# --------------------------------------------------------------------------------------------
def print_tensors(tensors_meta):
    for k, v in tensors_meta.items():
        print(f"    {k:32s} {v['dtype']:8s} {v['shape']}")


def print_r2f(meta, check_line):
    print(f"[{meta['model']}-r2f] step prompts: {meta['r2f_step_prompt']}")
    for c in meta["hand_loop_checks"]:
        print(f"    hand loop vs pipeline ({check_line(c)}): rel err {c['rel_err_vs_pipeline']:.3e}")
    print(f"    plain_vs_r2f_rel_diff: {meta['plain_vs_r2f_rel_diff']:.6g}")
    print_tensors(meta["tensors"])


def print_sd3_summary(summary, r2f_meta):
    print_r2f(r2f_meta, lambda c: f"{c['steps']} steps, seed {c['seed']}, "
                                  f"T5 {c['max_sequence_length']}")
    for name, s in summary.items():
        print(f"[{name}] perturbed constant params (clip_l, clip_g, t5, transformer, vae): "
              f"{s['perturbed_params']}")
        print_tensors(s["tensors"])


def print_sdxl_summary(ref_dir, summary, r2f_meta):
    print_r2f(r2f_meta, lambda c: f"DPM++ 2M Karras, {c['steps']} steps, seed {c['seed']}")
    for name, s in summary.items():
        print(f"[{name}] perturbed constant params (clip_l, clip_g, unet, vae): "
              f"{s['perturbed_params']}")
        r = load_file(ref_dir / f"{name}.safetensors")
        print(f"    euler_timesteps_30: {r['euler_timesteps_30'][:3].tolist()} ... "
              f"{r['euler_timesteps_30'][-3:].tolist()}; init_noise_sigma_30 "
              f"{float(r['euler_init_noise_sigma_30']):.6f}")
        print(f"    dpm_timesteps_30:   {r['dpm_timesteps_30'][:3].tolist()} ... "
              f"{r['dpm_timesteps_30'][-3:].tolist()}")
        print_tensors(s["meta"]["tensors"])


def print_files(out):
    total, unique = 0, {}
    ours = set(CONFIGS) | set(SDXL_CONFIGS) | {"ref"}
    print("files:")
    for p in sorted(q for q in out.rglob("*") if q.is_file()):
        rel = p.relative_to(out)
        if rel.parts[0] not in ours:
            continue
        size = p.stat().st_size
        total += size
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        unique[digest] = size
        print(f"  {size:>10,d}  {digest[:16]}  {rel}")
    u = sum(unique.values())
    print(f"total: {total:,d} bytes ({total / 2**20:.2f} MiB) on disk; "
          f"{u:,d} bytes ({u / 2**20:.2f} MiB) of distinct file contents "
          f"(the model folders share byte-identical tokenizers and text encoders, except "
          f"sdxl-tiny-b/text_encoder, kept in transformers' own key layout)")


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    # The R2F+ references need the official file, which is not in this repository: without
    # --official they are carried over unchanged.
    kept = {n: (out / "ref" / n).read_bytes() for n in R2FPLUS_FILES if (out / "ref" / n).exists()}
    ref_dir = clean_out_dir(out)
    tokenizer_files = TokenizerFiles.build()
    tokenizers = tokenizer_files.load()
    sd3_summary = make_sd3(out, ref_dir, tokenizer_files, tokenizers)
    # R2F reference run (after everything else of SD3, so no existing output is affected)
    r2f_meta = make_r2f(out, ref_dir, R2F_RUN, compute_r2f_reference, strict_json=False)
    sdxl_summary = make_sdxl(out, ref_dir, tokenizer_files, tokenizers)
    sdxl_r2f_meta = make_r2f(out, ref_dir, SDXL_R2F_RUN, compute_sdxl_r2f_reference,
                             strict_json=True)

    if args.official:
        from .r2fplus import compute_r2fplus_references
        compute_r2fplus_references(out, args.official, ref_dir)
    else:
        for name, data in kept.items():
            (ref_dir / name).write_bytes(data)
        print(f"R2F+ references kept as they were ({', '.join(kept) or 'none'}): pass --official "
              f"to regenerate them")

    print(f"T5 tokenizer vocab size: {tokenizer_files.t5_vocab_size}")
    print_sd3_summary(sd3_summary, r2f_meta)
    print_sdxl_summary(ref_dir, sdxl_summary, sdxl_r2f_meta)
    print_files(out)
