//! Shared helpers for the integration tests.
#![allow(dead_code)]

pub mod fake_judge;
pub mod fake_llm;
pub mod harness;

use std::collections::HashMap;
use std::path::PathBuf;

use tch::{Kind, Tensor};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn model_dir(config: &str) -> PathBuf {
    fixtures().join(config)
}

/// The diffusers reference tensors of one fixture configuration.
pub fn reference(config: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join("ref").join(format!("{config}.safetensors"));
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .into_iter()
        .collect()
}

pub fn reference_json(config: &str) -> serde_json::Value {
    let path = fixtures().join("ref").join(format!("{config}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).expect("reference JSON")
}

/// max |a - b| / max |b|: the relative error we bound in parity tests.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    r2f::bench::parity::rel_err(a, b)
}

pub fn ids(t: &Tensor, row: i64) -> Vec<i64> {
    Vec::<i64>::try_from(t.get(row).to_kind(Kind::Int64)).expect("int ids")
}

/// Fraction of u8 values that differ by at most 1.
pub fn fraction_within_one(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len(), "image sizes differ");
    r2f::bench::parity::fraction_within_one(a, b)
}

/// Asserts `rel_err(got, want) <= tol` and prints the measured error (visible with --nocapture).
pub fn assert_close(label: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let e = rel_err(got, want);
    eprintln!("{label}: rel err {e:.3e} (tolerance {tol:.0e})");
    assert!(e <= tol, "{label}: rel err {e} over {tol}");
}

/// Distance between two f32 values in units in the last place: 0 when equal (and between +0 and
/// -0), 1 between neighbouring floats, counted across zero.
pub fn ulps(a: f32, b: f32) -> u64 {
    fn key(x: f32) -> i64 {
        let bits = x.to_bits();
        let magnitude = (bits & 0x7fff_ffff) as i64;
        if bits & 0x8000_0000 != 0 {
            -magnitude
        } else {
            magnitude
        }
    }
    assert!(!a.is_nan() && !b.is_nan(), "NaN in an ulp comparison");
    key(a).abs_diff(key(b))
}

/// Asserts that two float sequences have the same length and differ by at most `max_ulps`
/// units in the last place element by element, naming the first element that does not.
pub fn assert_within_ulps(label: &str, got: &[f32], want: &[f32], max_ulps: u64) {
    assert_eq!(got.len(), want.len(), "{label}: lengths differ");
    let mut worst = 0;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = ulps(*g, *w);
        assert!(
            d <= max_ulps,
            "{label}: element {i} is {g:e}, want {w:e} ({d} ulp apart, bound {max_ulps})"
        );
        worst = worst.max(d);
    }
    if worst > 0 {
        eprintln!("{label}: {worst} ulp at most (bound {max_ulps})");
    }
}

/// Copies the folder `src` to `dst`, recursively (a model folder to edit in a test).
pub fn copy_dir(src: &std::path::Path, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

/// The project's virtualenv Python (`R2F_VENV`, default `.venv`), with Pillow.
pub fn venv_python() -> PathBuf {
    let venv = std::env::var("R2F_VENV").map_or_else(
        |_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv"),
        PathBuf::from,
    );
    venv.join("bin/python")
}
