"""SD3 fixtures: sd3-tiny-a/, sd3-tiny-b/ (StableDiffusion3Pipeline layout) and ref/sd3-tiny-*.

Each model folder holds three text encoders (CLIP-L and CLIP-G as CLIPTextModelWithProjection,
T5 as T5EncoderModel, built with the same seeds in every folder, so the folders share
byte-identical text encoders and tokenizers), an SD3Transformer2DModel, an AutoencoderKL and a
FlowMatchEulerDiscreteScheduler.  Every parameter that initialises to a constant is perturbed
(common.perturb_constant_params), so an implementation that ignores it fails.

ref/<name>.safetensors holds, for the run in CONFIGS[name]["run"] (row 0 = negative prompt "",
row 1 = prompt where there are two rows): the token ids, CLIP hidden_states[-2] / pooled
outputs, T5 outputs (at 256 and 77 tokens), encode_prompt's embeddings, the scheduler's sigmas
and timesteps for SCHEDULER_STEP_COUNTS, one transformer forward, one VAE decode, and a full
pipeline run (initial, per-step and final latents, decoded uint8 image).  ref/<name>.json
describes it.
"""

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from .common import (
    CLIP_MAX_LEN, CPU, T5_MAX_LEN, cast_tensors, postprocess_u8, seeded, step_recorder,
    tensor_meta, tok_ids, versions,
)

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
# (model seed, perturbation seed) of CLIP-L, CLIP-G and T5, shared with the SDXL folders
CLIP_L_SEEDS, CLIP_G_SEEDS, T5_SEEDS = (1, 1001), (2, 1002), (3, 1003)

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
SCHEDULER_KWARGS = dict(num_train_timesteps=1000, shift=3.0)
SCHEDULER_STEP_COUNTS = [1, 2, 28, 50]
TF_TIMESTEPS = [937.5, 12.25]
TF_INPUT_SEED = 123  # drawn in this order: hidden, context, pooled
VAE_INPUT_SEED = 321


# --------------------------------------------------------------------------------------------
# Model folders.
# --------------------------------------------------------------------------------------------
def build_text_encoders(t5_vocab_size):
    te1, n1 = seeded(CLIP_L_SEEDS[0],
                     lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L_KWARGS)),
                     CLIP_L_SEEDS[1])
    te2, n2 = seeded(CLIP_G_SEEDS[0],
                     lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_KWARGS)),
                     CLIP_G_SEEDS[1])
    te3, n3 = seeded(T5_SEEDS[0],
                     lambda: T5EncoderModel(T5Config(vocab_size=t5_vocab_size, **T5_KWARGS)),
                     T5_SEEDS[1])
    for m in (te1, te2, te3):
        m.eval()
    return (te1, te2, te3), (n1, n2, n3)


def build_sd3_pipeline(cfg, tokenizer_files, tokenizers):
    """The pipeline of one config with fresh random weights; returns (pipe, perturbed counts)."""
    tok_l, tok_g, tok_t5 = tokenizers
    text_encoders, perturbed = build_text_encoders(tokenizer_files.t5_vocab_size)
    transformer, n_tf = seeded(cfg["transformer_seed"],
                               lambda: SD3Transformer2DModel(**cfg["transformer"]),
                               1000 + cfg["transformer_seed"])
    vae, n_vae = seeded(cfg["vae_seed"], lambda: AutoencoderKL(**cfg["vae"]), 1000 + cfg["vae_seed"])
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_KWARGS),
        vae=vae.eval(),
        text_encoder=text_encoders[0], tokenizer=tok_l,
        text_encoder_2=text_encoders[1], tokenizer_2=tok_g,
        text_encoder_3=text_encoders[2], tokenizer_3=tok_t5,
    )
    return pipe, perturbed + (n_tf, n_vae)


def write_sd3_model(model_dir, cfg, tokenizer_files, tokenizers):
    """save_pretrained, then the hand-written tokenizer files; returns the perturbed counts."""
    pipe, perturbed = build_sd3_pipeline(cfg, tokenizer_files, tokenizers)
    pipe.save_pretrained(model_dir, safe_serialization=True)
    del pipe
    tokenizer_files.write(model_dir)
    return perturbed


def load_sd3_pipeline(model_dir):
    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.to("cpu")
    return pipe


def flow_match_scheduler(model_dir):
    return FlowMatchEulerDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler")


@torch.no_grad()
def decode_u8(pipe, latents):
    sf, sh = pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor
    decoded = pipe.vae.decode(latents / sf + sh, return_dict=False)[0]
    return postprocess_u8(pipe, decoded)


# --------------------------------------------------------------------------------------------
# References.
# --------------------------------------------------------------------------------------------
def text_encoder_references(pipe, texts):
    """Tokenizers and text encoders exactly as the pipeline calls them: one prompt at a time
    (batch size 1; batch 2 changes the pooled projection by an ulp), no attention masks."""
    out = {}
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
    return out


def encode_prompt_references(pipe, prompt, pieces):
    """encode_prompt with negative "" (CFG); checked to be the concatenation of `pieces`."""
    pe, npe, ppe, nppe = pipe.encode_prompt(
        prompt=prompt, prompt_2=prompt, prompt_3=prompt, device=CPU,
        num_images_per_prompt=1, do_classifier_free_guidance=True,
        negative_prompt="", negative_prompt_2="", negative_prompt_3="",
        max_sequence_length=T5_MAX_LEN,
    )
    clip_cat = torch.cat([pieces["clip_l_hidden"], pieces["clip_g_hidden"]], dim=-1)
    clip_cat = torch.nn.functional.pad(clip_cat, (0, 32 - clip_cat.shape[-1]))
    full = torch.cat([clip_cat, pieces["t5_hidden"]], dim=-2)
    assert torch.equal(full[1:], pe) and torch.equal(full[:1], npe)
    assert torch.equal(torch.cat([pieces["clip_l_pooled"], pieces["clip_g_pooled"]], -1)[1:], ppe)
    return {"prompt_embeds": pe, "negative_prompt_embeds": npe,
            "pooled_prompt_embeds": ppe, "negative_pooled_prompt_embeds": nppe}


