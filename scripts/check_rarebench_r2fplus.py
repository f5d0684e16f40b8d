#!/usr/bin/env python3
"""Local check: the R2F+ per-step prompts and token indices of the Rust port against the OFFICIAL
code, on every RareBench R2F+ plan, with tokenizers only (no model weights, no GPU).

Usage:
    python scripts/check_rarebench_r2fplus.py --official PATH
        [--rarebench /work/shared/rarebench/test/r2fplus_prompt/rarebench]
        [--tokenizers tests/fixtures/sd3-tiny-a] [--out FILE.json] [--r2f BIN]
    python scripts/check_rarebench_r2fplus.py --compare FILE.json --r2f BIN
        [--rarebench DIR] [--tokenizers DIR]

  * With --official: computes the official side (and writes it to --out when given).
  * With --r2f as well: runs `r2f schedule` on every plan and compares (one go).
  * With --compare FILE.json (a file an earlier --out wrote) and --r2f: compares without the
    official code; the plans are re-read from --rarebench and must be the recorded ones.
Exit status: 0 when everything compared agrees (or nothing was compared), 1 on any mismatch,
2 on a usage error.

--official is R2Fplus_Diffusion_sd3.py of krafton-ai/Rare-to-Frequent @ 834f459, a checkout
directory holding it, or a git directory (bare mirror or .git) of that repository (the file is
then read with `git show 834f459…:R2Fplus_Diffusion_sd3.py` into a temporary directory outside
this repository).  It is imported UNMODIFIED and never copied here; its sha256 must be the pinned
one (--allow-unpinned to accept another file).  Nothing of it is built: its methods
`get_current_prompt_and_object_indices`, `_get_clip_prompt_token_ids` and
`_get_t5_prompt_token_ids` are bound to a stand-in object that only holds the tokenizers
(`tokenizer`, `tokenizer_2`, `tokenizer_3` loaded with transformers from --tokenizers as diffusers
does), `tokenizer_max_length` (the CLIP tokenizer's model_max_length, as the official __init__),
`_execution_device` (cpu), `text_encoder` (only its `.dtype` is read) and a non-None
`text_encoder_3` sentinel.  Plans are parsed by the official `R2FplusDiffusionPrompt.from_json`
from `json.loads` of each file, as script/inference_r2fplus.py does.

The official side per plan, as R2FplusDiffusion3Pipeline.__call__ drives it with its defaults
(visual_detail_level_to_transition_step [0,5,10,20,30,40], alt_step 2, max_sequence_length 256,
latent_fusion_steps 20, use_centered_bbox True):
  * stage A, for each object key in plan order: steps 0..19 (the latent-fusion steps, all the
    port runs) of get_current_prompt_and_object_indices(prompt=obj.prompt, objects={key: obj},
    is_overall=False); boxes: the centred box __call__ computes, [[key, box]];
  * stage B: steps 0..49 with prompt=base_prompt, objects=all objects, is_overall=True; boxes:
    the real boxes in plan order.
Each plan's "runs" value has exactly the shape `r2f schedule` prints:
    [{"run": "#1", "boxes": [["#1", [x0, y0, x1, y1]]],
      "steps": [{"step": 0, "prompt": "...", "objects": [{"key": "#1", "indices": [...]}]}, ...]},
     ..., {"run": "overall", "boxes": [...], "steps": [...]}]
(indices: the official tensor as a list of ints, objects in the official dict's order).  A plan
on which the official code raises is recorded as {"error": "Type: message", "at": "..."} instead
of "runs".

The port's side: `BIN schedule --plan <tmp plan.json> --steps 50 --model sd3 --tokenizers DIR
--t5-tokens 256` per plan.  Compared exactly: run names and order, boxes, step numbers, prompts,
object keys and their order, every index list.  A plan the official code rejects must be rejected
by the port as well (non-zero exit): that counts as agreement ("both reject"); any other
difference is a mismatch.
"""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import argparse
import concurrent.futures
import hashlib
import json
import subprocess
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from r2f_fixtures import official as official_file  # noqa: E402
from r2f_fixtures.official import OFFICIAL_FILE, OFFICIAL_REPO  # noqa: E402

DEFAULT_RAREBENCH = "/work/shared/rarebench/test/r2fplus_prompt/rarebench"
DEFAULT_TOKENIZERS = "tests/fixtures/sd3-tiny-a"

