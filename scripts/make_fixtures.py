#!/usr/bin/env python3
"""Generate tiny random-weight Stable Diffusion 3 and SDXL fixtures plus diffusers reference outputs.

Usage:
    python scripts/make_fixtures.py [--out tests/fixtures]

Writes (under --out, default tests/fixtures):
    sd3-tiny-a/   diffusers-layout SD3 model folder (VAE scale factor 8, non-square run)
    sd3-tiny-b/   diffusers-layout SD3 model folder (VAE scale factor 2, qk_norm="rms_norm")
    ref/sd3-tiny-a.safetensors, ref/sd3-tiny-a.json
    ref/sd3-tiny-b.safetensors, ref/sd3-tiny-b.json
    ref/tokenizers.json
    ref/sd3-tiny-a-r2f.safetensors, ref/sd3-tiny-a-r2f.json
                  R2F reference run (faithful alternating rare->frequent schedule, see
                  R2F_RUN below) by a hand-written loop over the pipeline's components; the
                  loop is checked against StableDiffusion3Pipeline.__call__ first.
    sdxl-tiny-a/  diffusers-layout SDXL model folder (2-level UNet, VAE scale factor 8, non-square)
    sdxl-tiny-b/  diffusers-layout SDXL model folder (3-level UNet, VAE scale factor 2)
    ref/sdxl-tiny-a.safetensors, ref/sdxl-tiny-a.json
    ref/sdxl-tiny-b.safetensors, ref/sdxl-tiny-b.json
                  StableDiffusionXLPipeline references: tokens, CLIP features, encode_prompt
                  (zero negatives), add_time_ids, one UNet forward, VAE decode, Euler and
                  DPM++ 2M Karras schedules, a DPM++ step-by-step check, full Euler and
                  DPM++ pipeline runs with decoded images.
    ref/sdxl-tiny-a-r2f.safetensors, ref/sdxl-tiny-a-r2f.json
                  R2F on SDXL (SDXL_R2F_RUN: HEAD stop-step map, DPM++ 2M Karras, zero
                  negatives) by a hand-written loop, checked against
                  StableDiffusionXLPipeline.__call__ first.

Everything is float32 on CPU and fully deterministic: running the script twice gives
byte-identical files.  Install the pinned environment with scripts/requirements-fixtures.txt
(open-clip-torch is installed with --no-deps: only its BPE vocabulary file is used, and the
package is located via importlib.util.find_spec without being imported).

Tokenizer notes
  * CLIP (tokenizer/, tokenizer_2/): the real OpenAI CLIP vocabulary, rebuilt exactly like
    open_clip / OpenAI SimpleTokenizer from bpe_simple_vocab_16e6.txt.gz and written as
    vocab.json + merges.txt (no tokenizer.json, like the published SD3 repos).
  * T5 (tokenizer_3/): a tiny Unigram model trained here with the `tokenizers` library.
    Its tokenizer.json deliberately has NO normalizer, and the pre-tokenizer is
    Sequence[WhitespaceSplit, Metaspace("▁", prepend_scheme="always", split=True)], because that
    is exactly the pipeline transformers 5 rebuilds for T5Tokenizer (it keeps only the Unigram
    vocab and the post-processor from tokenizer.json, and a normalizer only if it is a
    SentencePiece `Precompiled` charsmap).  So `tokenizers.Tokenizer.from_file` and
    `AutoTokenizer.from_pretrained` agree (checked below).
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

import argparse
import gzip
import hashlib
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import diffusers
import transformers
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import logging as diffusers_logging
from transformers import (
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
)
from transformers.utils import logging as transformers_logging

diffusers_logging.set_verbosity_error()
diffusers_logging.disable_progress_bar()
transformers_logging.set_verbosity_error()
transformers_logging.disable_progress_bar()

CLIP_MAX_LEN = 77
T5_MAX_LEN = 256
T5_VOCAB_SIZE = 600

# --------------------------------------------------------------------------------------------
# Corpus for the tiny T5 Unigram tokenizer (image-prompt-like English sentences).
# --------------------------------------------------------------------------------------------
T5_CORPUS = [
    "A hairy frog warrior holding a tiny golden sword.",
    "A wigged octopus juggling three red apples on a sunny beach.",
    "A small grey cat sleeping on a blue velvet cushion.",
    "An old wooden boat floating on a calm green lake at dawn.",
    "A red fox jumping over a snowy fence in the forest.",
    "Two brown dogs running across a wide yellow field.",
    "A glass bottle filled with glowing purple liquid.",
    "A tall lighthouse standing on a rocky cliff during a storm.",
    "A cup of hot coffee with a heart drawn in the milk foam.",
    "A fluffy white rabbit eating a crunchy orange carrot.",
    "A silver robot painting a portrait of a smiling woman.",
    "A giant turtle carrying a tiny village on its shell.",
    "A black horse galloping through shallow water at sunset.",
    "A pink flamingo standing on one leg in a misty pond.",
    "A rusty bicycle leaning against a brick wall covered in ivy.",
    "A bowl of ripe strawberries and blueberries on a marble table.",
    "A wise owl wearing round glasses reading an ancient book.",
    "A knight in shining armour riding a dragon above the clouds.",
    "A colourful parrot perched on a twisted branch in the jungle.",
    "A cozy cabin in the mountains with smoke rising from the chimney.",
    "A bright yellow taxi driving through a rainy city street at night.",
    "A wooden table with a loaf of fresh bread and a jar of honey.",
    "A tiny mouse playing a violin under a mushroom.",
    "A majestic lion resting on a large flat rock in the savanna.",
    "A crystal castle floating in the sky surrounded by stars.",
    "A penguin wearing a scarf skating on a frozen lake.",
    "An astronaut riding a horse on the surface of the moon.",
    "A soft knitted sweater with green and white stripes.",
    "A shiny copper teapot steaming on an iron stove.",
    "A field of sunflowers under a deep blue summer sky.",
    "A little girl flying a red kite on a windy hill.",
    "A sleepy panda hugging a bamboo stalk.",
    "A stone bridge crossing a narrow river in autumn.",
    "A group of ducks swimming in a muddy puddle.",
    "A golden retriever catching a frisbee in the park.",
    "A vase of white roses next to an open window.",
    "A steaming bowl of ramen with an egg and green onions.",
    "A neon sign glowing above a crowded night market.",
    "A smooth pebble beach with waves crashing on the shore.",
    "A squirrel hiding acorns inside a hollow oak tree.",
    "A rough stone wall covered with bright green moss.",
    "A dancing skeleton in a top hat and a bow tie.",
    "A chocolate cake decorated with cherries and whipped cream.",
    "A fierce tiger walking through tall grass.",
    "An elephant spraying water with its long trunk.",
    "A wizard casting a spell with a glowing wooden staff.",
    "A bumblebee collecting pollen from a purple flower.",
    "A snowy village with warm lights in every window.",
    "A vintage camera lying on a pile of old photographs.",
    "A hot air balloon drifting over green rolling hills.",
    "A green frog sitting on a lily pad in the rain.",
    "A sleek sports car parked in front of a modern house.",
    "A cute baby dragon sleeping on a pile of gold coins.",
    "A fisherman casting his net from a small wooden boat.",
    "A bowl of soup with carrots, potatoes and peas.",
    "A sparkling waterfall in a lush tropical forest.",
    "A clown juggling colourful balls at the circus.",
    "A striped zebra drinking from a quiet river.",
    "A chef tossing pizza dough high into the air.",
    "A spooky haunted house on a foggy hill at midnight.",
    "A watercolor painting of a quiet harbour with sailboats.",
    "An oil painting of a bowl of lemons and pears.",
    "A pencil sketch of a sleeping kitten.",
    "A photo of a busy train station in the morning.",
    "A close up photo of a dewdrop on a spider web.",
    "A cartoon of a happy whale spouting a rainbow.",
    "A bronze statue of a running horse in a city square.",
    "A plush teddy bear sitting on a striped blanket.",
    "A fluffy sheep grazing in a meadow full of daisies.",
    "A tiny snail climbing a tall blade of grass.",
    "A café with a croissant and a crème brûlée on the counter.",
    "A smiling monkey swinging from vine to vine.",
    "A heavy iron anchor resting on the sandy sea floor.",
    "A purple butterfly landing on a child's finger.",
    "A samurai cat holding a katana in a bamboo forest.",
    "A candle flickering in a dark and dusty room.",
    "A mountain lake reflecting snowy peaks and pine trees.",
    "Three red apples, two green pears and one banana.",
    "Ten small boats, 4 big ships and 2 lighthouses.",
    "A highly detailed, ultra realistic portrait, 8k, studio lighting.",
    "A cinematic shot of a lonely road through the desert, wide angle.",
    "Digital art of a glowing city, trending on artstation.",
    "A soft pastel drawing of a sleeping fox curled in the snow.",
    "A shiny metal helmet with a long red feather.",
    "A curious raccoon peeking out of a metal trash can.",
    "A family of otters floating on their backs in a kelp forest.",
    "A bright orange pumpkin with a carved grinning face.",
    "A quiet library with tall shelves and a spiral staircase.",
    "A jellyfish glowing in the deep dark ocean.",
    "A blacksmith hammering a glowing horseshoe on an anvil.",
    "A velvet armchair beside a crackling fireplace.",
    "A hedgehog wearing a tiny knitted hat in the autumn leaves.",
    "A marching band parading down a sunny avenue.",
    "A porcelain doll with curly blonde hair and a lace dress.",
    "A whimsical treehouse connected by rope bridges.",
    "A desert fox with enormous ears under a starry sky.",
    "A bouquet of tulips wrapped in brown paper and twine.",
    "A steam locomotive puffing through a snowy valley.",
    "A jazz musician playing a saxophone on a dim stage.",
    "A mechanical owl with brass gears and emerald eyes perched on a clock tower.",
]

# Prompts for ref/tokenizers.json.
LONG_PROMPT = (
    "An extremely detailed and highly intricate fantasy illustration of a hairy frog warrior "
    "wearing polished silver armour, holding a tiny golden sword and a round wooden shield, "
    "standing proudly on a mossy rock in the middle of a misty swamp at dawn, surrounded by "
    "glowing fireflies, tall reeds, floating lily pads, curious dragonflies and a wise old owl "
    "watching from a twisted branch, while a wigged octopus juggles three red apples in the "
    "background next to a rusty bicycle, a steaming bowl of ramen, a vintage camera, a purple "
    "butterfly, a bronze statue of a running horse, a crystal castle floating in the sky, a "
    "hot air balloon drifting over green rolling hills, a neon sign above a crowded night "
    "market, a sleepy panda hugging bamboo, a penguin skating on a frozen lake, a fierce tiger "
    "in tall grass, a fluffy sheep grazing among daisies, soft cinematic lighting, volumetric "
    "fog, dramatic shadows, vivid colours, sharp focus, ultra realistic, 8k resolution, "
    "masterpiece, trending on artstation, award winning photograph, wide angle lens, bokeh"
)
TOKENIZER_PROMPTS = [
    "A hairy frog,",
    "a wigged octopus juggling three red apples",
    "Hello, World! It's a test: (1+2)=3; 'quotes' & \"double\" - dash... ok?",
    "THE QUICK BROWN FOX Jumps Over 1234567 Lazy Dogs 3.14159",
    "café crème brûlée, naïve Æsir façade",
    "a cat 🐱 wearing a hat 🎩 👍🏽",
    "  lots   of\tspaces\n\nand\r\nnewlines   ",
    "",
    LONG_PROMPT,
]

# --------------------------------------------------------------------------------------------
# Model configurations.
# --------------------------------------------------------------------------------------------
CLIP_L_KWARGS = dict(
    vocab_size=49408, hidden_size=8, intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
    layer_norm_eps=1e-5, projection_dim=8, bos_token_id=49406, eos_token_id=2, pad_token_id=1,
)
CLIP_G_KWARGS = dict(
    vocab_size=49408, hidden_size=16, intermediate_size=64, num_hidden_layers=4,
    num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu",
    layer_norm_eps=1e-5, projection_dim=16, bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
)
T5_KWARGS = dict(
    d_model=32, d_ff=40, d_kv=8, num_heads=4, num_layers=2, feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32, relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
    decoder_start_token_id=0,
)

CONFIGS = {
    "sd3-tiny-a": dict(
        transformer_seed=10,
        transformer=dict(
            sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
            caption_projection_dim=32, pooled_projection_dim=24, pos_embed_max_size=12,
        ),
        vae_seed=11,
        vae=dict(
            in_channels=3, out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[8, 8, 16, 16], layers_per_block=1, latent_channels=16,
            norm_num_groups=4, sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
            scaling_factor=1.5305, shift_factor=0.0609,
        ),
        run=dict(
            prompt="A hairy frog warrior holding a tiny golden sword", seed=42,
            width=64, height=48, steps=4, guidance=7.0,
        ),
    ),
    "sd3-tiny-b": dict(
        transformer_seed=20,
        transformer=dict(
            sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=3,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
            caption_projection_dim=32, pooled_projection_dim=24, pos_embed_max_size=16,
            qk_norm="rms_norm",
        ),
        vae_seed=21,
        vae=dict(
            in_channels=3, out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
            block_out_channels=[8, 16], layers_per_block=2, latent_channels=16,
            norm_num_groups=4, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
            scaling_factor=1.5305, shift_factor=0.0609,
        ),
        run=dict(
            prompt="a wigged octopus juggling three red apples", seed=7,
            width=32, height=32, steps=3, guidance=5.0,
        ),
    ),
}
# R2F reference run (docs/method.md §2), on sd3-tiny-a.  The levels are deliberately
# NOT sorted: T = [M[3], M[1], N] = [20, 5, 50], so mode goes 0 -> 1 at step 20 and then never
# reaches 2 (the official quirk); steps 20..49 keep alternating p1 (even) / p2 (odd).
R2F_STOP_STEP_MAP = [0, 5, 10, 20, 30, 40]  # SD3: visual detail level -> stop step
R2F_ALT_STEP = 2
R2F_T5_TOKENS = 77  # the official R2F SD3 code encodes T5 with max_sequence_length 77
R2F_RUN = dict(
    config="sd3-tiny-a",
    prompts=[
        "a hairy animal warrior holding a tiny golden object",
        "a hairy frog warrior holding a tiny golden object",
        "A hairy frog warrior holding a tiny golden sword",
    ],
    levels=[3, 1],
    steps=50, guidance=7.0, seed=1234, width=64, height=48,
)
# Plain-pipeline settings the hand loop is checked against (StableDiffusion3Pipeline.__call__).
R2F_LOOP_CHECKS = [
    dict(seed=42, steps=4, max_sequence_length=T5_MAX_LEN),  # = the sd3-tiny-a pipeline reference
    dict(seed=42, steps=28, max_sequence_length=T5_MAX_LEN),
]
R2F_LOOP_CHECK_RTOL = 1e-6
SCHEDULER_KWARGS = dict(num_train_timesteps=1000, shift=3.0)
SCHEDULER_STEP_COUNTS = [1, 2, 28, 50]
TF_TIMESTEPS = [937.5, 12.25]

# --------------------------------------------------------------------------------------------
# SDXL fixtures (diffusers StableDiffusionXLPipeline layout).  Text encoders: the SD3 fixtures'
# CLIP-L config as a plain CLIPTextModel (no projection, like SDXL) and the SD3 CLIP-G config
# as CLIPTextModelWithProjection, built with the same seeds (so text_encoder_2 is byte-identical
# to the SD3 folders' and text_encoder holds the SD3 CLIP-L's text_model weights).
# --------------------------------------------------------------------------------------------
SDXL_UNET_COMMON = dict(
    sample_size=8, in_channels=4, out_channels=4, use_linear_projection=True,
    cross_attention_dim=24,  # 8 (CLIP-L) + 16 (CLIP-G)
    addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=64,  # 6 * 8 + 16 (CLIP-G projection)
    norm_num_groups=8, flip_sin_to_cos=True, freq_shift=0,
)
# SDXL's published scheduler config (stable-diffusion-xl-base-1.0/scheduler/scheduler_config.json)
SDXL_EULER_KWARGS = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
    interpolation_type="linear", use_karras_sigmas=False,
)
SDXL_CONFIGS = {
    "sdxl-tiny-a": dict(
        unet_seed=30,
        unet=dict(
            SDXL_UNET_COMMON,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32), layers_per_block=2, attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
        ),
        vae_seed=31,
        vae=dict(
            in_channels=3, out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[8, 8, 16, 16], layers_per_block=1, latent_channels=4,
            norm_num_groups=4, sample_size=64, scaling_factor=0.13025, force_upcast=True,
        ),
        run=dict(
            prompt="a furry frog warrior holding a golden sword", seed=5,
            width=64, height=48, steps=3, dpm_steps=4, guidance=5.0,
        ),
    ),
    "sdxl-tiny-b": dict(
        unet_seed=40,
        unet=dict(
            SDXL_UNET_COMMON,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32, 32), layers_per_block=1, attention_head_dim=(2, 4, 4),
            transformer_layers_per_block=(1, 1, 2),
        ),
        vae_seed=41,
        vae=dict(
            in_channels=3, out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
            block_out_channels=[8, 16], layers_per_block=2, latent_channels=4,
            norm_num_groups=4, sample_size=32, scaling_factor=0.13025, force_upcast=True,
        ),
        run=dict(
            prompt="a wigged octopus juggling apples", seed=9,
            width=32, height=32, steps=2, dpm_steps=4, guidance=5.0,
        ),
    ),
}
SDXL_SCHEDULER_STEP_COUNTS = [1, 2, 30, 50]
SDXL_UNET_TIMESTEPS = [999.0, 10.0]
SDXL_DPM_STEP_CHECK_STEPS = 5
# R2F on SDXL (docs/method.md §2): HEAD map, DPM++ 2M Karras, zero negatives.
# Levels deliberately unsorted: T = [M[2], M[1], N] = [5, 3, 50], so mode goes 0 -> 1 at step 5
# and never reaches 2; steps 5..49 alternate p1 (even) / p2 (odd).
SDXL_R2F_STOP_STEP_MAP = [0, 3, 5, 10, 20, 30]
SDXL_R2F_RUN = dict(
    config="sdxl-tiny-a",
    prompts=[
        "a furry animal warrior holding a golden object",
        "a furry frog warrior holding a golden object",
        "a furry frog warrior holding a golden sword",
    ],
    levels=[2, 1],
    steps=50, guidance=5.0, seed=2024, width=64, height=48,
)
# single-prompt plans the hand loop is checked against StableDiffusionXLPipeline.__call__ with
SDXL_R2F_LOOP_CHECKS = [
    dict(seed=5, steps=4),      # = the sdxl-tiny-a dpm_final_latents reference
    dict(seed=2024, steps=50),  # = r2f_plain_final_latents
]


def dump_json(path, obj, sort_keys=True):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=sort_keys, ensure_ascii=False)
        f.write("\n")


# --------------------------------------------------------------------------------------------
# CLIP tokenizer files (OpenAI SimpleTokenizer vocabulary).
# --------------------------------------------------------------------------------------------
def find_bpe_gz():
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        sys.exit("open_clip not found: pip install --no-deps open-clip-torch==3.3.0")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "bpe_simple_vocab_16e6.txt.gz"
        if p.is_file():
            return p
    sys.exit("bpe_simple_vocab_16e6.txt.gz not found in the open_clip package")


def bytes_to_unicode():
    """GPT-2 / OpenAI CLIP byte -> unicode map (same insertion order as the original)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build_clip_vocab():
    text = gzip.open(find_bpe_gz()).read().decode("utf-8")
    lines = text.split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    encoder = {tok: i for i, tok in enumerate(vocab)}
    assert len(encoder) == 49408
    return encoder, merges


