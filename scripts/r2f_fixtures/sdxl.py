"""SDXL fixtures: sdxl-tiny-a/, sdxl-tiny-b/ (StableDiffusionXLPipeline layout) and ref/sdxl-tiny-*.

Text encoders: the SD3 fixtures' CLIP-L config as a plain CLIPTextModel (no projection, like
SDXL) and the SD3 CLIP-G config as CLIPTextModelWithProjection, built with the same seeds, so
text_encoder_2/ is byte-identical to the SD3 folders' and text_encoder/ holds the SD3 CLIP-L's
text_model weights.  Tokenizers: the SD3 folders' tokenizer/ and tokenizer_2/.  UNet and VAE:
SDXL_CONFIGS; the scheduler is SDXL's published EulerDiscreteScheduler config.

text_encoder/model.safetensors comes in both layouts transformers produces.  transformers 5
saves a CLIPTextModel without the `text_model.` key prefix (its module tree no longer has that
level), while the published SDXL checkpoints (and every transformers 4 save) have it:
  * sdxl-tiny-a: rewritten into the published layout (`text_model.encoder.layers.0...`);
  * sdxl-tiny-b: kept exactly as save_pretrained wrote it (`encoder.layers.0.self_attn.q_proj
    .weight`, `embeddings.token_embedding.weight`, ... at the root).
Same tensors either way (checked), and diffusers loads both, so the references do not depend on
the layout.

ref/<name>.safetensors holds, for SDXL_CONFIGS[name]["run"]: token ids, CLIP hidden_states[-2]
and CLIP-G text_embeds, encode_prompt's embeddings (zero negatives: force_zeros_for_empty_prompt),
add_time_ids, one UNet forward, one VAE decode (through post_quant_conv), Euler and DPM++ 2M
Karras timesteps / sigmas for SDXL_SCHEDULER_STEP_COUNTS, a DPM++ step-by-step check, and full
Euler and DPM++ pipeline runs (start / per-step / final latents, decoded uint8 images).
"""

import contextlib

import numpy as np
import safetensors.torch
import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .common import (
    CLIP_MAX_LEN, CPU, cast_tensors, postprocess_u8, seeded, step_recorder, tensor_meta, tok_ids,
    versions,
)
from .sd3 import CLIP_G_KWARGS, CLIP_G_SEEDS, CLIP_L_KWARGS, CLIP_L_SEEDS

# text_encoder/ key layouts (see the module docstring)
PUBLISHED_LAYOUT = "text_model."  # keys rewritten under `text_model.`
SAVED_LAYOUT = "as saved"  # keys as transformers' save_pretrained writes them

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
        text_encoder_layout=PUBLISHED_LAYOUT,
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
        text_encoder_layout=SAVED_LAYOUT,
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
UNET_INPUT_SEED = 123  # drawn in this order: sample, context, text_embeds
VAE_INPUT_SEED = 321
DPM_STEP_INPUT_SEED = 77  # drawn in this order: model outputs, sample0


# --------------------------------------------------------------------------------------------
# Model folders.
# --------------------------------------------------------------------------------------------
def build_sdxl_text_encoders():
    """Same configs, seeds and perturbation seeds as sd3.build_text_encoders, but CLIP-L is a
    plain CLIPTextModel (SDXL has no CLIP-L projection)."""
    te1, n1 = seeded(CLIP_L_SEEDS[0], lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L_KWARGS)),
                     CLIP_L_SEEDS[1])
    te2, n2 = seeded(CLIP_G_SEEDS[0],
                     lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_KWARGS)),
                     CLIP_G_SEEDS[1])
    return (te1.eval(), te2.eval()), (n1, n2)


def assert_nothing_constant(*modules):
    """Nothing may be left constant (conv_out, attention out-projections, ...)."""
    for m in modules:
        for n, p in m.named_parameters():
            flat = p.detach().reshape(-1)
            assert flat.numel() < 2 or not bool((flat == flat[0]).all()), n


