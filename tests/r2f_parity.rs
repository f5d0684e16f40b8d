//! R2F on SD3 against a reference run of the official schedule with diffusers' SD3 components
//! (`scripts/make_fixtures.py`, fp32 CPU): a 3-prompt plan with unsorted levels [3, 1] over 50
//! steps, T5 at 77 tokens. Tolerances as the SD3 parity tests: 1e-4 relative on final latents,
//! 99.9% of pixel values within 1.

mod common;

use common::*;
use r2f::generate::{prompt_schedule, Mode};
use r2f::models::hub::{Family, ModelFolder};
use r2f::pipelines::sd3::Sd3Pipeline;
use r2f::pipelines::Request;
use r2f::plan::Plan;
use r2f::r2f::PromptSchedule;
use tch::{Device, Kind};

#[test]
fn r2f_run_matches_the_official_schedule_on_diffusers_components() {
    let (r, m) = (
        reference("sd3-tiny-a-r2f"),
        reference_json("sd3-tiny-a-r2f"),
    );
    let Plan::R2f(plan) = Plan::from_json(&m["plan"]).unwrap() else {
        panic!("an R2F plan")
    };
    let steps = m["steps"].as_u64().unwrap() as usize;
    let mode = Mode::R2f {
        plan,
        schedule: PromptSchedule::Faithful,
        stop_steps: None,
    };
    let (prompts, order) = prompt_schedule(&mode, "", steps, Family::Sd3);
    let want_order: Vec<usize> = m["r2f_step_prompt"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(order, want_order, "per-step prompt indices");

    let folder = ModelFolder::open(&model_dir("sd3-tiny-a")).unwrap();
    let mut pipe = Sd3Pipeline::load(&folder, Device::Cpu, Kind::Float).unwrap();
    pipe.t5_tokens = m["t5_tokens"].as_u64().unwrap() as usize;
    let req = Request {
        prompts: prompts.clone(),
        step_prompt: order,
        negative_prompt: String::new(),
        guidance: m["guidance"].as_f64().unwrap(),
        seed: m["seed"].as_i64().unwrap(),
        width: m["width"].as_i64().unwrap(),
        height: m["height"].as_i64().unwrap(),
    };
    let out = pipe.generate(&req, &mut |_, _| Ok(())).unwrap();
    assert_close(
        "R2F final latents",
        &out.latents,
        &r["r2f_final_latents"],
        1e-4,
    );
    let got = Vec::<u8>::try_from(out.image.view([-1])).unwrap();
    let want = Vec::<u8>::try_from(r["r2f_image_u8"].view([-1])).unwrap();
    let frac = fraction_within_one(&got, &want);
    assert!(frac >= 0.999, "only {frac} of R2F pixel values within 1");

    // The same seed without the schedule: matches diffusers' plain run, and differs from R2F.
    let plain = Request {
        prompts: vec![prompts.last().unwrap().clone()],
        step_prompt: vec![0; steps],
        ..req
    };
    let p = pipe.generate(&plain, &mut |_, _| Ok(())).unwrap();
    assert_close(
        "plain final latents (77 T5 tokens)",
        &p.latents,
        &r["r2f_plain_final_latents"],
        1e-4,
    );
    let diff = rel_err(&out.latents, &p.latents);
    eprintln!("R2F vs plain: rel diff {diff:.3e}");
    assert!(
        diff > 1e-3,
        "R2F must differ from the plain run (rel diff {diff})"
    );
}