def clip_special(content):
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_clip_tokenizer(folder, encoder, merges, pad_token):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # vocab.json in id order (like the published files); everything else with sort_keys.
    with open(folder / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(encoder, f, ensure_ascii=False)
        f.write("\n")
    with open(folder / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    pad_special = clip_special(pad_token) if pad_token == "<|endoftext|>" else {
        "content": pad_token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    dump_json(folder / "special_tokens_map.json", {
        "bos_token": clip_special("<|startoftext|>"),
        "eos_token": clip_special("<|endoftext|>"),
        "pad_token": pad_special,
        "unk_token": clip_special("<|endoftext|>"),
    })
    added = {
        "49406": dict(clip_special("<|startoftext|>"), special=True),
        "49407": dict(clip_special("<|endoftext|>"), special=True),
    }
    if pad_token != "<|endoftext|>":
        added[str(encoder[pad_token])] = dict(pad_special, special=True)
    dump_json(folder / "tokenizer_config.json", {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": "<|startoftext|>",
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": CLIP_MAX_LEN,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": "<|endoftext|>",
    })


# --------------------------------------------------------------------------------------------
# T5 tokenizer (tiny Unigram).
# --------------------------------------------------------------------------------------------
def t5_pipeline(tok):
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    return tok


def canonical_unigram_vocab(vocab):
    """Make the trained Unigram vocabulary bit-reproducible.

    tokenizers' UnigramTrainer iterates Rust hash maps/sets with per-process random seeds, so
    (a) EM scores differ in the last ulp from run to run, and (b) the "required characters"
    that EM dropped are re-added with scores min_score + k*0.0001 in hash-set order.  The piece
    SET is stable; we fix (b) by re-assigning those scores in sorted-character order, (a) by
    rounding every score to 8 decimals, and then order pieces by (score desc, piece)."""
    specials, body = vocab[:3], vocab[3:]
    assert [p for p, _ in specials] == ["<pad>", "</s>", "<unk>"]
    delta = 0.0001
    m = min(s for _, s in body)
    synth = []
    for p, s in body:
        k = (s - m) / delta
        if len(p) == 1 and abs(k - round(k)) < 1e-6 and round(k) < len(body):
            synth.append(p)
    synth_scores = {p: m + i * delta for i, p in enumerate(sorted(synth))}
    body = [(p, round(synth_scores.get(p, s), 8)) for p, s in body]
    body.sort(key=lambda ps: (-ps[1], ps[0]))
    return [(p, 0.0) for p, _ in specials] + body


def train_t5_tokenizer():
    tok = t5_pipeline(Tokenizer(models.Unigram()))
    trainer = trainers.UnigramTrainer(
        vocab_size=T5_VOCAB_SIZE,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    tok.train_from_iterator(T5_CORPUS, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    assert model["unk_id"] == 2 and not model.get("byte_fallback", False)
    vocab = canonical_unigram_vocab([(p, float(s)) for p, s in model["vocab"]])
    tok = t5_pipeline(Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False)))
    assert tok.token_to_id("<pad>") == 0 and tok.token_to_id("</s>") == 1 and tok.token_to_id("<unk>") == 2
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return tok


def write_t5_tokenizer(folder, tok_json_str):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "tokenizer.json", "w", encoding="utf-8") as f:
        f.write(tok_json_str)
    special = lambda c: {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False}
    dump_json(folder / "special_tokens_map.json", {
        "eos_token": special("</s>"), "pad_token": special("<pad>"), "unk_token": special("<unk>"),
    })
    dump_json(folder / "tokenizer_config.json", {
        "added_tokens_decoder": {
            "0": dict(special("<pad>"), special=True),
            "1": dict(special("</s>"), special=True),
            "2": dict(special("<unk>"), special=True),
        },
        "additional_special_tokens": [],
        "clean_up_tokenization_spaces": True,
        "eos_token": "</s>",
        "extra_ids": 0,
        "model_max_length": 512,
        "pad_token": "<pad>",
        "tokenizer_class": "T5Tokenizer",
        "unk_token": "<unk>",
    })


def write_tokenizers(model_dir, encoder, merges, t5_json):
    for sub in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        d = Path(model_dir) / sub
        if d.exists():
            shutil.rmtree(d)
    write_clip_tokenizer(Path(model_dir) / "tokenizer", encoder, merges, "<|endoftext|>")
    write_clip_tokenizer(Path(model_dir) / "tokenizer_2", encoder, merges, "!")
    write_t5_tokenizer(Path(model_dir) / "tokenizer_3", t5_json)


# --------------------------------------------------------------------------------------------
# Weights.
# --------------------------------------------------------------------------------------------
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


def build_text_encoders(t5_vocab_size):
    torch.manual_seed(1)
    te1 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L_KWARGS))
    n1 = perturb_constant_params(te1, 1001)
    torch.manual_seed(2)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_KWARGS))
    n2 = perturb_constant_params(te2, 1002)
    torch.manual_seed(3)
    te3 = T5EncoderModel(T5Config(vocab_size=t5_vocab_size, **T5_KWARGS))
    n3 = perturb_constant_params(te3, 1003)
    for m in (te1, te2, te3):
        m.eval()
    return (te1, te2, te3), (n1, n2, n3)


