//! Weight loading as published checkpoints need it: sharded files with an index, dtype
//! conversion at load time.

mod common;

use common::*;
use r2f::models::mmdit::{Mmdit, MmditConfig};
use r2f::models::weights::{Vb, Weights};
use tch::{Device, Kind, Tensor};

#[test]
fn sharded_checkpoint_with_index_loads_the_same_model() {
    let _g = tch::no_grad_guard();
    let r = reference("sd3-tiny-a");
    let src = model_dir("sd3-tiny-a").join("transformer");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
    let tensors =
        Tensor::read_safetensors(src.join("diffusion_pytorch_model.safetensors")).unwrap();
    let (first, second) = tensors.split_at(tensors.len() / 2);
    let names = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    let mut weight_map = serde_json::Map::new();
    for (part, name) in [first, second].iter().zip(names) {
        Tensor::write_safetensors(part, tmp.path().join(name)).unwrap();
        for (t, _) in part.iter() {
            weight_map.insert(t.clone(), serde_json::Value::String(name.to_string()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        tmp.path()
            .join("diffusion_pytorch_model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let vb = Vb::new(Weights::from_dir(tmp.path(), Device::Cpu, Kind::Float).unwrap());
    let model = Mmdit::new(&vb, &MmditConfig::load(tmp.path()).unwrap()).unwrap();
    let out = model
        .forward(
            &r["tf_in_hidden"],
            &r["tf_in_timestep"],
            &r["tf_in_context"],
            &r["tf_in_pooled"],
        )
        .unwrap();
    assert_close("sharded transformer forward", &out, &r["tf_out"], 1e-5);
}

#[test]
fn half_precision_loading_converts_and_stays_close() {
    // bf16 keeps ~3 significant digits: a loose bound, but far below what a wrong weight gives.
    let _g = tch::no_grad_guard();
    let r = reference("sd3-tiny-a");
    let dir = model_dir("sd3-tiny-a").join("transformer");
    let vb = Vb::new(Weights::from_dir(&dir, Device::Cpu, Kind::BFloat16).unwrap());
    let model = Mmdit::new(&vb, &MmditConfig::load(&dir).unwrap()).unwrap();
    let bf = |k: &str| r[k].to_kind(Kind::BFloat16);
    let out = model
        .forward(
            &bf("tf_in_hidden"),
            &r["tf_in_timestep"],
            &bf("tf_in_context"),
            &bf("tf_in_pooled"),
        )
        .unwrap();
    assert_eq!(out.kind(), Kind::BFloat16);
    assert_close("bf16 transformer forward", &out, &r["tf_out"], 5e-2);
}

#[test]
fn mismatched_shape_names_tensor_and_file() {
    let dir = model_dir("sd3-tiny-a").join("transformer");
    let w = Weights::from_dir(&dir, Device::Cpu, Kind::Float).unwrap();
    let err = w.get("proj_out.weight", &[3, 3]).unwrap_err().to_string();
    assert!(err.contains("proj_out.weight"), "{err}");
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
    let err = w.get("no.such.tensor", &[1]).unwrap_err().to_string();
    assert!(
        err.contains("no.such.tensor") && err.contains("transformer"),
        "{err}"
    );
}
