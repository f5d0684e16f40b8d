//! `r2f generate` as a user runs it: the binary, a model folder, a PNG with metadata; and the
//! one-line errors for invalid options.

mod common;

use std::process::Command;

use common::*;

fn r2f() -> Command {
    Command::new(env!("CARGO_BIN_EXE_r2f"))
}

#[test]
fn generate_writes_png_matching_diffusers_with_metadata_and_latents() {
    let m = reference_json("sd3-tiny-a");
    let r = reference("sd3-tiny-a");
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("out/img.png");
    let lat = dir.path().join("lat.safetensors");
    let out = r2f()
        .args([
            "generate", "--mode", "plain", "--device", "cpu", "--dtype", "fp32",
        ])
        .args(["--model", model_dir("sd3-tiny-a").to_str().unwrap()])
        .args(["--prompt", m["prompt"].as_str().unwrap()])
        .args(["--steps", &m["steps"].to_string()])
        .args(["--guidance", &m["guidance"].to_string()])
        .args(["--seed", &m["seed"].to_string()])
        .args([
            "--width",
            &m["width"].to_string(),
            "--height",
            &m["height"].to_string(),
        ])
        .args(["--out", png.to_str().unwrap()])
        .args(["--latents-out", lat.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "r2f generate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&png).unwrap();
    let (w, h, pixels, text) = r2f::image::decode_png(&bytes).unwrap();
    assert_eq!(
        (w as i64, h as i64),
        (m["width"].as_i64().unwrap(), m["height"].as_i64().unwrap())
    );
    let want = Vec::<u8>::try_from(r["image_u8"].view([-1])).unwrap();
    let frac = fraction_within_one(&pixels, &want);
    assert!(
        frac >= 0.999,
        "only {frac} of pixel values within 1 of diffusers'"
    );
    let get = |k: &str| {
        text.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(get("prompt").as_deref(), m["prompt"].as_str());
    assert_eq!(get("seed"), Some(m["seed"].to_string()));
    assert_eq!(get("mode").as_deref(), Some("plain"));
    assert!(get("model").unwrap().contains("sd3-tiny-a"));

    let latents: Vec<(String, tch::Tensor)> = tch::Tensor::read_safetensors(&lat).unwrap();
    assert_eq!(latents.len(), 1);
    assert_eq!(latents[0].0, "latents");
    let e = rel_err(&latents[0].1, &r["final_latents"]);
    assert!(e <= 1e-4, "latents-out rel err {e}");
}

fn assert_one_line_error(args: &[String], needle: &str) {
    let out = r2f().args(args).output().unwrap();
    assert!(!out.status.success(), "expected failure for {args:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line expected, got: {stderr}");
    assert!(
        lines[0].contains(needle),
        "error {:?} should mention {needle:?}",
        lines[0]
    );
    assert!(!stderr.contains("panicked"), "no panic expected: {stderr}");
}

/// `r2f generate` with a model and extra options; the output is never written.
fn generate_args(model: &str, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "generate",
        "--prompt",
        "a frog",
        "--out",
        "/tmp/r2f-never.png",
        "--device",
        "cpu",
        "--model",
        model,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

#[test]
fn invalid_options_fail_with_one_line_and_no_panic() {
    let model = model_dir("sd3-tiny-a");
    let model = model.to_str().unwrap();
    assert_one_line_error(&generate_args(model, &["--width", "40"]), "multiple of 16");
    assert_one_line_error(&generate_args(model, &["--steps", "0"]), "steps");
    assert_one_line_error(
        &generate_args("/nonexistent/model-folder", &[]),
        "does not exist",
    );
    assert_one_line_error(&generate_args(model, &["--dtype", "fp8"]), "dtype");
    assert_one_line_error(&generate_args(model, &["--mode", "sideways"]), "mode");
    assert_one_line_error(&generate_args(model, &["--device", "tpu"]), "device");
    // A folder that is not a diffusers model.
    let tmp = tempfile::tempdir().unwrap();
    assert_one_line_error(
        &generate_args(tmp.path().to_str().unwrap(), &[]),
        "model_index.json",
    );
    assert!(!std::path::Path::new("/tmp/r2f-never.png").exists());
}

#[test]
fn missing_tensor_is_reported_with_its_name_and_folder() {
    // Copy the tiny model and drop one tensor from the transformer.
    let tmp = tempfile::tempdir().unwrap();
    let src = model_dir("sd3-tiny-a");
    copy_dir(&src, tmp.path());
    let st = tmp
        .path()
        .join("transformer/diffusion_pytorch_model.safetensors");
    let tensors = tch::Tensor::read_safetensors(&st).unwrap();
    let kept: Vec<(String, tch::Tensor)> = tensors
        .into_iter()
        .filter(|(n, _)| n != "proj_out.weight")
        .collect();
    tch::Tensor::write_safetensors(&kept, &st).unwrap();
    assert_one_line_error(
        &generate_args(tmp.path().to_str().unwrap(), &[]),
        "proj_out.weight",
    );
}

#[test]
fn hub_model_id_resolves_from_the_offline_cache() {
    // The Hugging Face cache layout: models--org--name/refs/main -> snapshots/<commit>/...
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--r2f-test--sd3-tiny");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    copy_dir(
        &model_dir("sd3-tiny-a"),
        &repo.join("snapshots").join(commit),
    );
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let png = home.path().join("hub.png");
    let mut args = generate_args("r2f-test/sd3-tiny", &["--steps", "1", "--seed", "3"]);
    let out_pos = args.iter().position(|a| a == "--out").unwrap();
    args[out_pos + 1] = png.to_str().unwrap().to_string();
    let out = r2f()
        .args(&args)
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "generate from the Hub cache failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(png.exists());

    // Not in the cache while offline: a clear error, no network.
    let out = r2f()
        .args(generate_args("r2f-test/absent", &[]))
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in the Hugging Face cache"));
}

#[test]
fn bench_runs_small_configurations_on_the_cpu() {
    for model in ["sd3-tiny", "sdxl-tiny"] {
        let out = r2f()
            .args([
                "bench", "--model", model, "--device", "cpu", "--width", "64", "--height", "64",
            ])
            .args(["--steps", "2", "--warmup", "1", "--context-tokens", "16"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{model}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        for key in ["ms_per_step=", "vae_decode_ms=", "gpu_memory_mib="] {
            assert!(
                stdout.contains(key),
                "{model} bench output lacks {key}: {stdout}"
            );
        }
    }
}

#[test]
fn schedule_command_prints_the_prompt_of_every_step() {
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.json");
    std::fs::write(
        &plan,
        r#"{"visual_detail_level": ["5", "3"], "r2f_prompt": [["p0", "p1", "p2"]]}"#,
    )
    .unwrap();
    let run = |schedule: &str| {
        let out = r2f()
            .args([
                "schedule",
                "--plan",
                plan.to_str().unwrap(),
                "--steps",
                "50",
                "--model",
                "sd3",
            ])
            .args(["--schedule", schedule])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Vec<String>>(&out.stdout).unwrap()
    };
    // Faithful: T = [40, 20, 50]; p0/p2 alternate until 40, then p1/p2 (the unsorted-levels quirk).
    let f = run("faithful");
    assert_eq!(f.len(), 50);
    assert_eq!(&f[38..42], ["p0", "p2", "p1", "p2"]);
    assert_eq!(f[48], "p1");
    // Clean: each concept's own stop step: p0 until 20, p1 until 40, then p2 only.
    let c = run("clean");
    assert_eq!(&c[18..22], ["p0", "p2", "p1", "p2"]);
    assert!(c[40..].iter().all(|p| p == "p2"));
    // A bad plan is a one-line error.
    std::fs::write(
        &plan,
        r#"{"visual_detail_level": "9", "r2f_prompt": [["a", "b"]]}"#,
    )
    .unwrap();
    let out = r2f()
        .args([
            "schedule",
            "--plan",
            plan.to_str().unwrap(),
            "--steps",
            "50",
            "--model",
            "sd3",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("outside 0..5"));
}

#[test]
fn sdxl_schedule_uses_its_own_map_and_the_paper_map_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.json");
    std::fs::write(
        &plan,
        r#"{"visual_detail_level": "3", "r2f_prompt": [["freq", "rare"]]}"#,
    )
    .unwrap();
    let frequent_steps = |extra: &[&str]| {
        let out = r2f()
            .args([
                "schedule",
                "--plan",
                plan.to_str().unwrap(),
                "--steps",
                "50",
                "--model",
                "sdxl",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let steps: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
        steps.iter().filter(|p| *p == "freq").count()
    };
    // Level 3: stop step 10 at HEAD (5 frequent steps), 20 with the paper-era map (10).
    assert_eq!(frequent_steps(&[]), 5);
    assert_eq!(frequent_steps(&["--stop-step-map", "paper"]), 10);
    assert_eq!(frequent_steps(&["--stop-step-map", "head"]), 5);
}

/// A two-object R2F+ plan whose JSON lists `#2` first.
fn region_plan_file(dir: &std::path::Path) -> std::path::PathBuf {
    let plan = serde_json::json!({
        "original_prompt": "a furry frog and a glass sword",
        "base_prompt": "a #1 next to a #2",
        "objects": {
            "#2": {"prompt": "a photo of a #2", "object": "glass sword", "r2f": [],
                   "visual_detail_levels": [], "bbox": [0.5, 0.1, 0.9, 0.9]},
            "#1": {"prompt": "a photo of a #1", "object": "furry frog", "r2f": ["furry animal"],
                   "visual_detail_levels": [1], "bbox": [0.1, 0.2, 0.5, 0.8]}
        }
    });
    let path = dir.join("plus.json");
    std::fs::write(&path, plan.to_string()).unwrap();
    path
}

#[test]
fn generate_runs_r2fplus_from_a_plan_file_and_refuses_what_faithful_mode_cannot_run() {
    let dir = tempfile::tempdir().unwrap();
    let plan = region_plan_file(dir.path());
    let model = model_dir("sd3-tiny-a");
    let model = model.to_str().unwrap();
    let png = dir.path().join("plus.png");
    let mut args = generate_args(model, &[]);
    args.retain(|a| a != "/tmp/r2f-never.png");
    let pos = args.iter().position(|a| a == "--out").unwrap();
    args.insert(pos + 1, png.to_str().unwrap().to_string());
    let extra = [
        "--plan",
        plan.to_str().unwrap(),
        "--schedule",
        "clean",
        "--steps",
        "6",
        "--region-mask",
        "box",
        "--bbox-guidance-iterations",
        "2",
        "--width",
        "64",
        "--height",
        "48",
    ];
    let out = r2f().args(&args).args(extra).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "r2f generate failed: {stderr}");
    assert!(stderr.contains("guidance_ms"), "{stderr}");
    let (w, h, _, text) = r2f::image::decode_png(&std::fs::read(&png).unwrap()).unwrap();
    assert_eq!((w, h), (64, 48));
    let mode = text
        .iter()
        .find(|(k, _)| k == "mode")
        .map(|(_, v)| v.as_str());
    assert_eq!(mode, Some("r2fplus"));
    // Faithful mode (the default) refuses the tiny model's non-square size, naming why.
    let plan_arg = [
        "--plan",
        plan.to_str().unwrap(),
        "--steps",
        "50",
        "--width",
        "64",
        "--height",
        "48",
    ];
    assert_one_line_error(&generate_args(model, &plan_arg), "square");
    assert_one_line_error(
        &generate_args(
            model,
            &["--plan", plan.to_str().unwrap(), "--region-mask", "star"],
        ),
        "region-mask",
    );
}

#[test]
fn schedule_prints_every_run_of_an_r2fplus_plan_with_token_rows() {
    let dir = tempfile::tempdir().unwrap();
    let plan = region_plan_file(dir.path());
    let out = r2f()
        .args([
            "schedule",
            "--plan",
            plan.to_str().unwrap(),
            "--steps",
            "50",
        ])
        .args(["--model", "sd3", "--tokenizers"])
        .arg(model_dir("sd3-tiny-a"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let runs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = runs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["run"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["#2", "#1", "overall"]);
    // Object runs end with the fusion steps (20), the overall run has all 50.
    assert_eq!(runs[1]["steps"].as_array().unwrap().len(), 20);
    let overall = runs[2]["steps"].as_array().unwrap();
    assert_eq!(overall.len(), 50);
    // Level 1 stops at step 5: the frequent phrase on steps 0, 2, 4.
    assert_eq!(overall[4]["prompt"], "a furry animal next to a glass sword");
    assert_eq!(overall[5]["prompt"], "a furry frog next to a glass sword");
    assert_eq!(overall[6]["prompt"], "a furry frog next to a glass sword");
    // "a furry frog next to a glass sword": CLIP rows 2-3 and 7-8 (BOS at 0), and T5 rows
    // after the 77 CLIP rows.
    let rows = |key: &str| -> Vec<i64> {
        overall[6]["objects"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["key"] == key)
            .unwrap()["indices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect()
    };
    let one = rows("#1");
    assert_eq!(&one[..2], &[2, 3], "{one:?}");
    assert!(one[2..].iter().all(|&r| r >= 77), "{one:?}");
    let two = rows("#2");
    assert_eq!(&two[..2], &[7, 8], "{two:?}");
    // Without tokenizers an R2F+ plan cannot be scheduled.
    assert_one_line_error(
        &[
            "schedule".into(),
            "--plan".into(),
            plan.to_str().unwrap().into(),
            "--steps".into(),
            "50".into(),
            "--model".into(),
            "sd3".into(),
        ],
        "--tokenizers",
    );
}

#[test]
fn gpu_check_cpu_smoke_runs_every_step_and_prints_its_table() {
    let out_dir = tempfile::tempdir().unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(root.join("scripts/gpu_check.sh"))
        .arg("--cpu-smoke")
        .env("R2F_BIN", env!("CARGO_BIN_EXE_r2f"))
        .env("OUT", out_dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for row in [
        "parity fp32 (cpu)",
        "parity bf16 (cpu)",
        "bench sd3-tiny 64x64",
        "bench sdxl-tiny 64x64",
        "e2e sd3-tiny plain 2 steps",
        "e2e sd3-tiny r2f 4 steps",
        "e2e sd3-tiny r2fplus 4 steps",
        "e2e sdxl-tiny r2f 4 steps",
        "anchor sd3-tiny diffusers",
        "anchor sdxl-tiny diffusers",
    ] {
        assert!(stdout.contains(row), "missing `{row}` in:\n{stdout}");
    }
    // What a lent machine hands back: one combined report and one archive of the logs.
    let mut files: Vec<String> = std::fs::read_dir(out_dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["gpu_check.json", "gpu_check_logs.tar.gz"]);
    let all: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.path().join("gpu_check.json")).unwrap())
            .unwrap();
    let read = |name: &str| all[name].clone();
    let parity = read("parity-fp32");
    assert_eq!(parity["ok"], true, "{parity}");
    // SD3 ×2, SDXL ×4 (Euler and DPM++), and the five official R2F+ cases.
    let cases = parity["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 11, "{parity}");
    let r2fplus = cases
        .iter()
        .filter(|c| c["case"].as_str().unwrap().starts_with("r2f+ "))
        .count();
    assert_eq!(r2fplus, 5, "{parity}");
    let e2e = read("e2e-sd3-tiny");
    let jobs: Vec<&str> = e2e["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["job"].as_str().unwrap())
        .collect();
    assert_eq!(jobs, ["plain", "r2f", "r2fplus"]);
    // The diffusers anchors ran at the bench's shapes, eager and through torch.compile.
    for m in ["sd3-tiny", "sdxl-tiny"] {
        let a = read(&format!("anchor-{m}"));
        let b = read(&format!("bench-{m}"));
        for key in ["width", "height", "steps", "dtype", "device"] {
            assert_eq!(a[key], b[key], "{key}: {a}\n{b}");
        }
        // Both sides name the attention kernel they pick for the same attention shape.
        assert_eq!(a["attention"]["shape"], b["attention"]["shape"], "{a}\n{b}");
        assert!(b["attention"]["sdp_backend"].is_string(), "{b}");
        assert!(a["eager"]["ms_per_step"].as_f64().unwrap() > 0.0, "{a}");
        assert_eq!(a["compiled"]["final_latents_finite"], true, "{a}");
    }
    assert!(
        e2e["jobs"][2]["guidance_s"].as_f64().unwrap() > 0.0,
        "{e2e}"
    );
}

#[test]
fn a_written_random_model_folder_loads_and_generates() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("sd3-random");
    let out = r2f()
        .args([
            "bench", "--model", "sd3-tiny", "--device", "cpu", "--dtype", "fp32",
        ])
        .arg("--write-model")
        .arg(&model)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for component in [
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "transformer",
        "vae",
    ] {
        assert!(
            model.join(component).join("config.json").is_file(),
            "{component}"
        );
    }
    let png = dir.path().join("img.png");
    let mut args = generate_args(model.to_str().unwrap(), &["--steps", "2", "--width", "64"]);
    args.extend(["--height".into(), "64".into()]);
    let pos = args.iter().position(|a| a == "/tmp/r2f-never.png").unwrap();
    args[pos] = png.to_str().unwrap().to_string();
    let out = r2f().args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (w, h, _, _) = r2f::image::decode_png(&std::fs::read(&png).unwrap()).unwrap();
    assert_eq!((w, h), (64, 64));
}
