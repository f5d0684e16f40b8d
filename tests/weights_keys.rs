//! Checkpoint keys against the model code: every tensor of every fixture component is read by
//! the model (none unused, none missing), and the text encoders load from every key layout
//! transformers writes (CLIP with or without the `text_model.` wrapper, T5 with or without
//! `encoder.`), to the same numbers.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::*;
use r2f::models::clip::{ClipConfig, ClipOutput, ClipTextModel};
use r2f::models::mmdit::{Mmdit, MmditConfig};
use r2f::models::t5::{T5Config, T5Encoder};
use r2f::models::unet::{Unet, UnetConfig};
use r2f::models::vae::{VaeConfig, VaeDecoder};
use r2f::models::weights::{Vb, Weights};
use tch::{Device, Kind, Tensor};

const FIXTURES: [&str; 4] = ["sd3-tiny-a", "sd3-tiny-b", "sdxl-tiny-a", "sdxl-tiny-b"];

fn vb(dir: &Path) -> Vb {
    Vb::new(Weights::from_dir(dir, Device::Cpu, Kind::Float).unwrap())
}

/// Whether a CLIP text encoder folder holds a `CLIPTextModelWithProjection` (SD3's two, SDXL's
/// second), as the pipelines load it.
fn with_projection(dir: &Path) -> bool {
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    cfg["architectures"][0] == "CLIPTextModelWithProjection"
}

/// Builds the model of one component folder as the pipelines do; returns the store it read.
fn load_component(component: &str, dir: &Path) -> Vb {
    let vb = vb(dir);
    let loaded = match component {
        "text_encoder" | "text_encoder_2" => {
            ClipTextModel::new(&vb, &ClipConfig::load(dir).unwrap(), with_projection(dir)).map(drop)
        }
        "text_encoder_3" => T5Encoder::new(&vb, &T5Config::load(dir).unwrap()).map(drop),
        "transformer" => Mmdit::new(&vb, &MmditConfig::load(dir).unwrap()).map(drop),
        "unet" => Unet::new(&vb, &UnetConfig::load(dir).unwrap()).map(drop),
        "vae" => VaeDecoder::new(&vb, &VaeConfig::load(dir).unwrap()).map(drop),
        other => panic!("{}: no model for component `{other}`", dir.display()),
    };
    if let Err(e) = loaded {
        panic!("{}: {e:#}", dir.display());
    }
    vb
}

/// What r2f leaves unread on purpose: the VAE's encoder half (r2f only decodes).
fn unused_on_purpose(component: &str, key: &str) -> bool {
    component == "vae" && (key.starts_with("encoder.") || key.starts_with("quant_conv."))
}

/// The tensor names of every safetensors file in `dir`, read from the files themselves.
fn checkpoint_keys(dir: &Path) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            for (name, _) in Tensor::read_safetensors(&path).unwrap() {
                keys.insert(name);
            }
        }
    }
    keys
}