# --------------------------------------------------------------------------------------------
# References.
# --------------------------------------------------------------------------------------------
def tok_ids(tokenizer, texts, max_length):
    return tokenizer(
        texts, padding="max_length", max_length=max_length, truncation=True,
        add_special_tokens=True, return_tensors="pt",
    ).input_ids


@torch.no_grad()
def compute_references(model_dir, name, cfg):
    run = cfg["run"]
    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.to("cpu")
    vsf = pipe.vae_scale_factor
    lat_h, lat_w = run["height"] // vsf, run["width"] // vsf
    prompt, neg = run["prompt"], ""
    texts = [neg, prompt]
    out = {}

    # --- tokenizers and text encoders, exactly as the pipeline calls them: one prompt at a
    # time (batch size 1; batch 2 changes the pooled projection by an ulp), no attention
    # masks.  Row 0 = negative prompt "", row 1 = prompt.
    out["clip_l_ids"] = tok_ids(pipe.tokenizer, texts, pipe.tokenizer_max_length)
    out["clip_g_ids"] = tok_ids(pipe.tokenizer_2, texts, pipe.tokenizer_max_length)
    out["t5_ids"] = tok_ids(pipe.tokenizer_3, texts, T5_MAX_LEN)
    out["t5_ids_77"] = tok_ids(pipe.tokenizer_3, texts, CLIP_MAX_LEN)
    for key, enc, dim in (("clip_l", pipe.text_encoder, 8), ("clip_g", pipe.text_encoder_2, 16)):
        hid, pooled = [], []
        for row in out[f"{key}_ids"]:
            o = enc(row[None], output_hidden_states=True)
            assert len(o.hidden_states) == enc.config.num_hidden_layers + 1
            hid.append(o.hidden_states[-2])
            pooled.append(o[0])
        out[f"{key}_hidden"] = torch.cat(hid)
        out[f"{key}_pooled"] = torch.cat(pooled)
        assert out[f"{key}_pooled"].shape == (2, dim)
    for key in ("t5", "t5_77"):
        ids = out[key.replace("t5", "t5_ids")]
        out[key.replace("t5", "t5_hidden")] = torch.cat(
            [pipe.text_encoder_3(row[None])[0] for row in ids])

    pe, npe, ppe, nppe = pipe.encode_prompt(
        prompt=prompt, prompt_2=prompt, prompt_3=prompt, device=torch.device("cpu"),
        num_images_per_prompt=1, do_classifier_free_guidance=True,
        negative_prompt="", negative_prompt_2="", negative_prompt_3="",
        max_sequence_length=T5_MAX_LEN,
    )
    out["prompt_embeds"], out["negative_prompt_embeds"] = pe, npe
    out["pooled_prompt_embeds"], out["negative_pooled_prompt_embeds"] = ppe, nppe
    # consistency: encode_prompt == concat of the pieces above
    clip_cat = torch.cat([out["clip_l_hidden"], out["clip_g_hidden"]], dim=-1)
    clip_cat = torch.nn.functional.pad(clip_cat, (0, 32 - clip_cat.shape[-1]))
    full = torch.cat([clip_cat, out["t5_hidden"]], dim=-2)
    assert torch.equal(full[1:], pe) and torch.equal(full[:1], npe)
    assert torch.equal(torch.cat([out["clip_l_pooled"], out["clip_g_pooled"]], -1)[1:], ppe)

    # --- scheduler ---
    for n in SCHEDULER_STEP_COUNTS:
        sch = FlowMatchEulerDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler")
        sch.set_timesteps(n)
        out[f"sigmas_{n}"] = sch.sigmas.clone()
        out[f"timesteps_{n}"] = sch.timesteps.clone()

    # --- one transformer forward ---
    torch.manual_seed(123)  # drawn in this order: hidden, context, pooled
    out["tf_in_hidden"] = torch.randn((2, 16, lat_h, lat_w), dtype=torch.float32)
    out["tf_in_timestep"] = torch.tensor(TF_TIMESTEPS, dtype=torch.float32)
    out["tf_in_context"] = torch.randn((2, CLIP_MAX_LEN + T5_MAX_LEN, 32), dtype=torch.float32)
    out["tf_in_pooled"] = torch.randn((2, 24), dtype=torch.float32)
    out["tf_out"] = pipe.transformer(
        hidden_states=out["tf_in_hidden"], timestep=out["tf_in_timestep"],
        encoder_hidden_states=out["tf_in_context"], pooled_projections=out["tf_in_pooled"],
        return_dict=False,
    )[0]

    # --- VAE decode ---
    sf, sh = pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor
    torch.manual_seed(321)
    out["vae_in"] = torch.randn((1, 16, lat_h, lat_w), dtype=torch.float32)
    out["vae_out"] = pipe.vae.decode(out["vae_in"] / sf + sh).sample

    # --- full pipeline ---
    torch.manual_seed(run["seed"])
    init = torch.randn((1, 16, lat_h, lat_w), dtype=torch.float32)
    out["init_latents"] = init
    steps, step_ts = [], []

    def cb(p, i, t, kw):
        steps.append(kw["latents"].detach().clone())
        step_ts.append(float(t))
        return {}

    common = dict(
        negative_prompt="", height=run["height"], width=run["width"],
        num_inference_steps=run["steps"], guidance_scale=run["guidance"],
        max_sequence_length=T5_MAX_LEN,
    )
    final = pipe(prompt, latents=init.clone(), output_type="latent",
                 callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents"],
                 **common).images
    assert len(steps) == run["steps"] and torch.equal(steps[-1], final)
    out["final_latents"] = final
    out["step_latents"] = torch.stack(steps)
    decoded = pipe.vae.decode(final / sf + sh, return_dict=False)[0]
    img = pipe.image_processor.postprocess(decoded, output_type="np")
    img_u8 = (img * 255).round().astype(np.uint8)[0]
    out["image_u8"] = torch.from_numpy(img_u8)
    assert img_u8.shape == (run["height"], run["width"], 3)
    # output_type="pil" must give the same pixels
    pil = pipe(prompt, latents=init.clone(), output_type="pil", **common).images[0]
    assert np.array_equal(np.asarray(pil), img_u8), "pil output differs from np path"

    # the pipeline's schedule is the scheduler's
    sch = FlowMatchEulerDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler")
    sch.set_timesteps(run["steps"])
    assert step_ts == [float(t) for t in sch.timesteps], step_ts

    tensors = {}
    for k, v in sorted(out.items()):
        v = v.detach().contiguous()
        if "_ids" in k:
            v = v.to(torch.int64)
        elif k == "image_u8":
            v = v.to(torch.uint8)
        else:
            v = v.to(torch.float32)
        tensors[k] = v
    meta = {
        "model": name,
        "prompt": prompt,
        "negative_prompt": "",
        "seed": run["seed"],
        "width": run["width"],
        "height": run["height"],
        "steps": run["steps"],
        "guidance": run["guidance"],
        "max_sequence_length": T5_MAX_LEN,
        "vae_scale_factor": vsf,
        "latent_height": lat_h,
        "latent_width": lat_w,
        "vae_scaling_factor": sf,
        "vae_shift_factor": sh,
        "pipeline_timesteps": step_ts,
        "transformer_forward": {
            "timesteps": TF_TIMESTEPS,
            "input_seed": 123,
            "randn_order": ["tf_in_hidden", "tf_in_context", "tf_in_pooled"],
        },
        "vae_decode": {"input_seed": 321, "input": "vae_in / vae_scaling_factor + vae_shift_factor"},
        "tensors": {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
                    for k, v in tensors.items()},
        "versions": versions(),
    }
    return pipe, tensors, meta