# The official __call__ defaults (R2Fplus_Diffusion_sd3.py L1263-1285).
STEPS = 50
TRANSITION_STEPS = [0, 5, 10, 20, 30, 40]
ALT_STEP = 2
T5_TOKENS = 256
LATENT_FUSION_STEPS = 20
FORMAT = "r2fplus-rarebench-schedule/1"


# --------------------------------------------------------------------------------------------
# The official file.
# --------------------------------------------------------------------------------------------

def load_official(official, tmp, allow_unpinned):
    """The official module and its provenance (r2f_fixtures.official). No shim is needed with
    diffusers 0.42.1 / transformers 5.x: the file imports as is."""
    return official_file.load_official(official, tmp, allow_unpinned)


# --------------------------------------------------------------------------------------------
# The tokenizer-only stand-in for R2FplusDiffusion3Pipeline.
# --------------------------------------------------------------------------------------------

def load_tokenizers(tok_dir):
    from transformers import CLIPTokenizer, T5TokenizerFast

    tok_dir = Path(tok_dir)
    if not (tok_dir / "tokenizer").is_dir() or not (tok_dir / "tokenizer_3").is_dir():
        raise SystemExit(f"--tokenizers {tok_dir}: needs tokenizer/ and tokenizer_3/ "
                         f"(a diffusers-layout SD3 folder)")
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir / "tokenizer"))
    tokenizer_2 = (CLIPTokenizer.from_pretrained(str(tok_dir / "tokenizer_2"))
                   if (tok_dir / "tokenizer_2").is_dir() else tokenizer)
    tokenizer_3 = T5TokenizerFast.from_pretrained(str(tok_dir / "tokenizer_3"))
    return tokenizer, tokenizer_2, tokenizer_3


def make_standin(mod, tokenizers):
    """An object with just what the official token-index methods read, the official functions
    bound to it (called unbound: no pipeline, no model is constructed)."""
    import torch

    tokenizer, tokenizer_2, tokenizer_3 = tokenizers
    P = mod.R2FplusDiffusion3Pipeline
    s = types.SimpleNamespace()
    s.tokenizer = tokenizer
    s.tokenizer_2 = tokenizer_2
    s.tokenizer_3 = tokenizer_3
    # As the official __init__ (L332-334).
    s.tokenizer_max_length = tokenizer.model_max_length if tokenizer is not None else 77
    s._execution_device = torch.device("cpu")
    s.text_encoder = types.SimpleNamespace(dtype=torch.float32)   # only .dtype is read
    s.text_encoder_2 = None
    s.text_encoder_3 = object()   # not None: _get_t5_prompt_token_ids tokenizes
    for name in ("_get_clip_prompt_token_ids", "_get_t5_prompt_token_ids",
                 "get_current_prompt_and_object_indices"):
        setattr(s, name, types.MethodType(getattr(P, name), s))
    return s


# --------------------------------------------------------------------------------------------
# RareBench plans.
# --------------------------------------------------------------------------------------------

def read_plan_files(rarebench):
    """-> [(file name, [(prompt, plan dict)], duplicate prompt keys)] as json.loads reads each
    file (the official driver's reading: a repeated prompt key keeps its last plan)."""
    d = Path(rarebench)
    files = sorted(d.glob("*.txt"))
    if not files:
        raise SystemExit(f"--rarebench {d}: no *.txt plan files")
    out = []
    for f in files:
        text = f.read_text()
        seen, dups = set(), []
        # Count repeated top-level keys (json.loads silently keeps the last one).
        raw = json.loads(text, object_pairs_hook=lambda pairs: pairs)
        for k, _ in raw:
            if k in seen:
                dups.append(k)
            seen.add(k)
        data = json.loads(text)
        if not isinstance(data, dict):
            raise SystemExit(f"{f}: not a JSON object of prompt -> plan")
        out.append((f.name, list(data.items()), dups))
    return out