def build_sdxl_pipeline(cfg, tok_l, tok_g):
    (te1, te2), perturbed = build_sdxl_text_encoders()
    unet, n_unet = seeded(cfg["unet_seed"], lambda: UNet2DConditionModel(**cfg["unet"]),
                          1000 + cfg["unet_seed"])
    vae, n_vae = seeded(cfg["vae_seed"], lambda: AutoencoderKL(**cfg["vae"]), 1000 + cfg["vae_seed"])
    assert_nothing_constant(te1, te2, unet, vae)
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(), text_encoder=te1, text_encoder_2=te2, tokenizer=tok_l, tokenizer_2=tok_g,
        unet=unet.eval(), scheduler=EulerDiscreteScheduler(**SDXL_EULER_KWARGS),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    return pipe, perturbed + (n_unet, n_vae)


def clip_text_model_state(folder):
    """The CLIPTextModel weights of `folder` and whether transformers loads them cleanly."""
    sd = load_file(folder / "model.safetensors")
    _, info = CLIPTextModel.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    return sd


def prefix_clip_text_model_keys(folder):
    """Rewrite text_encoder/model.safetensors in the published layout (`text_model.` prefix);
    transformers 5 loads both.  save_file(..., metadata={"format": "pt"}) reproduces
    transformers' own files byte for byte, so this stays deterministic."""
    f = folder / "model.safetensors"
    sd = load_file(f)
    if all(k.startswith("text_model.") for k in sd):
        return
    assert not any(k.startswith("text_model.") for k in sd)
    save_file({"text_model." + k: v for k, v in sd.items()}, f, metadata={"format": "pt"})
    clip_text_model_state(folder)


def check_saved_layout(folder):
    """text_encoder/ as transformers 5 writes it: every key at the root, none under
    `text_model.`, and transformers loads it with nothing missing or unexpected."""
    sd = clip_text_model_state(folder)
    assert not any(k.startswith("text_model.") for k in sd), sorted(sd)[:3]
    for k in ("embeddings.token_embedding.weight", "encoder.layers.0.self_attn.q_proj.weight",
              "final_layer_norm.weight"):
        assert k in sd, k


def published_bytes(state):
    """The bytes prefix_clip_text_model_keys writes for `state` (keys without the prefix)."""
    return safetensors.torch.save({"text_model." + k: v for k, v in state.items()},
                                  metadata={"format": "pt"})


def check_sdxl_text_encoders(model_dir, sd3_dir, layout):
    """CLIP-G file == the SD3 one; CLIP-L == the SD3 CLIP-L's text_model, in either layout."""
    assert (model_dir / "text_encoder_2" / "model.safetensors").read_bytes() == \
        (sd3_dir / "text_encoder_2" / "model.safetensors").read_bytes()
    te_x, te_3 = (load_file(d / "text_encoder" / "model.safetensors") for d in (model_dir, sd3_dir))
    if layout == SAVED_LAYOUT:
        te_x = {"text_model." + k: v for k, v in te_x.items()}
    assert set(te_3) - set(te_x) == {"text_projection.weight"}, set(te_3) ^ set(te_x)
    assert all(torch.equal(v, te_3[k]) for k, v in te_x.items())


def check_layouts_agree(out, configs):
    """Every text_encoder/ holds the same tensors: in the published layout the files are byte-
    identical, and a file kept as saved becomes that very file once its keys are prefixed."""
    files = {name: out / name / "text_encoder" / "model.safetensors" for name in configs}
    published = {files[n].read_bytes() for n, c in configs.items()
                 if c["text_encoder_layout"] == PUBLISHED_LAYOUT}
    assert len(published) <= 1
    for n, c in configs.items():
        if c["text_encoder_layout"] == SAVED_LAYOUT and published:
            assert published_bytes(load_file(files[n])) in published, n


def write_sdxl_model(model_dir, sd3_dir, cfg, tokenizer_files, tokenizers):
    """save_pretrained, the hand-written tokenizers, the text_encoder/ layout; returns the
    perturbed counts."""
    pipe, perturbed = build_sdxl_pipeline(cfg, *tokenizers[:2])
    pipe.save_pretrained(model_dir, safe_serialization=True)
    del pipe
    tokenizer_files.write(model_dir, t5=False)
    if cfg["text_encoder_layout"] == PUBLISHED_LAYOUT:
        prefix_clip_text_model_keys(model_dir / "text_encoder")
    else:
        check_saved_layout(model_dir / "text_encoder")
    for sub in ("tokenizer", "tokenizer_2"):
        assert not (model_dir / sub / "tokenizer.json").exists()
    check_sdxl_text_encoders(model_dir, sd3_dir, cfg["text_encoder_layout"])
    return perturbed


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