# --------------------------------------------------------------------------------------------
# R2F reference (hand-written loop over the pipeline's components).
# --------------------------------------------------------------------------------------------
def r2f_transitions(levels, n_prompts, steps):
    """T = [M[l] for l in levels] + [N]; SD3 guard: a single prompt gives T = [0]."""
    if n_prompts == 1:
        return [0]
    return [R2F_STOP_STEP_MAP[int(l)] for l in levels] + [steps]


def r2f_step_prompts(transitions, n_prompts, steps):
    """Index of the prompt conditioning each step, with the official (faithful) advance rule."""
    rare = n_prompts - 1
    mode, used = 0, []
    for i in range(steps):
        while i == transitions[mode] and transitions[mode] != 0:
            mode += 1
        used.append(mode if i % R2F_ALT_STEP == 0 else rare)
    return used


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
def r2f_loop(pipe, model_dir, prompts, levels, init, steps, guidance, max_sequence_length):
    """One R2F SD3 sampling run, written out by hand (no pipeline __call__)."""
    cpu = torch.device("cpu")
    # every prompt encoded once, before the loop; CFG batch order [negative "", prompt]
    embeds = []
    for p in prompts:
        pe, npe, ppe, nppe = pipe.encode_prompt(
            prompt=p, prompt_2=p, prompt_3=p, device=cpu, num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt="", negative_prompt_2="", negative_prompt_3="",
            max_sequence_length=max_sequence_length,
        )
        embeds.append((torch.cat([npe, pe], dim=0), torch.cat([nppe, ppe], dim=0)))
    transitions = r2f_transitions(levels, len(prompts), steps)
    plan = r2f_step_prompts(transitions, len(prompts), steps)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler")
    scheduler.set_timesteps(steps, device=cpu)
    assert len(scheduler.timesteps) == steps
    latents = init.clone()
    rare = len(prompts) - 1
    mode, used = 0, []
    for i, t in enumerate(scheduler.timesteps):
        while i == transitions[mode] and transitions[mode] != 0:
            mode += 1
        idx = mode if i % R2F_ALT_STEP == 0 else rare
        used.append(idx)
        prompt_embeds, pooled = embeds[idx]
        latent_in = torch.cat([latents] * 2)
        noise_pred = pipe.transformer(
            hidden_states=latent_in, timestep=t.expand(latent_in.shape[0]),
            encoder_hidden_states=prompt_embeds, pooled_projections=pooled, return_dict=False,
        )[0]
        uncond, cond = noise_pred.chunk(2)
        noise_pred = uncond + guidance * (cond - uncond)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    assert used == plan, (used, plan)
    return latents, used, transitions


@torch.no_grad()
def decode_u8(pipe, latents):
    sf, sh = pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor
    decoded = pipe.vae.decode(latents / sf + sh, return_dict=False)[0]
    img = pipe.image_processor.postprocess(decoded, output_type="np")
    return (img * 255).round().astype(np.uint8)[0]


