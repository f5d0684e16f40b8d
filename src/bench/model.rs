//! `r2f bench --write-model DIR`: an SD3 model folder in the diffusers layout with random weights
//! (configs, safetensors, the bundled tokenizers), written once, for measuring what depends on
//! the files and not on the values: the cold start of a worker (process start to `/readyz`).
//! Each component is built with a random source that keeps what it hands out, written in shards
//! of at most 2 GiB, and dropped before the next, so memory holds one component at a time.

use std::path::Path;

use anyhow::Context;
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use crate::models::clip::{ClipConfig, ClipTextModel, HiddenAct};
use crate::models::mmdit::{Mmdit, MmditConfig};
use crate::models::t5::{FeedForwardProj, T5Config, T5Encoder};
use crate::models::vae::{VaeConfig, VaeDecoder};
use crate::models::weights::{Vb, Weights};
use crate::pipelines::sd3::Sd3Configs;

const SHARD_BYTES: i64 = 2 << 30;

fn write_json(path: &Path, v: &Value) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(v)?)
        .with_context(|| format!("writing {}", path.display()))
}

fn clip_json(c: &ClipConfig) -> Value {
    let act = match c.hidden_act {
        HiddenAct::QuickGelu => "quick_gelu",
        HiddenAct::Gelu => "gelu",
        HiddenAct::GeluTanh => "gelu_pytorch_tanh",
    };
    json!({
        "architectures": ["CLIPTextModelWithProjection"],
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "max_position_embeddings": c.max_position_embeddings, "hidden_act": act,
        "layer_norm_eps": c.layer_norm_eps, "projection_dim": c.projection_dim,
        "eos_token_id": c.eos_token_id,
    })
}

fn t5_json(c: &T5Config) -> Value {
    let ff = match c.feed_forward_proj {
        FeedForwardProj::Relu => "relu",
        FeedForwardProj::GatedGelu => "gated-gelu",
    };
    json!({
        "architectures": ["T5EncoderModel"],
        "vocab_size": c.vocab_size, "d_model": c.d_model, "d_kv": c.d_kv, "d_ff": c.d_ff,
        "num_layers": c.num_layers, "num_heads": c.num_heads,
        "relative_attention_num_buckets": c.relative_attention_num_buckets,
        "relative_attention_max_distance": c.relative_attention_max_distance,
        "layer_norm_epsilon": c.layer_norm_epsilon, "feed_forward_proj": ff,
    })
}

fn transformer_json(c: &MmditConfig) -> Value {
    json!({
        "_class_name": "SD3Transformer2DModel",
        "sample_size": c.sample_size, "patch_size": c.patch_size, "in_channels": c.in_channels,
        "num_layers": c.num_layers, "attention_head_dim": c.attention_head_dim,
        "num_attention_heads": c.num_attention_heads,
        "joint_attention_dim": c.joint_attention_dim,
        "caption_projection_dim": c.caption_projection_dim,
        "pooled_projection_dim": c.pooled_projection_dim, "out_channels": c.out_channels,
        "pos_embed_max_size": c.pos_embed_max_size,
    })
}

fn vae_json(c: &VaeConfig) -> Value {
    json!({
        "_class_name": "AutoencoderKL",
        "in_channels": c.in_channels, "out_channels": c.out_channels,
        "block_out_channels": c.block_out_channels, "layers_per_block": c.layers_per_block,
        "latent_channels": c.latent_channels, "norm_num_groups": c.norm_num_groups,
        "scaling_factor": c.scaling_factor, "shift_factor": c.shift_factor,
        "use_post_quant_conv": c.use_post_quant_conv,
        "mid_block_add_attention": c.mid_block_add_attention, "force_upcast": c.force_upcast,
    })
}

/// Writes `tensors` into `dir` as safetensors shards of at most [`SHARD_BYTES`].
fn write_shards(dir: &Path, stem: &str, tensors: Vec<(String, Tensor)>) -> anyhow::Result<()> {
    let mut shard: Vec<(String, Tensor)> = Vec::new();
    let (mut bytes, mut index) = (0i64, 0);
    let flush = |shard: &mut Vec<(String, Tensor)>, index: &mut usize| -> anyhow::Result<()> {
        if shard.is_empty() {
            return Ok(());
        }
        let path = dir.join(format!("{stem}-{:05}.safetensors", *index));
        Tensor::write_safetensors(shard, &path)
            .with_context(|| format!("writing {}", path.display()))?;
        shard.clear();
        *index += 1;
        Ok(())
    };
    for (name, t) in tensors {
        let size = t.numel() as i64 * t.kind().elt_size_in_bytes() as i64;
        if bytes + size > SHARD_BYTES {
            flush(&mut shard, &mut index)?;
            bytes = 0;
        }
        bytes += size;
        shard.push((name, t));
    }
    flush(&mut shard, &mut index)
}

