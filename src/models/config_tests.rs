//! Model configs as diffusers and transformers write them: closed sets of values are enums, an
//! unknown value fails when the config is read and names the field and what it accepts; a
//! missing field takes the library's default.

use serde_json::{json, Value};

use super::clip::{ClipConfig, HiddenAct};
use super::mmdit::{MmditConfig, QkNorm};
use super::t5::{FeedForwardProj, T5Config};
use super::unet::{DownBlockType, UnetConfig, UpBlockType};

/// Parsed from text, as `read_config` does (errors then also give the line and column).
fn parse<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, String> {
    serde_json::from_str(&serde_json::to_string_pretty(&v).unwrap()).map_err(|e| e.to_string())
}

fn assert_names(err: &str, words: &[&str]) {
    for w in words {
        assert!(err.contains(w), "`{w}` not in the error: {err}");
    }
}

fn clip(hidden_act: Option<&str>) -> Value {
    let mut v = json!({"vocab_size": 99, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2});
    if let Some(act) = hidden_act {
        v["hidden_act"] = json!(act);
    }
    v
}

#[test]
fn clip_hidden_act_is_a_closed_set_with_transformers_default() {
    let cfg: ClipConfig = parse(clip(None)).unwrap();
    assert_eq!(cfg.hidden_act, HiddenAct::QuickGelu);
    let cfg: ClipConfig = parse(clip(Some("gelu"))).unwrap();
    assert_eq!(cfg.hidden_act, HiddenAct::Gelu);
    let cfg: ClipConfig = parse(clip(Some("gelu_pytorch_tanh"))).unwrap();
    assert_eq!(cfg.hidden_act, HiddenAct::GeluTanh);
    let err = parse::<ClipConfig>(clip(Some("silu"))).unwrap_err();
    assert_names(
        &err,
        &["hidden_act", "\"silu\"", "\"quick_gelu\"", "\"gelu\""],
    );
}

#[test]
fn t5_feed_forward_proj_is_a_closed_set_with_transformers_default() {
    let mut v = json!({"vocab_size": 99, "d_model": 8, "d_kv": 4, "d_ff": 16,
        "num_layers": 1, "num_heads": 2});
    let cfg: T5Config = parse(v.clone()).unwrap();
    assert_eq!(cfg.feed_forward_proj, FeedForwardProj::Relu);
    v["feed_forward_proj"] = json!("gated-gelu");
    let cfg: T5Config = parse(v.clone()).unwrap();
    assert_eq!(cfg.feed_forward_proj, FeedForwardProj::GatedGelu);
    v["feed_forward_proj"] = json!("gated-silu");
    let err = parse::<T5Config>(v).unwrap_err();
    assert_names(
        &err,
        &[
            "feed_forward_proj",
            "\"gated-silu\"",
            "\"relu\"",
            "\"gated-gelu\"",
        ],
    );
}

#[test]
fn mmdit_qk_norm_is_null_or_rms_norm() {
    let mut v = json!({"patch_size": 2, "in_channels": 4, "num_layers": 1,
        "attention_head_dim": 4, "num_attention_heads": 2, "joint_attention_dim": 8,
        "caption_projection_dim": 8, "pooled_projection_dim": 8, "qk_norm": null});
    assert_eq!(parse::<MmditConfig>(v.clone()).unwrap().qk_norm, None);
    v["qk_norm"] = json!("rms_norm");
    assert_eq!(
        parse::<MmditConfig>(v.clone()).unwrap().qk_norm,
        Some(QkNorm::RmsNorm)
    );
    v["qk_norm"] = json!("layer_norm");
    let err = parse::<MmditConfig>(v).unwrap_err();
    assert_names(&err, &["qk_norm", "\"layer_norm\"", "\"rms_norm\""]);
}

/// The fields an SDXL-like UNet config must give (diffusers has no default for them).
fn unet() -> Value {
    json!({"block_out_channels": [16, 32],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": [2, 4], "num_attention_heads": null,
        "transformer_layers_per_block": [1, 2], "cross_attention_dim": 24,
        "use_linear_projection": true, "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 64})
}

#[test]
fn unet_config_takes_diffusers_defaults_and_expands_per_block_values() {
    let cfg: UnetConfig = parse(unet()).unwrap();
    use DownBlockType::*;
    use UpBlockType::*;
    assert_eq!(cfg.down_block_types, [DownBlock2D, CrossAttnDownBlock2D]);
    assert_eq!(cfg.up_block_types, [CrossAttnUpBlock2D, UpBlock2D]);
    assert_eq!(cfg.layers_per_block, [2, 2]);
    assert_eq!(cfg.heads, [2, 4]);
    assert_eq!(cfg.transformer_layers, [1, 2]);
    assert_eq!((cfg.in_channels, cfg.out_channels), (4, 4));
    assert_eq!((cfg.norm_num_groups, cfg.norm_eps), (32, 1e-5));
    assert!(cfg.flip_sin_to_cos);
    assert_eq!(cfg.freq_shift, 0.0);
    // `num_attention_heads`, when given, wins over `attention_head_dim`.
    let mut v = unet();
    v["num_attention_heads"] = json!(3);
    assert_eq!(parse::<UnetConfig>(v).unwrap().heads, [3, 3]);
}

#[test]
fn unet_config_rejects_what_r2f_does_not_run_naming_the_field() {
    let cases = [
        (
            "down_block_types",
            json!(["DownBlock2D", "SimpleCrossAttnDownBlock2D"]),
            &[
                "down_block_types",
                "\"SimpleCrossAttnDownBlock2D\"",
                "\"CrossAttnDownBlock2D\"",
            ][..],
        ),
        (
            "up_block_types",
            json!(["AttnUpBlock2D", "UpBlock2D"]),
            &[
                "up_block_types",
                "\"AttnUpBlock2D\"",
                "\"CrossAttnUpBlock2D\"",
            ][..],
        ),
        (
            "mid_block_type",
            json!("UNetMidBlock2DSimpleCrossAttn"),
            &["mid_block_type", "\"UNetMidBlock2DCrossAttn\""][..],
        ),
        (
            "addition_embed_type",
            json!("text_image"),
            &["addition_embed_type", "\"text_image\"", "\"text_time\""][..],
        ),
        (
            "addition_embed_type",
            json!(null),
            &["addition_embed_type", "text_time"][..],
        ),
        (
            "use_linear_projection",
            json!(false),
            &["use_linear_projection"][..],
        ),
        (
            "addition_time_embed_dim",
            json!(null),
            &["addition_time_embed_dim"][..],
        ),
        (
            "layers_per_block",
            json!([2, 2, 2]),
            &["layers_per_block", "3 value(s) for 2 blocks"][..],
        ),
        (
            "up_block_types",
            json!(["UpBlock2D"]),
            &["up_block_types", "1 value(s) for 2 blocks"][..],
        ),
        // A wrongly typed value is an error, not a silent default.
        (
            "layers_per_block",
            json!(2.5),
            &["an integer, or a list of integers"][..],
        ),
        ("cross_attention_dim", json!("24"), &["invalid type"][..]),
    ];
    for (field, value, words) in cases {
        let mut v = unet();
        v[field] = value.clone();
        let err = parse::<UnetConfig>(v).map(|_| ()).unwrap_err();
        eprintln!("{field} = {value}: {err}");
        assert_names(&err, words);
    }
}