def canon(plan):
    return hashlib.sha256(json.dumps(plan, sort_keys=True, ensure_ascii=False)
                          .encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# The official side.
# --------------------------------------------------------------------------------------------

def centered_bbox(bbox):
    # R2Fplus_Diffusion_sd3.py L1331-1336 (use_centered_bbox=True), same expression order.
    return [
        (1 - bbox[2] + bbox[0]) / 2,
        (1 - bbox[3] + bbox[1]) / 2,
        (1 + bbox[2] - bbox[0]) / 2,
        (1 + bbox[3] - bbox[1]) / 2,
    ]


def fbox(b):
    return [float(x) for x in b]


def official_step(standin, prompt, objects, step, is_overall):
    new_prompt, idx = standin.get_current_prompt_and_object_indices(
        prompt=prompt,
        objects=objects,
        current_step=step,
        visual_detail_level_to_transition_step=TRANSITION_STEPS,
        alt_step=ALT_STEP,
        is_overall=is_overall,
    )
    return {
        "step": step,
        "prompt": new_prompt,
        "objects": [{"key": k, "indices": [int(i) for i in v.tolist()]} for k, v in idx.items()],
    }


def official_runs(mod, standin, plan, steps, object_steps):
    """-> (runs, None) or (None, {"error", "at"})."""
    at = "parsing the plan (R2FplusDiffusionPrompt.from_json)"
    try:
        p = mod.R2FplusDiffusionPrompt.from_json(plan)
        runs = []
        if object_steps > 0:
            for key, obj in p.objects.items():
                run = {"run": key, "boxes": [[key, fbox(centered_bbox(obj.bbox))]], "steps": []}
                for i in range(object_steps):
                    at = f"run {key} step {i}"
                    run["steps"].append(official_step(standin, obj.prompt, {key: obj}, i, False))
                runs.append(run)
        run = {"run": "overall",
               "boxes": [[k, fbox(o.bbox)] for k, o in p.objects.items()], "steps": []}
        for i in range(steps):
            at = f"run overall step {i}"
            run["steps"].append(official_step(standin, p.base_prompt, p.objects, i, True))
        runs.append(run)
        return runs, None
    except Exception as e:  # noqa: BLE001  (recorded: where the official code raises)
        tb = traceback.extract_tb(e.__traceback__)
        line = next((f"{Path(fr.filename).name}:{fr.lineno} {fr.line}" for fr in reversed(tb)
                     if fr.filename.endswith(OFFICIAL_FILE)), None)
        return None, {"error": f"{type(e).__name__}: {e}", "at": at, "official_line": line}


def compute_official(args):
    import torch
    import transformers

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="r2fplus-official-") as tmp:
        mod, info = load_official(args.official, tmp, args.allow_unpinned)
    t_import = time.perf_counter() - t0
    tokenizers = load_tokenizers(args.tokenizers)
    standin = make_standin(mod, tokenizers)
    try:
        import diffusers
        dv = diffusers.__version__
    except Exception:  # noqa: BLE001
        dv = None
    try:
        import tokenizers as hf_tokenizers
        tv = hf_tokenizers.__version__
    except Exception:  # noqa: BLE001
        tv = None
    result = {
        "format": FORMAT,
        "official": info,
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tv,
                     "diffusers": dv},
        "params": {"steps": args.steps, "object_steps": args.object_steps,
                   "visual_detail_level_to_transition_step": TRANSITION_STEPS,
                   "alt_step": ALT_STEP, "t5_tokens": T5_TOKENS,
                   "tokenizer_max_length": standin.tokenizer_max_length,
                   "tokenizers": str(args.tokenizers), "rarebench": str(args.rarebench)},
        "files": {},
    }
    t1 = time.perf_counter()
    for fname, plans, dups in read_plan_files(args.rarebench):
        entries = []
        for prompt, plan in plans:
            runs, err = official_runs(mod, standin, plan, args.steps, args.object_steps)
            e = {"prompt": prompt, "plan_sha256": canon(plan)}
            if err is None:
                e["runs"] = runs
            else:
                e.update(err)
            entries.append(e)
        result["files"][fname] = {"duplicate_prompt_keys": dups, "plans": entries}
    result["timing_s"] = {"import": round(t_import, 3),
                          "compute": round(time.perf_counter() - t1, 3)}
    return result


