//! Where a worker's model comes from, as a fleet runs it: the `.fp16.` variant weight files
//! (loaded where they are all a component holds, or where fp16 is preferred), a local Hugging
//! Face cache when the Hub cannot be reached, and a missing relative folder reported as such
//! rather than looked up on the Hub. No network: the Hub endpoint is a closed local port, or a
//! local listener that answers 404.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use r2f::models::hub::{is_complete_snapshot, ModelFolder};
use r2f::models::weights::{Variant, Weights, WeightsVariant};
use tch::{Device, Kind, Tensor};

const WARNING: &str = "the Hugging Face Hub is unreachable: starting from the local cache";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// The components of a model folder that hold safetensors weights.
fn weight_components(root: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .filter(|p| {
            std::fs::read_dir(p).unwrap().any(|e| {
                e.unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "safetensors")
            })
        })
        .collect();
    out.sort();
    out
}

/// A copy of the tiny SD3 model whose every weights file is renamed to the `.fp16.` variant
/// (`model.safetensors` -> `model.fp16.safetensors`).
fn fp16_only_copy(dst: &Path) {
    copy_dir(&model_dir("sd3-tiny-a"), dst);
    for dir in weight_components(dst) {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_str().unwrap().to_string();
            if let Some(stem) = name.strip_suffix(".safetensors") {
                std::fs::rename(&p, dir.join(format!("{stem}.fp16.safetensors"))).unwrap();
            }
        }
    }
}

fn tensors_of(w: &Weights) -> Vec<(String, Tensor)> {
    let mut names = w.names();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let t = w.get_kind(&n, &shape_of(w, &n), Kind::Float).unwrap();
            (n, t)
        })
        .collect()
}

/// A tensor's shape, found by asking for a wrong one (the error names the stored shape).
fn shape_of(w: &Weights, name: &str) -> Vec<i64> {
    let err = w.get(name, &[-7]).unwrap_err();
    match err {
        r2f::models::weights::WeightError::Shape { found, .. } => found,
        other => panic!("expected a shape error for {name}: {other}"),
    }
}

fn r2f() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_r2f"));
    for var in ["HF_HUB_OFFLINE", "HF_TOKEN", "HF_TOKEN_PATH", "HF_HOME"] {
        c.env_remove(var);
    }
    c.env("NO_COLOR", "1");
    c
}

/// A local port nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// `r2f generate` of the tiny reference job (plain, CPU, fp32) with `model`, writing the image
/// and the latents under `out`.
fn generate(model: &str, out: &Path, configure: impl FnOnce(&mut Command)) -> Output {
    let m = reference_json("sd3-tiny-a");
    let mut c = r2f();
    c.args([
        "generate", "--mode", "plain", "--device", "cpu", "--dtype", "fp32",
    ])
    .args(["--model", model])
    .args(["--prompt", m["prompt"].as_str().unwrap()])
    .args(["--steps", &m["steps"].to_string()])
    .args(["--guidance", &m["guidance"].to_string()])
    .args(["--seed", &m["seed"].to_string()])
    .args(["--width", &m["width"].to_string()])
    .args(["--height", &m["height"].to_string()])
    .args(["--out", out.join("img.png").to_str().unwrap()])
    .args([
        "--latents-out",
        out.join("lat.safetensors").to_str().unwrap(),
    ]);
    configure(&mut c);
    c.output().unwrap()
}

