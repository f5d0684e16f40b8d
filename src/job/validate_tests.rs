//! Unit tests of `validate.rs` (kept apart so that the module reads top to bottom).

use super::*;
use crate::r2f::regions::RegionMask;
use rand::{Rng, SeedableRng};
use serde_json::json;
use serde_json::Value;

fn limits() -> Limits {
    Limits {
        max_prompt_chars: 100,
        max_steps: 50,
        max_pixels: 512 * 512,
        max_images_per_job: 2,
        max_message_bytes: 4096,
        max_plan_prompts: 4,
        max_plan_prompt_chars: 100,
        max_plan_objects: 2,
    }
}

fn models() -> Vec<String> {
    vec!["sd3".into()]
}

fn validate(v: &Value) -> Result<ValidJob, Rejection> {
    validate_message(v.to_string().as_bytes(), &limits(), &models(), "sd3")
}

fn job() -> Value {
    json!({"id": "j-1", "prompt": "a hairy frog", "mode": "plain",
           "params": {"steps": 4, "width": 256, "height": 128, "seed": 1}})
}

fn with(path: &[&str], value: Value) -> Value {
    let mut j = job();
    let mut at = &mut j;
    for p in &path[..path.len() - 1] {
        at = &mut at[*p];
    }
    at[path[path.len() - 1]] = value;
    j
}

/// An r2fplus job with `params` overrides.
fn plus(params: &[(&str, Value)]) -> Value {
    let mut j = with(&["mode"], json!("r2fplus"));
    for (k, v) in params {
        j["params"][*k] = v.clone();
    }
    j
}

trait WithPlan {
    fn with_plan(self, plan: Value) -> Value;
}

impl WithPlan for Value {
    fn with_plan(mut self, plan: Value) -> Value {
        self["plan"] = plan;
        self
    }
}

#[test]
fn r2fplus_knobs_reach_the_job_and_clean_mode_takes_any_size() {
    let j = validate(&plus(&[
        ("schedule", json!("clean")),
        ("region_mask", json!("box")),
        ("bbox_guidance_steps", json!(4)),
        ("bbox_guidance_iterations", json!(2)),
        ("bbox_loss_scale", json!(100.0)),
        ("latent_fusion_steps", json!(8)),
        ("bbox_guidance_recompute", json!(true)),
    ]))
    .unwrap();
    let ModeSpec::R2fPlus { knobs: k, .. } = &j.spec else {
        panic!("an R2F+ job: {:?}", j.spec)
    };
    assert_eq!(k.mask, RegionMask::Box);
    assert_eq!(
        (k.guidance_steps, k.guidance_iterations, k.fusion_steps),
        (4, 2, 8)
    );
    assert_eq!(k.loss_scale, 100.0);
    assert!(k.recompute_blocks);
    assert_eq!(k.schedule, crate::r2f::PromptSchedule::Clean);
    // Defaults: the official values.
    let j = validate(&plus(&[("width", json!(128)), ("steps", json!(50))])).unwrap();
    assert!(matches!(&j.spec, ModeSpec::R2fPlus { knobs, .. } if *knobs == RegionKnobs::default()));
}

#[test]
fn a_valid_job_takes_defaults_for_what_it_omits() {
    let j = validate(&json!({"id": "x", "prompt": " a frog "})).unwrap();
    assert_eq!(j.prompt, "a frog");
    assert_eq!(j.model, "sd3");
    assert_eq!(j.spec.mode(), JobMode::R2f);
    assert_eq!(j.num_images, 1);
    assert_eq!(j.params.steps, None);
    assert_eq!(j.prefix, "");
}