# --------------------------------------------------------------------------------------------
# Schedulers and pipeline helpers (also used by r2f.py).
# --------------------------------------------------------------------------------------------
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


def dpm_from_pipeline(pipe):
    """What the reference runs swap into the pipeline: DPM++ 2M Karras from its scheduler."""
    return DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)


def sdxl_add_time_ids(pipe, height, width):
    return pipe._get_add_time_ids(
        (height, width), (0, 0), (height, width), dtype=torch.float32,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)


@torch.no_grad()
def decode_u8_sdxl(pipe, latents):
    """The pipeline's decode path (VAE already fp32, so force_upcast does nothing)."""
    assert pipe.vae.dtype == torch.float32
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return postprocess_u8(pipe, decoded)


# --------------------------------------------------------------------------------------------
# References.
# --------------------------------------------------------------------------------------------
def text_references(pipe, prompt, H, W):
    """Tokenizers / text encoders (batch 1, no attention mask, as the pipeline calls them),
    encode_prompt (zero negatives) and add_time_ids."""
    out = {}
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
        prompt, device=CPU, num_images_per_prompt=1, do_classifier_free_guidance=True,
        negative_prompt=None)
    out["prompt_embeds"], out["negative_prompt_embeds"] = pe, npe
    out["pooled_prompt_embeds"], out["negative_pooled_prompt_embeds"] = ppe, nppe
    assert pe.shape == (1, CLIP_MAX_LEN, 24) and ppe.shape == (1, 16)
    assert torch.equal(pe, torch.cat([out["clip_l_hidden"], out["clip_g_hidden"]], dim=-1))
    assert torch.equal(ppe, out["clip_g_text_embeds"])  # pooled = CLIP-G text_embeds only
    assert not npe.any() and not nppe.any()  # force_zeros_for_empty_prompt: true zeros
    out["add_time_ids"] = sdxl_add_time_ids(pipe, H, W)
    assert out["add_time_ids"].tolist() == [[H, W, 0, 0, H, W]]
    return out


def unet_forward_reference(pipe, H, W, lat_h, lat_w):
    out = {}
    torch.manual_seed(UNET_INPUT_SEED)  # drawn in this order: sample, context, text_embeds
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
    return out


def vae_decode_reference(pipe, lat_h, lat_w):
    """One VAE decode (through post_quant_conv)."""
    sf = pipe.vae.config.scaling_factor
    assert sf == 0.13025 and pipe.vae.config.force_upcast and pipe.vae.post_quant_conv is not None
    torch.manual_seed(VAE_INPUT_SEED)
    vae_in = torch.randn((1, 4, lat_h, lat_w), dtype=torch.float32)
    return {"vae_in": vae_in, "vae_out": pipe.vae.decode(vae_in / sf).sample}


def scheduler_references(model_dir):
    """Euler and DPM++ schedules, each scheduler fresh from the folder's scheduler config."""
    out = {}
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
    return out


def dpm_step_reference(model_dir, lat_h, lat_w):
    """DPM++ 2M Karras step by step on seeded model outputs."""
    n = SDXL_DPM_STEP_CHECK_STEPS
    sch = sdxl_dpm(model_dir)
    sch.set_timesteps(n)
    out = {}
    torch.manual_seed(DPM_STEP_INPUT_SEED)  # drawn in this order: model outputs, sample0
    out["dpm_step_model_outputs"] = torch.randn((n, 1, 4, lat_h, lat_w), dtype=torch.float32)
    out["dpm_step_sample0"] = torch.randn((1, 4, lat_h, lat_w), dtype=torch.float32)
    out["dpm_step_timesteps"] = sch.timesteps.clone()
    out["dpm_step_sigmas"] = sch.sigmas.clone()
    sample, samples = out["dpm_step_sample0"].clone(), []
    for i, t in enumerate(sch.timesteps):
        sample = sch.step(out["dpm_step_model_outputs"][i], t, sample, return_dict=False)[0]
        samples.append(sample.clone())
    out["dpm_step_samples"] = torch.stack(samples)
    return out