/// The latents `generate` wrote under `out` match the diffusers reference.
fn assert_reference_latents(out: &Path) {
    let r = reference("sd3-tiny-a");
    let latents = Tensor::read_safetensors(out.join("lat.safetensors")).unwrap();
    let e = rel_err(&latents[0].1, &r["final_latents"]);
    assert!(e <= 1e-4, "latents rel err {e}");
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_model_with_only_fp16_variant_files_loads_the_same_tensors_and_image() {
    let _g = tch::no_grad_guard();
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("model");
    fp16_only_copy(&copy);
    let original = model_dir("sd3-tiny-a");
    let components = weight_components(&copy);
    assert!(components.len() >= 5, "{components:?}");
    for dir in &components {
        let name = dir.file_name().unwrap();
        let want = Weights::from_dir(&original.join(name), Device::Cpu, Kind::Float).unwrap();
        for prefer in [Variant::Full, Variant::Fp16] {
            let got = Weights::from_dir_preferring(dir, prefer, Device::Cpu, Kind::Float).unwrap();
            let (got, want) = (tensors_of(&got), tensors_of(&want));
            assert_eq!(got.len(), want.len(), "{}", dir.display());
            for ((gn, gt), (wn, wt)) in got.iter().zip(&want) {
                assert_eq!(gn, wn);
                assert!(gt.equal(wt), "{gn} differs in {}", dir.display());
            }
        }
    }
    // The whole pipeline from the renamed folder: the reference image's latents.
    let out = tmp.path().join("out");
    let o = generate(copy.to_str().unwrap(), &out, |_| {});
    assert!(o.status.success(), "generate failed: {}", stderr(&o));
    assert_reference_latents(&out);
}

#[test]
fn where_both_kinds_exist_the_preference_picks_them() {
    let _g = tch::no_grad_guard();
    let tmp = tempfile::tempdir().unwrap();
    let src = model_dir("sd3-tiny-a").join("transformer");
    let tensors =
        Tensor::read_safetensors(src.join("diffusion_pytorch_model.safetensors")).unwrap();
    let doubled: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), (t * 2.0).to_kind(Kind::Half)))
        .collect();

    // Unsharded: `diffusion_pytorch_model.safetensors` and `.fp16.safetensors` side by side.
    let flat = tmp.path().join("flat");
    copy_dir(&src, &flat);
    Tensor::write_safetensors(
        &doubled,
        flat.join("diffusion_pytorch_model.fp16.safetensors"),
    )
    .unwrap();

    // Sharded variant: `.fp16-0000N-of-00002.safetensors` with `.safetensors.index.fp16.json`.
    let sharded = tmp.path().join("sharded");
    copy_dir(&src, &sharded);
    let (first, second) = doubled.split_at(doubled.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [first, second].into_iter().enumerate() {
        let name = format!(
            "diffusion_pytorch_model.fp16-0000{}-of-00002.safetensors",
            i + 1
        );
        Tensor::write_safetensors(part, sharded.join(&name)).unwrap();
        for (t, _) in part {
            weight_map.insert(t.clone(), name.clone().into());
        }
    }
    std::fs::write(
        sharded.join("diffusion_pytorch_model.safetensors.index.fp16.json"),
        serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();

    let (name, want) = &tensors[0];
    let shape = want.size();
    for dir in [&flat, &sharded] {
        let full = Weights::from_dir_preferring(dir, Variant::Full, Device::Cpu, Kind::Float)
            .unwrap()
            .get(name, &shape)
            .unwrap();
        assert!(full.equal(want), "full files expected in {}", dir.display());
        // `auto` in fp16 prefers the variant; the values are the doubled ones.
        let prefer = WeightsVariant::Auto.resolve(Kind::Half);
        let w = Weights::from_dir_preferring(dir, prefer, Device::Cpu, Kind::Float).unwrap();
        assert_eq!(w.names().len(), tensors.len());
        let fp16 = w.get(name, &shape).unwrap();
        let twice = (want * 2.0).to_kind(Kind::Half).to_kind(Kind::Float);
        assert!(
            fp16.equal(&twice),
            "fp16 variant expected in {}",
            dir.display()
        );
        // The default (and `auto` in fp32) stays with the full-precision files.
        let prefer = WeightsVariant::default().resolve(Kind::Float);
        let w = Weights::from_dir_preferring(dir, prefer, Device::Cpu, Kind::Float).unwrap();
        assert!(w.get(name, &shape).unwrap().equal(want));
    }

    // Through a model folder: the preference it was resolved with.
    let model = tmp.path().join("model");
    copy_dir(&model_dir("sd3-tiny-a"), &model);
    std::fs::copy(
        flat.join("diffusion_pytorch_model.fp16.safetensors"),
        model.join("transformer/diffusion_pytorch_model.fp16.safetensors"),
    )
    .unwrap();
    for (variant, doubled) in [(Variant::Full, false), (Variant::Fp16, true)] {
        let folder = ModelFolder::open(&model).unwrap().preferring(variant);
        assert_eq!(folder.variant(), variant);
        let dir = folder.require("transformer").unwrap();
        let got = folder
            .weights(&dir, Device::Cpu, Kind::Float)
            .unwrap()
            .get(name, &shape)
            .unwrap();
        let expect = if doubled {
            (want * 2.0).to_kind(Kind::Half).to_kind(Kind::Float)
        } else {
            want.shallow_clone()
        };
        assert!(got.equal(&expect), "{variant:?}");
    }
}

/// A Hugging Face cache under `home` holding the tiny model as `r2f-test/sd3-tiny` at `main`;
/// the snapshot folder.
fn cached_tiny_model(home: &Path) -> PathBuf {
    let repo = home.join("hub/models--r2f-test--sd3-tiny");
    let snapshot = repo.join("snapshots").join(COMMIT);
    copy_dir(&model_dir("sd3-tiny-a"), &snapshot);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    snapshot
}

#[test]
fn an_unreachable_hub_starts_from_a_complete_cached_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("hf");
    let snapshot = cached_tiny_model(&home);
    assert!(is_complete_snapshot(&snapshot));
    let endpoint = format!("http://127.0.0.1:{}", closed_port());
    let out = tmp.path().join("out");
    let o = generate("r2f-test/sd3-tiny", &out, |c| {
        c.env("HF_HOME", &home)
            .env("HF_ENDPOINT", &endpoint)
            .current_dir(tmp.path());
    });
    let err = stderr(&o);
    assert!(o.status.success(), "generate failed: {err}");
    assert!(err.contains(WARNING), "no warning: {err}");
    assert_reference_latents(&out);
}

