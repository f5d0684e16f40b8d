"""Generate tiny random-weight Stable Diffusion 3 and SDXL fixtures plus diffusers reference outputs.

Usage:
    python scripts/make_fixtures.py [--out tests/fixtures] [--official R2FPLUS_FILE_OR_REPO]
    (or, from scripts/: python -m r2f_fixtures [--out DIR] [--official ...])

Writes (under --out, default tests/fixtures):
    sd3-tiny-a/   diffusers-layout SD3 model folder (VAE scale factor 8, non-square run)
    sd3-tiny-b/   diffusers-layout SD3 model folder (VAE scale factor 2, qk_norm="rms_norm")
    ref/sd3-tiny-a.safetensors, ref/sd3-tiny-a.json
    ref/sd3-tiny-b.safetensors, ref/sd3-tiny-b.json
    ref/tokenizers.json
    ref/sd3-tiny-a-r2f.safetensors, ref/sd3-tiny-a-r2f.json
                  R2F reference run (faithful alternating rare->frequent schedule, see
                  r2f.R2F_RUN) by a hand-written loop over the pipeline's components; the
                  loop is checked against StableDiffusion3Pipeline.__call__ first.
    sdxl-tiny-a/  diffusers-layout SDXL model folder (2-level UNet, VAE scale factor 8, non-square)
    sdxl-tiny-b/  diffusers-layout SDXL model folder (3-level UNet, VAE scale factor 2).  Its
                  text_encoder/model.safetensors is kept exactly as transformers' save_pretrained
                  writes it (keys at the root: `embeddings.token_embedding.weight`,
                  `encoder.layers.0.self_attn.q_proj.weight`, ...); every other CLIP text encoder
                  has the published `text_model.` layout (see sdxl.py).
    ref/sdxl-tiny-a.safetensors, ref/sdxl-tiny-a.json
    ref/sdxl-tiny-b.safetensors, ref/sdxl-tiny-b.json
                  StableDiffusionXLPipeline references: tokens, CLIP features, encode_prompt
                  (zero negatives), add_time_ids, one UNet forward, VAE decode, Euler and
                  DPM++ 2M Karras schedules, a DPM++ step-by-step check, full Euler and
                  DPM++ pipeline runs with decoded images.
    ref/sdxl-tiny-a-r2f.safetensors, ref/sdxl-tiny-a-r2f.json
                  R2F on SDXL (r2f.SDXL_R2F_RUN: HEAD stop-step map, DPM++ 2M Karras, zero
                  negatives) by a hand-written loop, checked against
                  StableDiffusionXLPipeline.__call__ first.
    ref/sd3-r2fplus.safetensors, ref/sd3-r2fplus.json
                  R2F+ references of the OFFICIAL R2Fplus_Diffusion_sd3.py (krafton-ai/
                  Rare-to-Frequent @ 834f459, imported unmodified from --official, never copied
                  here) on sd3-tiny-a/-b, detectors replaced by box/ellipse masks (r2fplus.py).
                  Without --official the existing files are kept as they are.

Everything is float32 on CPU and fully deterministic: running the script twice gives
byte-identical files.  Install the pinned environment with scripts/requirements-fixtures.txt
(open-clip-torch is installed with --no-deps: only its BPE vocabulary file is used, and the
package is located via importlib.util.find_spec without being imported).  torch's CPU kernels
may sum in a thread-count-dependent order: the committed files reproduce with 2 or 4 intra-op
threads (torch's default on a 2-core machine, or OMP_NUM_THREADS=4) but not single-threaded:
with OMP_NUM_THREADS=1 the SDXL UNet outputs, and the SDXL references built on them, differ in
the last bits.

Modules (one per family, like diffusers' per-pipeline get_dummy_components()):
    common           environment / logging setup (imported first), JSON and tensor helpers
    corpus           T5 tokenizer training corpus and the token-reference probe prompts
    tokenizer_files  CLIP BPE vocabulary + T5 Unigram training, tokenizer folders, ref/tokenizers.json
    sd3              SD3 configs, model folders and pipeline references
    sdxl             SDXL configs, model folders and pipeline references
    r2f              the R2F reference runs (hand-written loops) for SD3 and SDXL
    r2fplus          the R2F+ reference runs of the official pipeline (needs --official)
    main             orchestration and the printed summary
"""

# `common` must be imported before anything that imports `tokenizers`: it sets the environment
# (single-threaded rayon, offline hub, quiet logging) those imports read.
from . import common  # noqa: F401
