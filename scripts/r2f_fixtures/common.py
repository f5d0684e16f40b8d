"""Environment and determinism setup, plus helpers shared by every fixture family.

The environment variables below must be set before `tokenizers` is imported (the package's
__init__ imports this module first): tokenizers' Unigram trainer runs on rayon, and only a
single-threaded run is deterministic.  The hub is forced offline and logging is silenced.
"""

import os

# Make tokenizers' (rayon) training single-threaded so the Unigram trainer is deterministic.
# Must be set before `tokenizers` is imported.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("RAYON_RS_NUM_CPUS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

diffusers_logging.set_verbosity_error()
diffusers_logging.disable_progress_bar()
transformers_logging.set_verbosity_error()
transformers_logging.disable_progress_bar()

CLIP_MAX_LEN = 77
T5_MAX_LEN = 256
CPU = torch.device("cpu")


def dump_json(path, obj, sort_keys=True):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=sort_keys, ensure_ascii=False)
        f.write("\n")


def save_reference(ref_dir, stem, tensors, meta, strict_json=False):
    """ref/<stem>.safetensors (metadata {"format": "pt"}, like transformers) + ref/<stem>.json."""
    save_file(tensors, ref_dir / f"{stem}.safetensors", metadata={"format": "pt"})
    if strict_json:
        json.dumps(meta, allow_nan=False)  # strict JSON (Rust serde_json) must parse it
    dump_json(ref_dir / f"{stem}.json", meta)


def versions():
    import PIL
    import safetensors
    import tokenizers
    return {
        "torch": torch.__version__.split("+")[0],
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
    }


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def tensor_meta(tensors):
    return {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
            for k, v in sorted(tensors.items())}


def cast_tensors(out, is_int64):
    """Contiguous copies in key order: int64 where is_int64(key), uint8 for `*image_u8`, else
    float32."""
    tensors = {}
    for k, v in sorted(out.items()):
        v = v.detach().contiguous()
        if is_int64(k):
            v = v.to(torch.int64)
        elif k.endswith("image_u8"):
            v = v.to(torch.uint8)
        else:
            v = v.to(torch.float32)
        tensors[k] = v
    return tensors


def postprocess_u8(pipe, decoded):
    """The pipeline's image postprocessing (output_type="np"), as uint8 HWC."""
    img = pipe.image_processor.postprocess(decoded, output_type="np")
    return (img * 255).round().astype(np.uint8)[0]


def tok_ids(tokenizer, texts, max_length):
    return tokenizer(
        texts, padding="max_length", max_length=max_length, truncation=True,
        add_special_tokens=True, return_tensors="pt",
    ).input_ids


def step_recorder(cast=float):
    """A callback_on_step_end that records the latents after each step and the step's timestep."""
    latents, timesteps = [], []

    def cb(pipe, i, t, kw):
        latents.append(kw["latents"].detach().clone())
        timesteps.append(cast(t))
        return {}

    return cb, latents, timesteps


@torch.no_grad()
def perturb_constant_params(model, seed):
    """Make norm weights / biases that were initialised to a constant (1 or 0) non-trivial, and
    re-initialise any all-zero weight matrix, so an implementation that ignores them fails."""
    gen = torch.Generator().manual_seed(seed)
    touched = 0
    for name, p in model.named_parameters():  # deterministic order; tied params appear once
        flat = p.detach().reshape(-1)
        if flat.numel() == 0 or not bool((flat == flat[0]).all()):
            continue
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if p.dim() >= 2 and float(flat[0]) == 0.0:
            p.copy_(noise * 0.05)
        else:
            p.add_(noise * 0.1)
        touched += 1
    return touched


def seeded(seed, build, perturb_seed):
    """torch.manual_seed(seed); model = build(); perturb its constant parameters with
    perturb_seed.  Returns (model, number of perturbed parameters)."""
    torch.manual_seed(seed)
    model = build()
    return model, perturb_constant_params(model, perturb_seed)