def summarize_official(result):
    print(f"official: {result['official']['repository']}@"
          f"{(result['official']['commit'] or 'UNPINNED')[:7]} sha256 "
          f"{result['official']['sha256'][:12]}…; versions {result['versions']}")
    tot = {"plans": 0, "runs": 0, "steps": 0, "errors": 0, "empty": 0}
    first_empty = []
    for fname, f in result["files"].items():
        n = {"plans": 0, "runs": 0, "steps": 0, "errors": 0, "empty": 0}
        for e in f["plans"]:
            n["plans"] += 1
            if "error" in e:
                n["errors"] += 1
                print(f"  official raises on {fname} {e['prompt']!r} at {e['at']}: {e['error']}"
                      f" [{e.get('official_line')}]")
                continue
            for r in e["runs"]:
                n["runs"] += 1
                for st in r["steps"]:
                    n["steps"] += 1
                    for o in st["objects"]:
                        if not o["indices"]:
                            n["empty"] += 1
                            if len(first_empty) < 5:
                                first_empty.append((fname, e["prompt"], r["run"], st["step"],
                                                    o["key"], st["prompt"]))
        dup = f" ({len(f['duplicate_prompt_keys'])} repeated prompt keys, last kept)" \
            if f["duplicate_prompt_keys"] else ""
        print(f"  {fname}: {n['plans']} plans{dup}, {n['runs']} runs, {n['steps']} steps, "
              f"{n['errors']} official errors, {n['empty']} empty index lists")
        for k in tot:
            tot[k] += n[k]
    print(f"  total: {tot['plans']} plans, {tot['runs']} runs, {tot['steps']} steps, "
          f"{tot['errors']} official errors, {tot['empty']} empty index lists")
    for fe in first_empty:
        print(f"  empty indices: {fe[0]} {fe[1]!r} run {fe[2]} step {fe[3]} key {fe[4]} "
              f"prompt {fe[5]!r}")
    if "timing_s" in result:
        print(f"  timing: import {result['timing_s']['import']} s, "
              f"compute {result['timing_s']['compute']} s")
    return tot


# --------------------------------------------------------------------------------------------
# The port's side and the comparison.
# --------------------------------------------------------------------------------------------

def run_port(r2f, tok_dir, steps, plan):
    with tempfile.TemporaryDirectory(prefix="r2fplus-plan-") as tmp:
        pf = Path(tmp) / "plan.json"
        pf.write_text(json.dumps(plan, ensure_ascii=False))
        cmd = [str(r2f), "schedule", "--plan", str(pf), "--steps", str(steps), "--model", "sd3",
               "--tokenizers", str(tok_dir), "--t5-tokens", str(T5_TOKENS)]
        p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return None, f"exit {p.returncode}: {p.stderr.strip()[-2000:]}"
    try:
        return json.loads(p.stdout), None
    except json.JSONDecodeError as e:
        return None, f"stdout is not JSON ({e}): {p.stdout[:500]!r}"


def diff_runs(off, port):
    """-> (steps compared, [mismatch dict]) for one plan."""
    mism = []
    steps = 0
    if not isinstance(port, list):
        return 0, [{"where": "top level", "official": "a JSON array of runs", "port": port}]
    on = [r.get("run") for r in off]
    pn = [r.get("run") if isinstance(r, dict) else r for r in port]
    if on != pn:
        mism.append({"where": "run names/order", "official": on, "port": pn})
    for ro, rp in zip(off, port):
        if not isinstance(rp, dict):
            continue
        name = ro["run"]
        ob = [[k, fbox(b)] for k, b in ro["boxes"]]
        try:
            pb = [[k, fbox(b)] for k, b in rp.get("boxes", [])]
        except (TypeError, ValueError):
            pb = rp.get("boxes")
        if ob != pb:
            mism.append({"where": f"run {name} boxes", "official": ob, "port": pb})
        so, sp = ro["steps"], rp.get("steps", [])
        if len(so) != len(sp):
            mism.append({"where": f"run {name} number of steps", "official": len(so),
                         "port": len(sp)})
        for a, b in zip(so, sp):
            steps += 1
            if a != b:
                fields = [k for k in ("step", "prompt", "objects") if a.get(k) != b.get(k)]
                if set(b) - set(a):
                    fields.append("extra fields " + ",".join(sorted(set(b) - set(a))))
                mism.append({"where": f"run {name} step {a['step']} ({'/'.join(fields)})",
                             "official": a, "port": b})
    return steps, mism