#[test]
fn each_invalid_field_is_rejected_with_its_reason() {
    let long_id = "x".repeat(300);
    let plan_prompts: Vec<String> = (0..5).map(|i| format!("p{i}")).collect();
    let cases: Vec<(Value, &str)> = vec![
        (with(&["id"], json!("")), "invalid job id"),
        (with(&["id"], json!(long_id)), "invalid job id"),
        (with(&["id"], json!("a/b")), "invalid job id"),
        (with(&["id"], json!("..")), "invalid job id"),
        (with(&["id"], json!(7)), "invalid job: id: invalid type"),
        (with(&["prompt"], json!("  ")), "prompt is empty"),
        (
            with(&["prompt"], json!("a".repeat(101))),
            "max_prompt_chars",
        ),
        (with(&["model"], json!("sdxl")), "unknown model"),
        (
            with(&["mode"], json!("r3f")),
            "mode: unknown mode `r3f` (expected r2f, r2fplus or plain)",
        ),
        (with(&["params", "steps"], json!(0)), "max_steps"),
        (with(&["params", "steps"], json!(51)), "max_steps"),
        (
            with(&["params", "steps"], json!("4")),
            "invalid job: params.steps: invalid type: string \"4\", expected an integer",
        ),
        (
            with(&["params", "steps"], json!(4.5)),
            "params.steps: invalid type: floating point",
        ),
        (with(&["params", "guidance"], json!(-1.0)), "guidance"),
        (with(&["params", "width"], json!(100)), "multiple of 16"),
        (with(&["params", "height"], json!(-16)), "multiple of 16"),
        (
            with(&["params", "width"], json!(9008)),
            "between 16 and 8192",
        ),
        (with(&["params", "width"], json!(4096)), "max_pixels"),
        (
            with(&["params", "num_images"], json!(3)),
            "max_images_per_job",
        ),
        (
            with(&["params", "schedule"], json!("fast")),
            "unknown schedule `fast` (expected faithful or clean)",
        ),
        (
            with(&["params", "scheduler"], json!("ddim")),
            "params.scheduler: unknown scheduler `ddim`",
        ),
        (
            with(&["params", "stop_step_map"], json!("x")),
            "unknown stop-step map `x` (expected paper or head)",
        ),
        (
            with(&["output", "format"], json!("gif")),
            "unknown output format `gif` (expected png, jpeg or webp)",
        ),
        (
            with(&["output", "quality"], json!(0)),
            "quality must be between 1 and 100",
        ),
        (
            with(&["priority"], json!(256)),
            "priority must be between 0 and 255",
        ),
        (
            with(
                &["output", "webhook"],
                json!({"url": "https://h/", "events": []}),
            ),
            "events is empty",
        ),
        (
            with(
                &["output", "webhook"],
                json!({"url": "https://h/", "events": ["sideways"]}),
            ),
            "output.webhook.events[0]: unknown webhook event `sideways`",
        ),
        (
            with(&["output", "prefix"], json!("../up")),
            "invalid output prefix",
        ),
        (with(&["plan"], json!({"r2f_prompt": 3})), "invalid plan"),
        (
            with(
                &["plan"],
                json!({"visual_detail_level": ["1", "2", "3", "4"], "r2f_prompt": [plan_prompts]}),
            ),
            "max_plan_prompts",
        ),
        // R2F+ in faithful mode (the default): what the official loop cannot run.
        (with(&["mode"], json!("r2fplus")), "needs a square image"),
        (
            plus(&[("width", json!(128)), ("guidance", json!(1.0))]),
            "guidance above 1",
        ),
        (
            plus(&[("width", json!(128)), ("steps", json!(40))]),
            "41 steps",
        ),
        // R2F+ knobs out of bounds, in any mode.
        (
            with(&["params", "region_mask"], json!("star")),
            "unknown region mask `star` (expected ellipse or box)",
        ),
        (
            with(&["params", "bbox_guidance_iterations"], json!(21)),
            "bbox_guidance_iterations",
        ),
        (
            with(&["params", "bbox_loss_scale"], json!(-1.0)),
            "bbox_loss_scale",
        ),
        (
            with(&["params", "bbox_guidance_steps"], json!(51)),
            "max_steps",
        ),
        (
            with(&["params", "latent_fusion_steps"], json!(-1)),
            "max_steps",
        ),
        (
            plus(&[("width", json!(128))]).with_plan(json!(
                {"visual_detail_level": "3", "r2f_prompt": [["a frog", "a hairy frog"]]}
            )),
            "was given an R2F plan",
        ),
        (json!([1, 2]), "not a JSON object"),
    ];
    for (msg, want) in cases {
        let err = validate(&msg)
            .err()
            .unwrap_or_else(|| panic!("accepted: {msg}"));
        assert!(
            err.0.contains(want),
            "{msg}: `{}` should say `{want}`",
            err.0
        );
    }
}