#[test]
fn an_unreachable_hub_with_an_incomplete_cache_fails_naming_both() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("hf");
    let snapshot = cached_tiny_model(&home);
    std::fs::remove_file(snapshot.join("transformer/diffusion_pytorch_model.safetensors")).unwrap();
    assert!(!is_complete_snapshot(&snapshot));
    let endpoint = format!("http://127.0.0.1:{}", closed_port());
    let o = generate("r2f-test/sd3-tiny", &tmp.path().join("out"), |c| {
        c.env("HF_HOME", &home)
            .env("HF_ENDPOINT", &endpoint)
            .current_dir(tmp.path());
    });
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(!err.contains(WARNING), "{err}");
    assert!(err.contains("is not a local folder"), "{err}");
    assert!(err.contains("unreachable"), "{err}");
    assert!(err.contains("holds no complete snapshot"), "{err}");

    // A model the cache does not hold at all: the same, with the Hub's error.
    let o = generate("r2f-test/absent", &tmp.path().join("out"), |c| {
        c.env("HF_HOME", &home)
            .env("HF_ENDPOINT", &endpoint)
            .current_dir(tmp.path());
    });
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("`r2f-test/absent` is not a local folder (relative to"),
        "{err}"
    );
    assert!(
        err.contains("cannot list `r2f-test/absent` on the Hugging Face Hub"),
        "{err}"
    );
}

/// A local "Hub" that answers every request with `status` (and a tiny JSON body).
fn answering_hub(status: &str) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let status = status.to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { break };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let body = r#"{"error":"Repository not found"}"#;
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    format!("http://{addr}")
}

#[test]
fn a_hub_that_answers_404_does_not_fall_back_to_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("hf");
    cached_tiny_model(&home);
    let endpoint = answering_hub("404 Not Found");
    let o = generate("r2f-test/sd3-tiny", &tmp.path().join("out"), |c| {
        c.env("HF_HOME", &home)
            .env("HF_ENDPOINT", &endpoint)
            .current_dir(tmp.path());
    });
    let err = stderr(&o);
    assert!(!o.status.success(), "a 404 must not start from the cache");
    assert!(!err.contains(WARNING), "{err}");
    assert!(err.contains("404"), "{err}");
}

#[test]
fn a_missing_relative_folder_is_reported_as_such_and_never_looked_up() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("models")).unwrap();
    let cwd = tmp.path().canonicalize().unwrap();
    let endpoint = format!("http://127.0.0.1:{}", closed_port());
    for model in ["models/nope", "./nope", "../nope", "a/b/nope"] {
        let o = generate(model, &tmp.path().join("out"), |c| {
            c.env("HF_ENDPOINT", &endpoint)
                .env("HF_HOME", tmp.path().join("hf"))
                .current_dir(&cwd);
        });
        let err = stderr(&o);
        assert!(!o.status.success(), "{model}: expected failure");
        let want = format!(
            "model folder `{model}` does not exist (relative to {})",
            cwd.display()
        );
        assert!(err.contains(&want), "{model}: {err}");
        for word in ["Hub", "huggingface", "dns", "DNS", "127.0.0.1"] {
            assert!(!err.contains(word), "{model} mentions {word}: {err}");
        }
    }
}

#[test]
fn the_variant_is_a_model_setting_defaulting_to_auto() {
    use r2f::config::Settings;
    let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let s = Settings::load_from(None, env(&[])).unwrap();
    assert_eq!(s.models["sd3"].variant, WeightsVariant::Auto);
    let s = Settings::load_from(None, env(&[("R2F__MODELS__SD3__VARIANT", "fp16")])).unwrap();
    assert_eq!(s.models["sd3"].variant, WeightsVariant::Fp16);
    assert_eq!(s.models["sdxl"].variant, WeightsVariant::Auto);

    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("r2f.toml");
    std::fs::write(
        &file,
        "[models.tiny]\nsource = \"tests/fixtures/sd3-tiny-a\"\nvariant = \"full\"\n",
    )
    .unwrap();
    let s = Settings::load_from(Some(&file), env(&[])).unwrap();
    assert_eq!(s.models["tiny"].variant, WeightsVariant::Full);

    std::fs::write(&file, "[models.tiny]\nsource = \"x\"\nvariant = \"half\"\n").unwrap();
    let e = format!(
        "{:#}",
        Settings::load_from(Some(&file), env(&[])).unwrap_err()
    );
    assert!(e.contains("weights variant") && e.contains("half"), "{e}");
}