@contextlib.contextmanager
def spy_prepare_latents(pipe):
    """Records what pipe.prepare_latents returns, call by call."""
    prepared, orig_prepare = [], pipe.prepare_latents

    def prepare_spy(*a, **k):
        r = orig_prepare(*a, **k)
        prepared.append(r.detach().clone())
        return r

    pipe.prepare_latents = prepare_spy
    try:
        yield prepared
    finally:
        pipe.prepare_latents = orig_prepare


def run_latents_and_image(pipe, prompt, init, steps, common, ts_cast):
    """One recorded latent run + the pil run of the same settings (must give the same pixels).
    Returns (final, per-step latents, timesteps, image_u8)."""
    cb, lat, ts = step_recorder(ts_cast)
    final = pipe(prompt, latents=init.clone(), output_type="latent", num_inference_steps=steps,
                 callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents"],
                 **common).images
    assert len(lat) == steps and torch.equal(lat[-1], final)
    img_u8 = decode_u8_sdxl(pipe, final)
    pil = pipe(prompt, latents=init.clone(), output_type="pil", num_inference_steps=steps,
               **common).images[0]
    assert np.array_equal(np.asarray(pil), img_u8), "pil output differs from np path"
    return final, torch.stack(lat), ts, img_u8


def euler_run_reference(pipe, model_dir, run, init, prepared):
    """Full pipeline with the folder's Euler scheduler; returns (tensors, timesteps, init sigma)."""
    H, W = run["height"], run["width"]
    common = dict(height=H, width=W, guidance_scale=run["guidance"])
    final, lat, step_ts, img_u8 = run_latents_and_image(
        pipe, run["prompt"], init, run["steps"], common, float)
    assert img_u8.shape == (H, W, 3)
    sch = sdxl_euler(model_dir)
    sch.set_timesteps(run["steps"])
    assert step_ts == [float(t) for t in sch.timesteps], step_ts
    # prepare_latents multiplies passed latents by init_noise_sigma (Euler leading: sqrt(s^2+1))
    euler_ins = sch.init_noise_sigma
    assert len(prepared) == 2 and torch.equal(prepared[0], init * euler_ins), "prepare_latents"
    out = {"init_latents": init, "start_latents": prepared[0], "final_latents": final,
           "step_latents": lat, "image_u8": torch.from_numpy(img_u8)}
    return out, step_ts, euler_ins


def dpm_run_reference(pipe, run, init, prepared):
    """Full pipeline with DPM++ 2M Karras swapped in; returns (tensors, timesteps)."""
    euler_sched = pipe.scheduler
    pipe.scheduler = dpm_from_pipeline(pipe)
    common = dict(height=run["height"], width=run["width"], guidance_scale=run["guidance"])
    dfinal, dlat, dts, dimg = run_latents_and_image(
        pipe, run["prompt"], init, run["dpm_steps"], common, int)
    assert len(prepared) == 4 and torch.equal(prepared[2], init)  # DPM init_noise_sigma = 1
    pipe.scheduler = euler_sched
    out = {"dpm_final_latents": dfinal, "dpm_step_latents": dlat,
           "dpm_image_u8": torch.from_numpy(dimg)}
    return out, dts


def pipeline_run_references(pipe, model_dir, run, lat_h, lat_w):
    """Euler then DPM++ runs from the same seeded latents; returns (tensors, meta entries)."""
    torch.manual_seed(run["seed"])
    init = torch.randn((1, 4, lat_h, lat_w), dtype=torch.float32)
    with spy_prepare_latents(pipe) as prepared:
        out, step_ts, euler_ins = euler_run_reference(pipe, model_dir, run, init, prepared)
        dpm_out, dts = dpm_run_reference(pipe, run, init, prepared)
    out.update(dpm_out)
    return out, dict(pipeline_timesteps=step_ts, pipeline_init_noise_sigma=float(euler_ins),
                     dpm_pipeline_timesteps=dts)