@torch.no_grad()
def compute_r2f_reference(model_dir, plain_ref):
    run = R2F_RUN
    cfg_run = CONFIGS[run["config"]]["run"]
    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.to("cpu")
    vsf = pipe.vae_scale_factor
    prompts, rare = run["prompts"], run["prompts"][-1]

    # 1) the hand loop (single-prompt plan: no switching) == diffusers' own loop
    assert rare == cfg_run["prompt"] and run["width"] == cfg_run["width"]
    assert run["height"] == cfg_run["height"] and run["guidance"] == cfg_run["guidance"]
    checks = []
    for chk in R2F_LOOP_CHECKS:
        torch.manual_seed(chk["seed"])
        init = torch.randn((1, 16, cfg_run["height"] // vsf, cfg_run["width"] // vsf),
                           dtype=torch.float32)
        mine, used, transitions = r2f_loop(
            pipe, model_dir, [rare], [], init, chk["steps"], cfg_run["guidance"],
            chk["max_sequence_length"])
        assert transitions == [0] and used == [0] * chk["steps"]
        ref = pipe(rare, latents=init.clone(), output_type="latent", negative_prompt="",
                   height=cfg_run["height"], width=cfg_run["width"],
                   num_inference_steps=chk["steps"], guidance_scale=cfg_run["guidance"],
                   max_sequence_length=chk["max_sequence_length"]).images
        err = rel_err(mine, ref)
        entry = dict(chk, guidance=cfg_run["guidance"], prompt=rare, rel_err_vs_pipeline=err)
        if chk["seed"] == cfg_run["seed"] and chk["steps"] == cfg_run["steps"]:
            # the very settings of the stored plain reference: also against its final_latents
            assert torch.equal(init, plain_ref["init_latents"])
            entry["rel_err_vs_stored_final_latents"] = rel_err(mine, plain_ref["final_latents"])
            assert entry["rel_err_vs_stored_final_latents"] <= R2F_LOOP_CHECK_RTOL, entry
        assert err <= R2F_LOOP_CHECK_RTOL, entry
        checks.append(entry)

    # the R2F encodings use T5 length 77: the rare prompt's embedding must be the stored
    # [CLIP (77) ; T5-77 (77)] pieces of the plain reference
    pe77 = pipe.encode_prompt(prompt=rare, prompt_2=rare, prompt_3=rare, device=torch.device("cpu"),
                              num_images_per_prompt=1, do_classifier_free_guidance=True,
                              negative_prompt="", max_sequence_length=R2F_T5_TOKENS)[0]
    assert pe77.shape == (1, CLIP_MAX_LEN + R2F_T5_TOKENS, 32), pe77.shape
    assert torch.equal(pe77[:, CLIP_MAX_LEN:], plain_ref["t5_hidden_77"][1:])
    assert torch.equal(pe77[:, :CLIP_MAX_LEN], plain_ref["prompt_embeds"][:, :CLIP_MAX_LEN])

    # 2) the R2F run
    torch.manual_seed(run["seed"])
    init = torch.randn((1, 16, run["height"] // vsf, run["width"] // vsf), dtype=torch.float32)
    final, used, transitions = r2f_loop(
        pipe, model_dir, prompts, run["levels"], init, run["steps"], run["guidance"],
        R2F_T5_TOKENS)
    img_u8 = decode_u8(pipe, final)
    assert img_u8.shape == (run["height"], run["width"], 3)

    # 3) a plain run of the rare prompt with the same seed / steps / T5 length
    plain, plain_used, _ = r2f_loop(
        pipe, model_dir, [rare], [], init, run["steps"], run["guidance"], R2F_T5_TOKENS)
    assert plain_used == [0] * run["steps"]
    plain_vs_r2f = rel_err(final, plain)
    assert plain_vs_r2f > 1e-3, plain_vs_r2f  # R2F must actually change the result

    tensors = {
        "r2f_init_latents": init.contiguous(),
        "r2f_final_latents": final.contiguous(),
        "r2f_image_u8": torch.from_numpy(img_u8).to(torch.uint8).contiguous(),
        "r2f_plain_final_latents": plain.contiguous(),
    }
    meta = {
        "model": run["config"],
        "plan": {
            "visual_detail_level": [str(l) for l in run["levels"]],
            "r2f_prompt": [list(prompts)],
        },
        "prompt": rare,
        "negative_prompt": "",
        "steps": run["steps"],
        "guidance": run["guidance"],
        "seed": run["seed"],
        "width": run["width"],
        "height": run["height"],
        "t5_tokens": R2F_T5_TOKENS,
        "schedule": "faithful",
        "alt_step": R2F_ALT_STEP,
        "stop_step_map": R2F_STOP_STEP_MAP,
        "transition_steps": transitions,
        "r2f_step_prompt": used,
        "plain_vs_r2f_rel_diff": plain_vs_r2f,
        "hand_loop_checks": checks,
        "tensors": {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
                    for k, v in sorted(tensors.items())},
        "note": "r2f_final_latents: hand-written R2F loop (pipe.encode_prompt per prompt with "
                "negative prompt \"\" and T5 max_sequence_length t5_tokens, batch [uncond, cond], "
                "CFG, FlowMatchEulerDiscreteScheduler.step); r2f_init_latents = "
                "torch.manual_seed(seed); torch.randn((1,16,H/f,W/f)) on CPU; "
                "r2f_plain_final_latents: the same loop with the single prompt [prompt]; "
                "plain_vs_r2f_rel_diff = max|r2f_final - plain_final| / max|plain_final|",
        "versions": versions(),
    }
    return tensors, meta


# --------------------------------------------------------------------------------------------
# SDXL fixtures.
# --------------------------------------------------------------------------------------------
def write_sdxl_tokenizers(model_dir, encoder, merges):
    """tokenizer/ (CLIP-L, pad <|endoftext|>) and tokenizer_2/ (CLIP-G, pad "!"), the same files
    as in the SD3 folders (vocab.json + merges.txt, no tokenizer.json)."""
    for sub in ("tokenizer", "tokenizer_2"):
        d = Path(model_dir) / sub
        if d.exists():
            shutil.rmtree(d)
    write_clip_tokenizer(Path(model_dir) / "tokenizer", encoder, merges, "<|endoftext|>")
    write_clip_tokenizer(Path(model_dir) / "tokenizer_2", encoder, merges, "!")


def prefix_clip_text_model_keys(folder):
    """transformers 5 saves CLIPTextModel without the `text_model.` prefix (its module tree no
    longer has that level); the published SDXL text_encoder/model.safetensors (and every
    transformers 4 save) has it.  Rewrite the file in the published layout; transformers 5 loads
    both.  save_file(..., metadata={"format": "pt"}) reproduces transformers' own files byte for
    byte, so this stays deterministic."""
    f = Path(folder) / "model.safetensors"
    sd = load_file(f)
    if all(k.startswith("text_model.") for k in sd):
        return
    assert not any(k.startswith("text_model.") for k in sd)
    save_file({"text_model." + k: v for k, v in sd.items()}, f, metadata={"format": "pt"})
    _, info = CLIPTextModel.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info


def build_sdxl_text_encoders():
    """Same configs, seeds and perturbation seeds as build_text_encoders (SD3), but CLIP-L is a
    plain CLIPTextModel (SDXL has no CLIP-L projection)."""
    torch.manual_seed(1)
    te1 = CLIPTextModel(CLIPTextConfig(**CLIP_L_KWARGS))
    n1 = perturb_constant_params(te1, 1001)
    torch.manual_seed(2)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_KWARGS))
    n2 = perturb_constant_params(te2, 1002)
    return (te1.eval(), te2.eval()), (n1, n2)


def build_sdxl_pipeline(cfg, tok_l, tok_g):
    (te1, te2), perturbed = build_sdxl_text_encoders()
    torch.manual_seed(cfg["unet_seed"])
    unet = UNet2DConditionModel(**cfg["unet"])
    perturbed += (perturb_constant_params(unet, 1000 + cfg["unet_seed"]),)
    torch.manual_seed(cfg["vae_seed"])
    vae = AutoencoderKL(**cfg["vae"])
    perturbed += (perturb_constant_params(vae, 1000 + cfg["vae_seed"]),)
    # nothing in the UNet / VAE may be left constant (conv_out, attention out-projections, ...)
    for m in (te1, te2, unet, vae):
        for n, p in m.named_parameters():
            flat = p.detach().reshape(-1)
            assert flat.numel() < 2 or not bool((flat == flat[0]).all()), n
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(), text_encoder=te1, text_encoder_2=te2, tokenizer=tok_l, tokenizer_2=tok_g,
        unet=unet.eval(), scheduler=EulerDiscreteScheduler(**SDXL_EULER_KWARGS),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    return pipe, perturbed


def load_sdxl_pipeline(model_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(
        model_dir, dtype=torch.float32, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.to("cpu")
    assert type(pipe.text_encoder) is CLIPTextModel, type(pipe.text_encoder)
    assert type(pipe.text_encoder_2) is CLIPTextModelWithProjection, type(pipe.text_encoder_2)
    assert pipe.watermark is None and pipe.config.force_zeros_for_empty_prompt
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    return pipe


def sdxl_euler(model_dir):
    return EulerDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler")


def sdxl_dpm(model_dir):
    """DPM-Solver++ 2M Karras exactly as the official R2F-SDXL code builds it."""
    euler_config = EulerDiscreteScheduler.load_config(model_dir, subfolder="scheduler")
    sch = DPMSolverMultistepScheduler.from_config(euler_config, use_karras_sigmas=True)
    c = sch.config
    assert (c.algorithm_type, c.solver_order, c.solver_type, c.lower_order_final,
            c.final_sigmas_type, c.euler_at_final, c.prediction_type, c.beta_schedule) == (
        "dpmsolver++", 2, "midpoint", True, "zero", False, "epsilon", "scaled_linear"), dict(c)
    return sch


def sdxl_add_time_ids(pipe, height, width):
    return pipe._get_add_time_ids(
        (height, width), (0, 0), (height, width), dtype=torch.float32,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)


def tensor_meta(tensors):
    return {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
            for k, v in sorted(tensors.items())}


@torch.no_grad()
def decode_u8_sdxl(pipe, latents):
    """The pipeline's decode path (VAE already fp32, so force_upcast does nothing)."""
    assert pipe.vae.dtype == torch.float32
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    img = pipe.image_processor.postprocess(decoded, output_type="np")
    return (img * 255).round().astype(np.uint8)[0]


@torch.no_grad()
def compute_sdxl_references(model_dir, name, cfg):
    run = cfg["run"]
    pipe = load_sdxl_pipeline(model_dir)
    vsf = pipe.vae_scale_factor
    H, W = run["height"], run["width"]
    lat_h, lat_w = H // vsf, W // vsf
    prompt = run["prompt"]
    cpu = torch.device("cpu")
    out = {}

    # --- tokenizers / text encoders (batch 1, no attention mask, as the pipeline calls them)
    out["clip_l_ids"] = tok_ids(pipe.tokenizer, [prompt], pipe.tokenizer.model_max_length)
    out["clip_g_ids"] = tok_ids(pipe.tokenizer_2, [prompt], pipe.tokenizer_2.model_max_length)
    assert out["clip_l_ids"].shape == (1, CLIP_MAX_LEN) == out["clip_g_ids"].shape
    o1 = pipe.text_encoder(out["clip_l_ids"], output_hidden_states=True)
    assert len(o1.hidden_states) == pipe.text_encoder.config.num_hidden_layers + 1
    out["clip_l_hidden"] = o1.hidden_states[-2]
    o2 = pipe.text_encoder_2(out["clip_g_ids"], output_hidden_states=True)
    assert len(o2.hidden_states) == pipe.text_encoder_2.config.num_hidden_layers + 1
    out["clip_g_hidden"] = o2.hidden_states[-2]
    out["clip_g_text_embeds"] = o2.text_embeds
    assert out["clip_g_text_embeds"].shape == (1, 16)

    pe, npe, ppe, nppe = pipe.encode_prompt(
        prompt, device=cpu, num_images_per_prompt=1, do_classifier_free_guidance=True,
        negative_prompt=None)
    out["prompt_embeds"], out["negative_prompt_embeds"] = pe, npe
    out["pooled_prompt_embeds"], out["negative_pooled_prompt_embeds"] = ppe, nppe
    assert pe.shape == (1, CLIP_MAX_LEN, 24) and ppe.shape == (1, 16)
    assert torch.equal(pe, torch.cat([out["clip_l_hidden"], out["clip_g_hidden"]], dim=-1))
    assert torch.equal(ppe, out["clip_g_text_embeds"])  # pooled = CLIP-G text_embeds only
    assert not npe.any() and not nppe.any()  # force_zeros_for_empty_prompt: true zeros
    out["add_time_ids"] = sdxl_add_time_ids(pipe, H, W)
    assert out["add_time_ids"].tolist() == [[H, W, 0, 0, H, W]]

    # --- one UNet forward ---
    torch.manual_seed(123)  # drawn in this order: sample, context, text_embeds
    out["unet_in_sample"] = torch.randn((2, 4, lat_h, lat_w), dtype=torch.float32)
    out["unet_in_timestep"] = torch.tensor(SDXL_UNET_TIMESTEPS, dtype=torch.float32)
    out["unet_in_context"] = torch.randn((2, CLIP_MAX_LEN, 24), dtype=torch.float32)
    out["unet_in_text_embeds"] = torch.randn((2, 16), dtype=torch.float32)
    out["unet_in_time_ids"] = torch.tensor([[H, W, 0, 0, H, W]] * 2, dtype=torch.float32)
    out["unet_out"] = pipe.unet(
        out["unet_in_sample"], out["unet_in_timestep"],
        encoder_hidden_states=out["unet_in_context"],
        added_cond_kwargs={"text_embeds": out["unet_in_text_embeds"],
                           "time_ids": out["unet_in_time_ids"]},
    ).sample

    # --- VAE decode (through post_quant_conv) ---
    sf = pipe.vae.config.scaling_factor
    assert sf == 0.13025 and pipe.vae.config.force_upcast and pipe.vae.post_quant_conv is not None
    torch.manual_seed(321)
    out["vae_in"] = torch.randn((1, 4, lat_h, lat_w), dtype=torch.float32)
    out["vae_out"] = pipe.vae.decode(out["vae_in"] / sf).sample

    # --- schedulers, each fresh from the folder's scheduler config ---
    for n in SDXL_SCHEDULER_STEP_COUNTS:
        sch = sdxl_euler(model_dir)
        sch.set_timesteps(n)
        out[f"euler_timesteps_{n}"] = sch.timesteps.clone()
        out[f"euler_sigmas_{n}"] = sch.sigmas.clone()
        out[f"euler_init_noise_sigma_{n}"] = torch.as_tensor(sch.init_noise_sigma,
                                                            dtype=torch.float32).reshape(())
        sch = sdxl_dpm(model_dir)
        sch.set_timesteps(n)
        assert sch.timesteps.dtype == torch.int64 and float(sch.init_noise_sigma) == 1.0
        out[f"dpm_timesteps_{n}"] = sch.timesteps.clone()
        out[f"dpm_sigmas_{n}"] = sch.sigmas.clone()

    # --- DPM++ 2M Karras step by step ---
    n = SDXL_DPM_STEP_CHECK_STEPS
    sch = sdxl_dpm(model_dir)
    sch.set_timesteps(n)
    torch.manual_seed(77)  # drawn in this order: model outputs, sample0
    out["dpm_step_model_outputs"] = torch.randn((n, 1, 4, lat_h, lat_w), dtype=torch.float32)
    out["dpm_step_sample0"] = torch.randn((1, 4, lat_h, lat_w), dtype=torch.float32)
    out["dpm_step_timesteps"] = sch.timesteps.clone()
    out["dpm_step_sigmas"] = sch.sigmas.clone()
    sample, samples = out["dpm_step_sample0"].clone(), []
    for i, t in enumerate(sch.timesteps):
        sample = sch.step(out["dpm_step_model_outputs"][i], t, sample, return_dict=False)[0]
        samples.append(sample.clone())
    out["dpm_step_samples"] = torch.stack(samples)

    # --- full pipeline, Euler (the folder's scheduler) ---
    torch.manual_seed(run["seed"])
    init = torch.randn((1, 4, lat_h, lat_w), dtype=torch.float32)
    out["init_latents"] = init
    prepared = []
    orig_prepare = pipe.prepare_latents

    def prepare_spy(*a, **k):
        r = orig_prepare(*a, **k)
        prepared.append(r.detach().clone())
        return r

    pipe.prepare_latents = prepare_spy
    steps, step_ts = [], []

    def cb(p, i, t, kw):
        steps.append(kw["latents"].detach().clone())
        step_ts.append(float(t))
        return {}

    common = dict(height=H, width=W, guidance_scale=run["guidance"])
    final = pipe(prompt, latents=init.clone(), output_type="latent",
                 num_inference_steps=run["steps"], callback_on_step_end=cb,
                 callback_on_step_end_tensor_inputs=["latents"], **common).images
    assert len(steps) == run["steps"] and torch.equal(steps[-1], final)
    sch = sdxl_euler(model_dir)
    sch.set_timesteps(run["steps"])
    assert step_ts == [float(t) for t in sch.timesteps], step_ts
    # prepare_latents multiplies passed latents by init_noise_sigma (Euler leading: sqrt(s^2+1))
    euler_ins = sch.init_noise_sigma
    assert len(prepared) == 1 and torch.equal(prepared[0], init * euler_ins), "prepare_latents"
    out["start_latents"] = prepared[0]
    out["final_latents"] = final
    out["step_latents"] = torch.stack(steps)
    img_u8 = decode_u8_sdxl(pipe, final)
    assert img_u8.shape == (H, W, 3)
    out["image_u8"] = torch.from_numpy(img_u8)
    pil = pipe(prompt, latents=init.clone(), output_type="pil",
               num_inference_steps=run["steps"], **common).images[0]
    assert np.array_equal(np.asarray(pil), img_u8), "pil output differs from np path"

    # --- full pipeline, DPM++ 2M Karras ---
    euler_sched = pipe.scheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config,
                                                             use_karras_sigmas=True)
    dsteps, dts = [], []

    def dcb(p, i, t, kw):
        dsteps.append(kw["latents"].detach().clone())
        dts.append(int(t))
        return {}

    dfinal = pipe(prompt, latents=init.clone(), output_type="latent",
                  num_inference_steps=run["dpm_steps"], callback_on_step_end=dcb,
                  callback_on_step_end_tensor_inputs=["latents"], **common).images
    assert len(prepared) == 3 and torch.equal(prepared[2], init)  # DPM init_noise_sigma = 1
    assert torch.equal(dsteps[-1], dfinal)
    out["dpm_final_latents"] = dfinal
    out["dpm_step_latents"] = torch.stack(dsteps)
    dimg = decode_u8_sdxl(pipe, dfinal)
    out["dpm_image_u8"] = torch.from_numpy(dimg)
    pil = pipe(prompt, latents=init.clone(), output_type="pil",
               num_inference_steps=run["dpm_steps"], **common).images[0]
    assert np.array_equal(np.asarray(pil), dimg), "pil output differs from np path (dpm)"
    pipe.scheduler = euler_sched
    pipe.prepare_latents = orig_prepare

    tensors = {}
    for k, v in sorted(out.items()):
        v = v.detach().contiguous()
        if k in ("clip_l_ids", "clip_g_ids") or k.startswith("dpm_timesteps") \
                or k == "dpm_step_timesteps":
            v = v.to(torch.int64)
        elif k.endswith("image_u8"):
            v = v.to(torch.uint8)
        else:
            v = v.to(torch.float32)
        tensors[k] = v
    meta = {
        "model": name,
        "pipeline": "StableDiffusionXLPipeline",
        "prompt": prompt,
        "negative_prompt": None,
        "negative": "zeros (force_zeros_for_empty_prompt=True, no negative prompt)",
        "seed": run["seed"],
        "width": W,
        "height": H,
        "steps": run["steps"],
        "dpm_steps": run["dpm_steps"],
        "guidance": run["guidance"],
        "vae_scale_factor": vsf,
        "latent_height": lat_h,
        "latent_width": lat_w,
        "vae_scaling_factor": sf,
        "add_time_ids": out["add_time_ids"][0].tolist(),
        "pipeline_timesteps": step_ts,
        "pipeline_init_noise_sigma": float(euler_ins),
        "dpm_pipeline_timesteps": dts,
        "scheduler": "EulerDiscreteScheduler (folder config)",
        "dpm_scheduler": "DPMSolverMultistepScheduler.from_config(euler_config, use_karras_sigmas=True)",
        # non-finite floats (lambda_min_clipped = -inf) as strings: strict JSON has no Infinity
        "dpm_scheduler_config": {
            k: (str(v) if isinstance(v, float) and not np.isfinite(v) else v)
            for k, v in sorted(dict(sdxl_dpm(model_dir).config).items()) if not k.startswith("_")},
        "unet_forward": {
            "timesteps": SDXL_UNET_TIMESTEPS,
            "input_seed": 123,
            "randn_order": ["unet_in_sample", "unet_in_context", "unet_in_text_embeds"],
            "time_ids": [H, W, 0, 0, H, W],
        },
        "vae_decode": {"input_seed": 321, "input": "vae_in / vae_scaling_factor"},
        "dpm_step_check": {
            "steps": n, "input_seed": 77,
            "randn_order": ["dpm_step_model_outputs", "dpm_step_sample0"],
            "note": "fresh scheduler, set_timesteps(steps), sample = step(model_outputs[i], "
                    "timesteps[i], sample).prev_sample; dpm_step_samples[i] = sample after step i",
        },
        "note": "init_latents = torch.manual_seed(seed); torch.randn((1,4,H/f,W/f)) (CPU), passed as "
                "latents=; prepare_latents multiplies it by scheduler.init_noise_sigma (start_latents). "
                "step_latents / dpm_step_latents: latents after each pipeline step. image_u8 = "
                "(postprocess(vae.decode(final_latents / vae_scaling_factor)) * 255).round()",
        "tensors": tensor_meta(tensors),
        "versions": versions(),
    }
    return pipe, tensors, meta


def sdxl_r2f_transitions(levels, steps):
    """T = [M[l] for l in levels] + [N]; SDXL has NO length-1 guard."""
    return [SDXL_R2F_STOP_STEP_MAP[int(l)] for l in levels] + [steps]


@torch.no_grad()
def sdxl_r2f_loop(pipe, model_dir, prompts, levels, init, steps, guidance, height, width):
    """One R2F SDXL sampling run, written out by hand with the pipeline's components."""
    cpu = torch.device("cpu")
    embeds = []
    for p in prompts:  # every prompt encoded once, before the loop; CFG order [uncond, cond]
        pe, npe, ppe, nppe = pipe.encode_prompt(
            p, device=cpu, num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=None)
        assert not npe.any() and not nppe.any()
        embeds.append((torch.cat([npe, pe], dim=0), torch.cat([nppe, ppe], dim=0)))
    add_time_ids = sdxl_add_time_ids(pipe, height, width)
    add_time_ids = torch.cat([add_time_ids, add_time_ids], dim=0)
    transitions = sdxl_r2f_transitions(levels, steps)
    scheduler = sdxl_dpm(model_dir)
    scheduler.set_timesteps(steps, device=cpu)
    scheduler.set_begin_index(0)
    assert len(scheduler.timesteps) == steps
    latents = init.clone() * scheduler.init_noise_sigma
    rare = len(prompts) - 1
    mode, used = 0, []
    for i, t in enumerate(scheduler.timesteps):
        while i == transitions[mode] and transitions[mode] != 0:
            mode += 1
        idx = mode if i % R2F_ALT_STEP == 0 else rare
        used.append(idx)
        prompt_embeds, pooled = embeds[idx]
        latent_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise_pred = pipe.unet(
            latent_in, t, encoder_hidden_states=prompt_embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": add_time_ids},
            return_dict=False,
        )[0]
        uncond, cond = noise_pred.chunk(2)
        noise_pred = uncond + guidance * (cond - uncond)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    return latents, used, transitions


@torch.no_grad()
def compute_sdxl_r2f_reference(model_dir, plain_ref):
    run = SDXL_R2F_RUN
    cfg_run = SDXL_CONFIGS[run["config"]]["run"]
    pipe = load_sdxl_pipeline(model_dir)
    vsf = pipe.vae_scale_factor
    H, W = run["height"], run["width"]
    prompts, rare = run["prompts"], run["prompts"][-1]
    assert rare == cfg_run["prompt"] and (W, H) == (cfg_run["width"], cfg_run["height"])
    assert run["guidance"] == cfg_run["guidance"]
    euler_sched = pipe.scheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(euler_sched.config,
                                                             use_karras_sigmas=True)

    # 1) the hand loop with a single-prompt plan == StableDiffusionXLPipeline.__call__
    checks, plain_by_seed = [], {}
    for chk in SDXL_R2F_LOOP_CHECKS:
        torch.manual_seed(chk["seed"])
        init = torch.randn((1, 4, H // vsf, W // vsf), dtype=torch.float32)
        mine, used, transitions = sdxl_r2f_loop(
            pipe, model_dir, [rare], [], init, chk["steps"], run["guidance"], H, W)
        assert transitions == [chk["steps"]] and used == [0] * chk["steps"]
        ref = pipe(rare, latents=init.clone(), output_type="latent", height=H, width=W,
                   num_inference_steps=chk["steps"], guidance_scale=run["guidance"]).images
        err = rel_err(mine, ref)
        entry = dict(chk, guidance=run["guidance"], prompt=rare, rel_err_vs_pipeline=err)
        if chk["seed"] == cfg_run["seed"] and chk["steps"] == cfg_run["dpm_steps"]:
            assert torch.equal(init, plain_ref["init_latents"])
            entry["rel_err_vs_stored_dpm_final_latents"] = rel_err(mine, plain_ref["dpm_final_latents"])
            assert entry["rel_err_vs_stored_dpm_final_latents"] <= R2F_LOOP_CHECK_RTOL, entry
        assert err <= R2F_LOOP_CHECK_RTOL, entry
        checks.append(entry)
        plain_by_seed[(chk["seed"], chk["steps"])] = mine
    pipe.scheduler = euler_sched

    # 2) the R2F run
    torch.manual_seed(run["seed"])
    init = torch.randn((1, 4, H // vsf, W // vsf), dtype=torch.float32)
    final, used, transitions = sdxl_r2f_loop(
        pipe, model_dir, prompts, run["levels"], init, run["steps"], run["guidance"], H, W)
    assert transitions == [5, 3, 50], transitions
    img_u8 = decode_u8_sdxl(pipe, final)
    assert img_u8.shape == (H, W, 3)

    # 3) plain run of the rare prompt, same seed / steps (checked against __call__ above)
    plain, plain_used, _ = sdxl_r2f_loop(
        pipe, model_dir, [rare], [], init, run["steps"], run["guidance"], H, W)
    assert plain_used == [0] * run["steps"]
    assert torch.equal(plain, plain_by_seed[(run["seed"], run["steps"])])
    plain_vs_r2f = rel_err(final, plain)
    assert plain_vs_r2f > 1e-3, plain_vs_r2f

    tensors = {
        "r2f_init_latents": init.contiguous(),
        "r2f_final_latents": final.contiguous(),
        "r2f_image_u8": torch.from_numpy(img_u8).to(torch.uint8).contiguous(),
        "r2f_plain_final_latents": plain.contiguous(),
    }
    meta = {
        "model": run["config"],
        "plan": {
            "visual_detail_level": [str(l) for l in run["levels"]],
            "r2f_prompt": [list(prompts)],
        },
        "prompt": rare,
        "negative_prompt": None,
        "negative": "zeros (force_zeros_for_empty_prompt=True, no negative prompt), sequence and pooled",
        "add_time_ids": [H, W, 0, 0, H, W],
        "steps": run["steps"],
        "guidance": run["guidance"],
        "seed": run["seed"],
        "width": W,
        "height": H,
        "scheduler": "dpmsolver++-2m-karras",
        "schedule": "faithful",
        "alt_step": R2F_ALT_STEP,
        "stop_step_map": SDXL_R2F_STOP_STEP_MAP,
        "transition_steps": transitions,
        "r2f_step_prompt": used,
        "plain_vs_r2f_rel_diff": plain_vs_r2f,
        "hand_loop_checks": checks,
        "tensors": tensor_meta(tensors),
        "note": "r2f_final_latents: hand-written R2F loop (pipe.encode_prompt per prompt, 77 CLIP "
                "tokens, negative_prompt=None -> zero negatives; batch [uncond, cond]; "
                "DPMSolverMultistepScheduler.from_config(euler_config, use_karras_sigmas=True); "
                "latents * init_noise_sigma; scale_model_input; CFG; step); r2f_init_latents = "
                "torch.manual_seed(seed); torch.randn((1,4,H/f,W/f)) on CPU; "
                "r2f_plain_final_latents: the same loop with the single prompt [prompt]; "
                "plain_vs_r2f_rel_diff = max|r2f_final - plain_final| / max|plain_final|",
        "versions": versions(),
    }
    return tensors, meta


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


def tokenizer_reference(pipe, t5_file):
    raw = Tokenizer.from_file(str(t5_file))
    entries = []
    for p in TOKENIZER_PROMPTS:
        e = {
            "prompt": p,
            "clip_l": tok_ids(pipe.tokenizer, [p], CLIP_MAX_LEN)[0].tolist(),
            "clip_g": tok_ids(pipe.tokenizer_2, [p], CLIP_MAX_LEN)[0].tolist(),
            "t5_77": tok_ids(pipe.tokenizer_3, [p], CLIP_MAX_LEN)[0].tolist(),
            "t5_256": tok_ids(pipe.tokenizer_3, [p], T5_MAX_LEN)[0].tolist(),
        }
        # transformers (reference) vs. raw `tokenizers` on tokenizer.json, same padding/truncation
        for n, key in ((CLIP_MAX_LEN, "t5_77"), (T5_MAX_LEN, "t5_256")):
            raw.enable_padding(pad_id=0, pad_token="<pad>", length=n)
            raw.enable_truncation(max_length=n)
            ids = raw.encode(p).ids
            if ids != e[key]:
                raise SystemExit(f"T5 transformers/tokenizers mismatch for {p!r} at {n}:\n{e[key]}\n{ids}")
        entries.append(e)
    return {
        "max_length_clip": CLIP_MAX_LEN,
        "max_length_t5": [CLIP_MAX_LEN, T5_MAX_LEN],
        "note": "ids as produced by the SD3 pipeline tokenizers with padding='max_length', "
                "truncation=True (transformers " + transformers.__version__ + ")",
        "prompts": entries,
    }


# --------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ref_dir = out / "ref"
    for d in [ref_dir] + [out / n for n in list(CONFIGS) + list(SDXL_CONFIGS)]:
        if d.exists():
            shutil.rmtree(d)
    ref_dir.mkdir()

    # tokenizers
    encoder, merges = build_clip_vocab()
    t5_tok = train_t5_tokenizer()
    t5_json = t5_tok.to_str(pretty=True)
    assert train_t5_tokenizer().to_str(pretty=True) == t5_json, "Unigram training is not deterministic"
    t5_vocab_size = t5_tok.get_vocab_size()

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizers(tmp, encoder, merges, t5_json)
        tok_l = CLIPTokenizer.from_pretrained(Path(tmp) / "tokenizer")
        tok_g = CLIPTokenizer.from_pretrained(Path(tmp) / "tokenizer_2")
        tok_t5 = AutoTokenizer.from_pretrained(Path(tmp) / "tokenizer_3")
        ids = tok_l("A hairy frog,").input_ids
        assert ids == [49406, 320, 26513, 11438, 267, 49407], ids
        assert tok_g.pad_token_id == 0 and tok_l.pad_token_id == 49407
        assert len(tok_t5) == t5_vocab_size, (len(tok_t5), t5_vocab_size)

    summary = {}
    tok_ref = None
    for name, cfg in CONFIGS.items():
        model_dir = out / name
        text_encoders, perturbed = build_text_encoders(t5_vocab_size)
        torch.manual_seed(cfg["transformer_seed"])
        transformer = SD3Transformer2DModel(**cfg["transformer"])
        perturbed += (perturb_constant_params(transformer, 1000 + cfg["transformer_seed"]),)
        torch.manual_seed(cfg["vae_seed"])
        vae = AutoencoderKL(**cfg["vae"])
        perturbed += (perturb_constant_params(vae, 1000 + cfg["vae_seed"]),)
        scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_KWARGS)
        pipe = StableDiffusion3Pipeline(
            transformer=transformer.eval(), scheduler=scheduler, vae=vae.eval(),
            text_encoder=text_encoders[0], tokenizer=tok_l,
            text_encoder_2=text_encoders[1], tokenizer_2=tok_g,
            text_encoder_3=text_encoders[2], tokenizer_3=tok_t5,
        )
        pipe.save_pretrained(model_dir, safe_serialization=True)
        del pipe
        # replace whatever save_pretrained wrote for the tokenizers with our hand-written files
        write_tokenizers(model_dir, encoder, merges, t5_json)

        pipe, tensors, meta = compute_references(model_dir, name, cfg)
        save_file(tensors, ref_dir / f"{name}.safetensors", metadata={"format": "pt"})
        dump_json(ref_dir / f"{name}.json", meta)
        summary[name] = dict(perturbed_params=perturbed, tensors=meta["tensors"])
        # tokenizers are identical in every folder: check and write the token reference once
        tr = tokenizer_reference(pipe, model_dir / "tokenizer_3" / "tokenizer.json")
        if tok_ref is None:
            tok_ref = tr
        assert tr == tok_ref
        del pipe

    dump_json(ref_dir / "tokenizers.json", tok_ref)

    # R2F reference run (after everything else, so no existing output is affected)
    name = R2F_RUN["config"]
    plain_ref = load_file(ref_dir / f"{name}.safetensors")
    r2f_tensors, r2f_meta = compute_r2f_reference(out / name, plain_ref)
    save_file(r2f_tensors, ref_dir / f"{name}-r2f.safetensors", metadata={"format": "pt"})
    dump_json(ref_dir / f"{name}-r2f.json", r2f_meta)

    # SDXL fixtures (after all SD3 outputs, which they do not touch)
    sdxl_summary = {}
    for name, cfg in SDXL_CONFIGS.items():
        model_dir = out / name
        pipe, perturbed = build_sdxl_pipeline(cfg, tok_l, tok_g)
        pipe.save_pretrained(model_dir, safe_serialization=True)
        del pipe
        write_sdxl_tokenizers(model_dir, encoder, merges)
        prefix_clip_text_model_keys(model_dir / "text_encoder")
        for sub in ("tokenizer", "tokenizer_2"):
            assert not (model_dir / sub / "tokenizer.json").exists()
        # text encoders: CLIP-G file == the SD3 one; CLIP-L == the SD3 CLIP-L's text_model
        sd3 = out / next(iter(CONFIGS))
        assert (model_dir / "text_encoder_2" / "model.safetensors").read_bytes() == \
            (sd3 / "text_encoder_2" / "model.safetensors").read_bytes()
        te_x, te_3 = (load_file(d / "text_encoder" / "model.safetensors") for d in (model_dir, sd3))
        assert set(te_3) - set(te_x) == {"text_projection.weight"}, set(te_3) ^ set(te_x)
        assert all(torch.equal(v, te_3[k]) for k, v in te_x.items())
        pipe, tensors, meta = compute_sdxl_references(model_dir, name, cfg)
        del pipe
        save_file(tensors, ref_dir / f"{name}.safetensors", metadata={"format": "pt"})
        json.dumps(meta, allow_nan=False)  # strict JSON (Rust serde_json) must parse it
        dump_json(ref_dir / f"{name}.json", meta)
        sdxl_summary[name] = dict(perturbed_params=perturbed, meta=meta)
    name = SDXL_R2F_RUN["config"]
    sdxl_plain_ref = load_file(ref_dir / f"{name}.safetensors")
    x_tensors, x_meta = compute_sdxl_r2f_reference(out / name, sdxl_plain_ref)
    save_file(x_tensors, ref_dir / f"{name}-r2f.safetensors", metadata={"format": "pt"})
    json.dumps(x_meta, allow_nan=False)
    dump_json(ref_dir / f"{name}-r2f.json", x_meta)

    # summary
    print(f"T5 tokenizer vocab size: {t5_vocab_size}")
    print(f"[{R2F_RUN['config']}-r2f] step prompts: {r2f_meta['r2f_step_prompt']}")
    for c in r2f_meta["hand_loop_checks"]:
        print(f"    hand loop vs pipeline ({c['steps']} steps, seed {c['seed']}, "
              f"T5 {c['max_sequence_length']}): rel err {c['rel_err_vs_pipeline']:.3e}")
    print(f"    plain_vs_r2f_rel_diff: {r2f_meta['plain_vs_r2f_rel_diff']:.6g}")
    for k, v in r2f_meta["tensors"].items():
        print(f"    {k:32s} {v['dtype']:8s} {v['shape']}")
    for name, s in summary.items():
        print(f"[{name}] perturbed constant params (clip_l, clip_g, t5, transformer, vae): "
              f"{s['perturbed_params']}")
        for k, v in s["tensors"].items():
            print(f"    {k:32s} {v['dtype']:8s} {v['shape']}")
    print(f"[{SDXL_R2F_RUN['config']}-r2f] step prompts: {x_meta['r2f_step_prompt']}")
    for c in x_meta["hand_loop_checks"]:
        print(f"    hand loop vs pipeline (DPM++ 2M Karras, {c['steps']} steps, seed {c['seed']}): "
              f"rel err {c['rel_err_vs_pipeline']:.3e}")
    print(f"    plain_vs_r2f_rel_diff: {x_meta['plain_vs_r2f_rel_diff']:.6g}")
    for k, v in x_meta["tensors"].items():
        print(f"    {k:32s} {v['dtype']:8s} {v['shape']}")
    for name, s in sdxl_summary.items():
        print(f"[{name}] perturbed constant params (clip_l, clip_g, unet, vae): "
              f"{s['perturbed_params']}")
        r = load_file(ref_dir / f"{name}.safetensors")
        print(f"    euler_timesteps_30: {r['euler_timesteps_30'][:3].tolist()} ... "
              f"{r['euler_timesteps_30'][-3:].tolist()}; init_noise_sigma_30 "
              f"{float(r['euler_init_noise_sigma_30']):.6f}")
        print(f"    dpm_timesteps_30:   {r['dpm_timesteps_30'][:3].tolist()} ... "
              f"{r['dpm_timesteps_30'][-3:].tolist()}")
        for k, v in s["meta"]["tensors"].items():
            print(f"    {k:32s} {v['dtype']:8s} {v['shape']}")
    total = 0
    unique = {}
    print("files:")
    for p in sorted(q for q in out.rglob("*") if q.is_file()):
        rel = p.relative_to(out)
        if rel.parts[0] not in set(CONFIGS) | set(SDXL_CONFIGS) | {"ref"}:
            continue
        size = p.stat().st_size
        total += size
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        unique[digest] = size
        print(f"  {size:>10,d}  {digest[:16]}  {rel}")
    u = sum(unique.values())
    print(f"total: {total:,d} bytes ({total / 2**20:.2f} MiB) on disk; "
          f"{u:,d} bytes ({u / 2**20:.2f} MiB) of distinct file contents "
          f"(the model folders share byte-identical text encoders and tokenizers)")


if __name__ == "__main__":
    main()