#[test]
fn every_fixture_tensor_is_loaded_and_none_is_missing() {
    let _g = tch::no_grad_guard();
    let mut checked = 0;
    for fixture in FIXTURES {
        let mut components: Vec<_> = std::fs::read_dir(model_dir(fixture))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_dir() && !checkpoint_keys(p).is_empty())
            .collect();
        components.sort();
        assert!(components.len() >= 4, "{fixture}: {components:?}");
        for dir in components {
            let component = dir.file_name().unwrap().to_str().unwrap().to_string();
            let label = format!("{fixture}/{component}");
            let file_keys = checkpoint_keys(&dir);
            let vb = load_component(&component, &dir);
            let read: BTreeSet<String> = vb.weights().read_keys().into_iter().collect();
            let missing: Vec<_> = read.difference(&file_keys).collect();
            assert!(
                missing.is_empty(),
                "{label}: read but not in the checkpoint: {missing:?}"
            );
            let unused: Vec<_> = file_keys
                .difference(&read)
                .filter(|k| !unused_on_purpose(&component, k))
                .collect();
            assert!(
                unused.is_empty(),
                "{label}: in the checkpoint but never read: {unused:?}"
            );
            // The store's own account agrees with the files.
            let unused_by_store: BTreeSet<String> =
                vb.weights().unused_keys().into_iter().collect();
            let expected: BTreeSet<String> = file_keys.difference(&read).cloned().collect();
            assert_eq!(unused_by_store, expected, "{label}: unused_keys()");
            eprintln!(
                "{label}: {} tensors read, {} left on purpose",
                read.len(),
                expected.len()
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 18, "components checked");
}

/// A copy of the component folder `src` in `dst`, its tensor names passed through `rename`.
fn copy_renamed(src: &Path, dst: &Path, rename: impl Fn(&str) -> String) {
    std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
    let tensors = Tensor::read_safetensors(src.join("model.safetensors")).unwrap();
    let renamed: Vec<(String, Tensor)> =
        tensors.into_iter().map(|(n, t)| (rename(&n), t)).collect();
    Tensor::write_safetensors(&renamed, dst.join("model.safetensors")).unwrap();
}

fn assert_same_clip_output(label: &str, got: &ClipOutput, want: &ClipOutput) {
    assert!(
        got.penultimate.equal(&want.penultimate),
        "{label}: hidden_states[-2] differ"
    );
    assert!(
        got.pooled.equal(&want.pooled),
        "{label}: pooled output differs"
    );
    match (&got.text_embeds, &want.text_embeds) {
        (Some(g), Some(w)) => assert!(g.equal(w), "{label}: text_embeds differ"),
        (None, None) => {}
        _ => panic!("{label}: one has text_embeds, the other not"),
    }
}

#[test]
fn clip_text_encoders_load_without_the_text_model_prefix() {
    let _g = tch::no_grad_guard();
    // CLIP-L without projection (SDXL), CLIP-L and CLIP-G with one (SD3, SDXL).
    for (fixture, component, ids) in [
        ("sdxl-tiny-a", "text_encoder", "clip_l_ids"),
        ("sdxl-tiny-a", "text_encoder_2", "clip_g_ids"),
        ("sd3-tiny-a", "text_encoder", "clip_l_ids"),
        ("sd3-tiny-b", "text_encoder_2", "clip_g_ids"),
    ] {
        let label = format!("{fixture}/{component}");
        let src = model_dir(fixture).join(component);
        let flat = tempfile::tempdir().unwrap();
        copy_renamed(&src, flat.path(), |n| {
            n.strip_prefix("text_model.").unwrap_or(n).to_string()
        });
        assert!(
            checkpoint_keys(flat.path()).contains("encoder.layers.0.self_attn.q_proj.weight"),
            "{label}: the copy has the flat layout"
        );
        let ids = reference(fixture)[ids].to_kind(Kind::Int64);
        let cfg = ClipConfig::load(&src).unwrap();
        let projection = with_projection(&src);
        let nested_vb = vb(&src);
        let flat_vb = vb(flat.path());
        let nested = ClipTextModel::new(&nested_vb, &cfg, projection).unwrap();
        let flat_model = ClipTextModel::new(&flat_vb, &cfg, projection).unwrap();
        assert_eq!(
            flat_vb.weights().unused_keys(),
            Vec::<String>::new(),
            "{label}"
        );
        assert_same_clip_output(&label, &flat_model.forward(&ids), &nested.forward(&ids));
    }
}

#[test]
fn t5_encoder_loads_with_or_without_the_encoder_prefix_and_either_embedding_name() {
    let _g = tch::no_grad_guard();
    let fixture = "sd3-tiny-a";
    let src = model_dir(fixture).join("text_encoder_3");
    let cfg = T5Config::load(&src).unwrap();
    let ids = reference(fixture)["t5_ids_77"].to_kind(Kind::Int64);
    let want = T5Encoder::new(&vb(&src), &cfg).unwrap().forward(&ids);
    type Rename = fn(&str) -> String;
    let layouts: [(&str, Rename); 3] = [
        // The stack at the root: `block.*`, `final_layer_norm.*`, `shared.weight`.
        ("no encoder. prefix", |n| {
            n.strip_prefix("encoder.").unwrap_or(n).to_string()
        }),
        // The tied table kept only as the stack's `embed_tokens`.
        ("encoder.embed_tokens", |n| {
            if n == "shared.weight" {
                "encoder.embed_tokens.weight".into()
            } else {
                n.to_string()
            }
        }),
        // Both: a bare stack with its own `embed_tokens`.
        ("bare stack with embed_tokens", |n| match n {
            "shared.weight" => "embed_tokens.weight".into(),
            n => n.strip_prefix("encoder.").unwrap_or(n).to_string(),
        }),
    ];
    for (label, rename) in layouts {
        let dir = tempfile::tempdir().unwrap();
        copy_renamed(&src, dir.path(), rename);
        let store = vb(dir.path());
        let got = T5Encoder::new(&store, &cfg).unwrap().forward(&ids);
        assert_eq!(
            store.weights().unused_keys(),
            Vec::<String>::new(),
            "{label}"
        );
        assert!(got.equal(&want), "T5 with {label}: output differs");
    }
}

#[test]
fn a_text_encoder_in_neither_layout_names_the_keys_it_looked_for() {
    let src = model_dir("sdxl-tiny-a").join("text_encoder");
    let dir = tempfile::tempdir().unwrap();
    copy_renamed(&src, dir.path(), |n| format!("model.{n}"));
    let err = ClipTextModel::new(&vb(dir.path()), &ClipConfig::load(&src).unwrap(), false)
        .err()
        .expect("a CLIP checkpoint under an unknown prefix must not load")
        .to_string();
    assert!(
        err.contains("`text_model.embeddings.token_embedding.weight`")
            && err.contains("`embeddings.token_embedding.weight`"),
        "{err}"
    );
}