def dpm_config_json(model_dir):
    """sdxl_dpm's config for the meta; non-finite floats (lambda_min_clipped = -inf) as strings:
    strict JSON has no Infinity."""
    return {k: (str(v) if isinstance(v, float) and not np.isfinite(v) else v)
            for k, v in sorted(dict(sdxl_dpm(model_dir).config).items()) if not k.startswith("_")}


REFERENCE_NOTE = (
    "init_latents = torch.manual_seed(seed); torch.randn((1,4,H/f,W/f)) (CPU), passed as "
    "latents=; prepare_latents multiplies it by scheduler.init_noise_sigma (start_latents). "
    "step_latents / dpm_step_latents: latents after each pipeline step. image_u8 = "
    "(postprocess(vae.decode(final_latents / vae_scaling_factor)) * 255).round()")


def forward_meta(H, W):
    """The meta entries describing the single-forward and step-check references."""
    return {
        "unet_forward": {
            "timesteps": SDXL_UNET_TIMESTEPS,
            "input_seed": UNET_INPUT_SEED,
            "randn_order": ["unet_in_sample", "unet_in_context", "unet_in_text_embeds"],
            "time_ids": [H, W, 0, 0, H, W],
        },
        "vae_decode": {"input_seed": VAE_INPUT_SEED, "input": "vae_in / vae_scaling_factor"},
        "dpm_step_check": {
            "steps": SDXL_DPM_STEP_CHECK_STEPS, "input_seed": DPM_STEP_INPUT_SEED,
            "randn_order": ["dpm_step_model_outputs", "dpm_step_sample0"],
            "note": "fresh scheduler, set_timesteps(steps), sample = step(model_outputs[i], "
                    "timesteps[i], sample).prev_sample; dpm_step_samples[i] = sample after step i",
        },
    }


def reference_meta(name, run, pipe, model_dir, lat_hw, run_info, tensors):
    H, W = run["height"], run["width"]
    return {
        "model": name,
        "pipeline": "StableDiffusionXLPipeline",
        "prompt": run["prompt"],
        "negative_prompt": None,
        "negative": "zeros (force_zeros_for_empty_prompt=True, no negative prompt)",
        "seed": run["seed"],
        "width": W,
        "height": H,
        "steps": run["steps"],
        "dpm_steps": run["dpm_steps"],
        "guidance": run["guidance"],
        "vae_scale_factor": pipe.vae_scale_factor,
        "latent_height": lat_hw[0],
        "latent_width": lat_hw[1],
        "vae_scaling_factor": pipe.vae.config.scaling_factor,
        **run_info,
        "scheduler": "EulerDiscreteScheduler (folder config)",
        "dpm_scheduler": "DPMSolverMultistepScheduler.from_config(euler_config, use_karras_sigmas=True)",
        "dpm_scheduler_config": dpm_config_json(model_dir),
        **forward_meta(H, W),
        "note": REFERENCE_NOTE,
        "tensors": tensor_meta(tensors),
        "versions": versions(),
    }


def is_int64_key(k):
    return k in ("clip_l_ids", "clip_g_ids") or k.startswith("dpm_timesteps") \
        or k == "dpm_step_timesteps"


@torch.no_grad()
def compute_sdxl_references(model_dir, name, cfg):
    """All references of one SDXL folder; returns (pipe, tensors, meta)."""
    run = cfg["run"]
    pipe = load_sdxl_pipeline(model_dir)
    vsf = pipe.vae_scale_factor
    H, W = run["height"], run["width"]
    lat_h, lat_w = H // vsf, W // vsf
    out = text_references(pipe, run["prompt"], H, W)
    out.update(unet_forward_reference(pipe, H, W, lat_h, lat_w))
    out.update(vae_decode_reference(pipe, lat_h, lat_w))
    out.update(scheduler_references(model_dir))
    out.update(dpm_step_reference(model_dir, lat_h, lat_w))
    run_out, run_info = pipeline_run_references(pipe, model_dir, run, lat_h, lat_w)
    out.update(run_out)
    run_info["add_time_ids"] = out["add_time_ids"][0].tolist()
    tensors = cast_tensors(out, is_int64_key)
    meta = reference_meta(name, run, pipe, model_dir, (lat_h, lat_w), run_info, tensors)
    return pipe, tensors, meta