/// One component: built with random weights that are kept, written with its config, dropped.
fn component(
    root: &Path,
    name: &str,
    kind: Kind,
    config: Value,
    stem: &str,
    build: impl FnOnce(&Vb) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir)?;
    let vb = Vb::new(Weights::random_kept(Device::Cpu, kind));
    build(&vb)?;
    let tensors = vb.weights().take_kept();
    let params: i64 = tensors.iter().map(|(_, t)| t.numel() as i64).sum();
    write_shards(&dir, stem, tensors)?;
    write_json(&dir.join("config.json"), &config)?;
    eprintln!("wrote {name}: {:.2} B parameters", params as f64 / 1e9);
    Ok(())
}

fn copy_dir(src: &Path, dst: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dst)?;
    for entry in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), dst.join(entry.file_name()))?;
        }
    }
    Ok(())
}

/// Writes an SD3 model folder with random weights in `dtype` (T5 in bf16 when `dtype` is fp16,
/// as the pipeline runs it), the tokenizers copied from the model folder `tokenizers`.
pub fn write_sd3(
    dir: &Path,
    cfg: &Sd3Configs,
    tokenizers: &Path,
    dtype: Kind,
) -> anyhow::Result<()> {
    let _guard = tch::no_grad_guard();
    std::fs::create_dir_all(dir)?;
    let lib = |l: &str, c: &str| json!([l, c]);
    write_json(
        &dir.join("model_index.json"),
        &json!({
            "_class_name": "StableDiffusion3Pipeline",
            "scheduler": lib("diffusers", "FlowMatchEulerDiscreteScheduler"),
            "text_encoder": lib("transformers", "CLIPTextModelWithProjection"),
            "text_encoder_2": lib("transformers", "CLIPTextModelWithProjection"),
            "text_encoder_3": lib("transformers", "T5EncoderModel"),
            "tokenizer": lib("transformers", "CLIPTokenizer"),
            "tokenizer_2": lib("transformers", "CLIPTokenizer"),
            "tokenizer_3": lib("transformers", "T5TokenizerFast"),
            "transformer": lib("diffusers", "SD3Transformer2DModel"),
            "vae": lib("diffusers", "AutoencoderKL"),
        }),
    )?;
    for t in ["tokenizer", "tokenizer_2", "tokenizer_3"] {
        copy_dir(&tokenizers.join(t), &dir.join(t))?;
    }
    std::fs::create_dir_all(dir.join("scheduler"))?;
    write_json(
        &dir.join("scheduler/scheduler_config.json"),
        &json!({
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "num_train_timesteps": cfg.scheduler.num_train_timesteps,
            "shift": cfg.scheduler.shift,
        }),
    )?;
    let t5_kind = if dtype == Kind::Half {
        Kind::BFloat16
    } else {
        dtype
    };
    for (name, c) in [
        ("text_encoder", &cfg.clip_l),
        ("text_encoder_2", &cfg.clip_g),
    ] {
        component(dir, name, dtype, clip_json(c), "model", |vb| {
            ClipTextModel::new(vb, c, true).map(drop)
        })?;
    }
    if let Some(c) = &cfg.t5 {
        component(dir, "text_encoder_3", t5_kind, t5_json(c), "model", |vb| {
            T5Encoder::new(vb, c).map(drop)
        })?;
    }
    let stem = "diffusion_pytorch_model";
    component(
        dir,
        "transformer",
        dtype,
        transformer_json(&cfg.transformer),
        stem,
        |vb| Mmdit::new(vb, &cfg.transformer).map(drop),
    )?;
    component(dir, "vae", dtype, vae_json(&cfg.vae), stem, |vb| {
        VaeDecoder::new(vb, &cfg.vae).map(drop)
    })?;
    Ok(())
}