def compare(result, args):
    by_file = {f: {e["prompt"]: e for e in v["plans"]} for f, v in result["files"].items()}
    t0 = time.perf_counter()
    jobs = []
    for fname, plans, _ in read_plan_files(args.rarebench):
        if fname not in by_file:
            raise SystemExit(f"{fname}: not in the official results (recorded: "
                             f"{sorted(by_file)})")
        for prompt, plan in plans:
            e = by_file[fname].get(prompt)
            if e is None or e["plan_sha256"] != canon(plan):
                raise SystemExit(f"{fname} {prompt!r}: the plan differs from the recorded one; "
                                 f"recompute the official side")
            jobs.append((fname, prompt, plan, e))
    missing = sum(len(v) for v in by_file.values()) - len(jobs)
    if missing:
        raise SystemExit(f"the official results hold {missing} plans that --rarebench lacks")

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as ex:
        port_out = list(ex.map(lambda j: run_port(args.r2f, args.tokenizers, args.steps, j[2]),
                               jobs))

    stats = {}
    all_mism = []
    for (fname, prompt, _plan, e), (port, perr) in zip(jobs, port_out):
        s = stats.setdefault(fname, {"plans": 0, "runs": 0, "steps": 0, "mismatched_plans": 0,
                                     "mismatches": 0, "both_reject": 0})
        s["plans"] += 1
        if "error" in e:
            if perr is not None:
                s["both_reject"] += 1
                print(f"  both reject {fname} {prompt!r}: official {e['error']} | port {perr}")
                continue
            m = [{"where": "official raises, port accepts", "official": e["error"],
                  "port": f"{len(port)} runs"}]
        elif perr is not None:
            m = [{"where": "port fails, official succeeds", "official": "ok", "port": perr}]
        else:
            s["runs"] += len(e["runs"])
            n, m = diff_runs(e["runs"], port)
            s["steps"] += n
        if m:
            s["mismatched_plans"] += 1
            s["mismatches"] += len(m)
            all_mism.extend((fname, prompt, x) for x in m)
    dt = time.perf_counter() - t0

    tot = {k: sum(s[k] for s in stats.values()) for k in
           ("plans", "runs", "steps", "mismatched_plans", "mismatches", "both_reject")}
    print(f"comparison with {args.r2f} ({dt:.1f} s):")
    for fname, s in stats.items():
        print(f"  {fname}: {s['plans']} plans, {s['runs']} runs, {s['steps']} steps compared, "
              f"{s['mismatches']} mismatches in {s['mismatched_plans']} plans"
              + (f", {s['both_reject']} rejected by both" if s["both_reject"] else ""))
    print(f"  total: {tot['plans']} plans, {tot['runs']} runs, {tot['steps']} steps compared, "
          f"{tot['mismatches']} mismatches in {tot['mismatched_plans']} plans"
          + (f", {tot['both_reject']} rejected by both" if tot["both_reject"] else ""))
    for fname, prompt, x in all_mism[:args.show]:
        print(f"\nMISMATCH {fname} {prompt!r}: {x['where']}")
        print("  official: " + json.dumps(x["official"], ensure_ascii=False))
        print("  port:     " + json.dumps(x["port"], ensure_ascii=False))
    if len(all_mism) > args.show:
        print(f"\n… {len(all_mism) - args.show} more mismatches (--show N)")
    return not all_mism


# --------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official",
                    help=f"{OFFICIAL_FILE}, a directory holding it, or a git dir of {OFFICIAL_REPO}")
    ap.add_argument("--allow-unpinned", action="store_true",
                    help="accept an official file whose sha256 is not the pinned one")
    ap.add_argument("--rarebench", default=DEFAULT_RAREBENCH,
                    help="directory of the RareBench R2F+ plan files (*.txt)")
    ap.add_argument("--tokenizers", default=DEFAULT_TOKENIZERS,
                    help="diffusers-layout SD3 folder with tokenizer/ and tokenizer_3/")
    ap.add_argument("--out", help="write the official side here (JSON)")
    ap.add_argument("--compare", metavar="FILE.json",
                    help="the official side from an earlier --out instead of --official")
    ap.add_argument("--r2f", help="the r2f executable; without it only the official side is done")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--object-steps", type=int, default=LATENT_FUSION_STEPS,
                    help="steps of each object run (the latent-fusion steps)")
    ap.add_argument("--jobs", type=int, default=1, help="r2f processes at once")
    ap.add_argument("--show", type=int, default=5, help="mismatches printed in full")
    args = ap.parse_args(argv)

    if bool(args.official) == bool(args.compare):
        ap.error("give exactly one of --official (compute) and --compare FILE.json")
    if args.compare and not args.r2f:
        ap.error("--compare needs --r2f")

    if args.official:
        result = compute_official(args)
        if args.out:
            Path(args.out).write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n")
            print(f"wrote {args.out}")
    else:
        result = json.loads(Path(args.compare).read_text())
        if result.get("format") != FORMAT:
            raise SystemExit(f"{args.compare}: not a {FORMAT} file")
        p = result["params"]
        if (p["steps"], p["object_steps"]) != (args.steps, args.object_steps):
            raise SystemExit(f"{args.compare}: recorded with steps {p['steps']} / object steps "
                             f"{p['object_steps']}, not {args.steps} / {args.object_steps}")
        if Path(p["tokenizers"]).resolve() != Path(args.tokenizers).resolve():
            print(f"note: recorded with --tokenizers {p['tokenizers']}, "
                  f"comparing with {args.tokenizers}")
    summarize_official(result)

    if args.r2f:
        return 0 if compare(result, args) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