def scheduler_references(model_dir):
    out = {}
    for n in SCHEDULER_STEP_COUNTS:
        sch = flow_match_scheduler(model_dir)
        sch.set_timesteps(n)
        out[f"sigmas_{n}"] = sch.sigmas.clone()
        out[f"timesteps_{n}"] = sch.timesteps.clone()
    return out


def transformer_forward_reference(pipe, lat_h, lat_w):
    out = {}
    torch.manual_seed(TF_INPUT_SEED)  # drawn in this order: hidden, context, pooled
    out["tf_in_hidden"] = torch.randn((2, 16, lat_h, lat_w), dtype=torch.float32)
    out["tf_in_timestep"] = torch.tensor(TF_TIMESTEPS, dtype=torch.float32)
    out["tf_in_context"] = torch.randn((2, CLIP_MAX_LEN + T5_MAX_LEN, 32), dtype=torch.float32)
    out["tf_in_pooled"] = torch.randn((2, 24), dtype=torch.float32)
    out["tf_out"] = pipe.transformer(
        hidden_states=out["tf_in_hidden"], timestep=out["tf_in_timestep"],
        encoder_hidden_states=out["tf_in_context"], pooled_projections=out["tf_in_pooled"],
        return_dict=False,
    )[0]
    return out


def vae_decode_reference(pipe, lat_h, lat_w):
    sf, sh = pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor
    torch.manual_seed(VAE_INPUT_SEED)
    vae_in = torch.randn((1, 16, lat_h, lat_w), dtype=torch.float32)
    return {"vae_in": vae_in, "vae_out": pipe.vae.decode(vae_in / sf + sh).sample}


def pipeline_run_reference(pipe, model_dir, run, lat_h, lat_w):
    """The full pipeline from seeded latents; returns (tensors, the pipeline's timesteps)."""
    prompt = run["prompt"]
    torch.manual_seed(run["seed"])
    init = torch.randn((1, 16, lat_h, lat_w), dtype=torch.float32)
    cb, steps, step_ts = step_recorder(float)
    common = dict(
        negative_prompt="", height=run["height"], width=run["width"],
        num_inference_steps=run["steps"], guidance_scale=run["guidance"],
        max_sequence_length=T5_MAX_LEN,
    )
    final = pipe(prompt, latents=init.clone(), output_type="latent",
                 callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents"],
                 **common).images
    assert len(steps) == run["steps"] and torch.equal(steps[-1], final)
    img_u8 = decode_u8(pipe, final)
    assert img_u8.shape == (run["height"], run["width"], 3)
    # output_type="pil" must give the same pixels
    pil = pipe(prompt, latents=init.clone(), output_type="pil", **common).images[0]
    assert np.array_equal(np.asarray(pil), img_u8), "pil output differs from np path"
    # the pipeline's schedule is the scheduler's
    sch = flow_match_scheduler(model_dir)
    sch.set_timesteps(run["steps"])
    assert step_ts == [float(t) for t in sch.timesteps], step_ts
    out = {"init_latents": init, "final_latents": final, "step_latents": torch.stack(steps),
           "image_u8": torch.from_numpy(img_u8)}
    return out, step_ts


def reference_meta(name, run, pipe, lat_hw, step_ts, tensors):
    return {
        "model": name,
        "prompt": run["prompt"],
        "negative_prompt": "",
        "seed": run["seed"],
        "width": run["width"],
        "height": run["height"],
        "steps": run["steps"],
        "guidance": run["guidance"],
        "max_sequence_length": T5_MAX_LEN,
        "vae_scale_factor": pipe.vae_scale_factor,
        "latent_height": lat_hw[0],
        "latent_width": lat_hw[1],
        "vae_scaling_factor": pipe.vae.config.scaling_factor,
        "vae_shift_factor": pipe.vae.config.shift_factor,
        "pipeline_timesteps": step_ts,
        "transformer_forward": {
            "timesteps": TF_TIMESTEPS,
            "input_seed": TF_INPUT_SEED,
            "randn_order": ["tf_in_hidden", "tf_in_context", "tf_in_pooled"],
        },
        "vae_decode": {"input_seed": VAE_INPUT_SEED,
                       "input": "vae_in / vae_scaling_factor + vae_shift_factor"},
        "tensors": tensor_meta(tensors),
        "versions": versions(),
    }


@torch.no_grad()
def compute_references(model_dir, name, cfg):
    """All references of one SD3 folder; returns (pipe, tensors, meta)."""
    run = cfg["run"]
    pipe = load_sd3_pipeline(model_dir)
    vsf = pipe.vae_scale_factor
    lat_h, lat_w = run["height"] // vsf, run["width"] // vsf
    out = text_encoder_references(pipe, ["", run["prompt"]])  # row 0 = negative "", row 1 = prompt
    out.update(encode_prompt_references(pipe, run["prompt"], out))
    out.update(scheduler_references(model_dir))
    out.update(transformer_forward_reference(pipe, lat_h, lat_w))
    out.update(vae_decode_reference(pipe, lat_h, lat_w))
    run_out, step_ts = pipeline_run_reference(pipe, model_dir, run, lat_h, lat_w)
    out.update(run_out)
    tensors = cast_tensors(out, lambda k: "_ids" in k)
    return pipe, tensors, reference_meta(name, run, pipe, (lat_h, lat_w), step_ts, tensors)