#[test]
fn a_r2f_job_with_a_regions_plan_is_rejected() {
    let plan = json!({"original_prompt": "a frog and a cat", "base_prompt": "#1 and a cat",
        "objects": {"#1": {"prompt": "#1", "object": "frog", "r2f": ["an animal"],
                            "visual_detail_levels": [3], "bbox": [0.0, 0.0, 0.5, 0.5]}}});
    let mut j = with(&["plan"], plan.clone());
    j["mode"] = json!("r2f");
    let err = validate(&j).expect_err("rejected");
    assert!(
        err.0.contains("mode r2f was given an R2F+ (regions) plan"),
        "{}",
        err.0
    );
    // The same plan is an R2F+ job's own plan; in a plain job it is checked and not used.
    let j = validate(&plus(&[("width", json!(128)), ("steps", json!(50))]).with_plan(plan.clone()))
        .unwrap();
    assert!(matches!(j.spec, ModeSpec::R2fPlus { plan: Some(_), .. }));
    let j = validate(&with(&["plan"], plan)).unwrap();
    assert_eq!(j.spec, ModeSpec::Plain);
}

#[test]
fn oversized_and_non_utf8_bodies_are_rejected_before_parsing() {
    let big = format!("{{\"id\": \"big-1\", \"pad\": \"{}\"}}", "x".repeat(5000));
    let err = validate_message(big.as_bytes(), &limits(), &models(), "sd3").unwrap_err();
    assert!(err.0.contains("max_message_bytes"), "{}", err.0);
    assert_eq!(
        best_effort_id(big.as_bytes(), 4096).as_deref(),
        Some("big-1")
    );
    let err = validate_message(b"\xff\xfe{", &limits(), &models(), "sd3").unwrap_err();
    assert!(err.0.contains("not valid JSON"), "{}", err.0);
}

#[test]
fn best_effort_ids_are_only_valid_ids() {
    let long = format!("{{\"id\": \"{}\"}}", "a".repeat(300));
    assert_eq!(best_effort_id(long.as_bytes(), 4096), None);
    assert_eq!(best_effort_id(b"{\"id\": \"a\\nb\"}", 4096), None);
    assert_eq!(best_effort_id(b"not json", 4096), None);
    assert_eq!(
        best_effort_id(b"{\"id\": \"ok-1\"}", 4096).as_deref(),
        Some("ok-1")
    );
}

/// A random JSON value of bounded depth, biased towards the job's own field names.
fn random_json(rng: &mut rand::rngs::StdRng, depth: u32) -> Value {
    const KEYS: [&str; 14] = [
        "id",
        "prompt",
        "model",
        "mode",
        "plan",
        "params",
        "steps",
        "width",
        "height",
        "output",
        "prefix",
        "r2f_prompt",
        "visual_detail_level",
        "objects",
    ];
    match rng.random_range(0..if depth == 0 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => json!(rng.random::<bool>()),
        2 => json!(rng.random_range(-70000i64..70000)),
        3 => json!(rng.random::<f64>() * 1e6 - 5e5),
        4 => {
            let pool = [
                "", "a", "Ⱥ", "K", "🦀", "..", "a/b", "r2f", "plain", "sd3", "3",
            ];
            json!(pool[rng.random_range(0..pool.len())].repeat(rng.random_range(0..4)))
        }
        5 => Value::Array(
            (0..rng.random_range(0..4))
                .map(|_| random_json(rng, depth - 1))
                .collect(),
        ),
        _ => Value::Object(
            (0..rng.random_range(0..6))
                .map(|_| {
                    let k = KEYS[rng.random_range(0..KEYS.len())].to_string();
                    (k, random_json(rng, depth - 1))
                })
                .collect(),
        ),
    }
}

/// Arbitrary bytes and arbitrary JSON never panic: they give a job or a rejection.
#[test]
fn arbitrary_input_never_panics() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(20261130);
    for _ in 0..3000 {
        let len = rng.random_range(0..300);
        let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        let _ = validate_message(&bytes, &limits(), &models(), "sd3");
        let _ = best_effort_id(&bytes, 100);
    }
    for _ in 0..5000 {
        let v = random_json(&mut rng, 4);
        let _ = validate(&v);
        // And mutations of a valid job, one field at a time.
        let mut j = job();
        let key =
            ["id", "prompt", "mode", "plan", "params", "output", "model"][rng.random_range(0..7)];
        j[key] = random_json(&mut rng, 3);
        let _ = validate(&j);
    }
    // Deep nesting is refused by the parser's recursion limit, not by a stack overflow.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let big = Limits {
        max_message_bytes: 1 << 20,
        ..limits()
    };
    assert!(validate_message(deep.as_bytes(), &big, &models(), "sd3").is_err());
}
