//! SDXL parity against diffusers 0.42.1 on the tiny random-weight fixtures (fp32, CPU), at the
//! SD3 parity tolerances: 1e-5 relative for modules, 1e-4 for whole-pipeline latents, 99.9% of
//! pixel values within 1.

mod common;

use common::*;
use r2f::generate::{prompt_schedule, Mode};
use r2f::models::hub::{Family, ModelFolder};
use r2f::models::unet::{Unet, UnetConfig};
use r2f::models::vae::{VaeConfig, VaeDecoder};
use r2f::models::weights::{Vb, Weights};
use r2f::pipelines::sdxl::SdxlPipeline;
use r2f::pipelines::Request;
use r2f::plan::Plan;
use r2f::r2f::PromptSchedule;
use r2f::schedulers::discrete::Scheduler;
use tch::{Device, Kind};

const CONFIGS: [&str; 2] = ["sdxl-tiny-a", "sdxl-tiny-b"];

fn vb(dir: &std::path::Path) -> Vb {
    Vb::new(Weights::from_dir(dir, Device::Cpu, Kind::Float).unwrap())
}

fn pipeline(name: &str) -> SdxlPipeline {
    let folder = ModelFolder::open(&model_dir(name)).unwrap();
    SdxlPipeline::load(&folder, Device::Cpu, Kind::Float).unwrap()
}

#[test]
fn text_embeddings_match_encode_prompt() {
    for name in CONFIGS {
        let r = reference(name);
        let m = reference_json(name);
        let pipe = pipeline(name);
        let c = pipe.encode(m["prompt"].as_str().unwrap()).unwrap();
        assert_close(
            &format!("{name} prompt_embeds"),
            &c.context,
            &r["prompt_embeds"],
            1e-5,
        );
        assert_close(
            &format!("{name} pooled"),
            &c.pooled,
            &r["pooled_prompt_embeds"],
            1e-5,
        );
    }
}

#[test]
fn unet_forward_matches_diffusers() {
    let _g = tch::no_grad_guard();
    for name in CONFIGS {
        let r = reference(name);
        let d = model_dir(name).join("unet");
        let unet = Unet::new(&vb(&d), &UnetConfig::load(&d).unwrap()).unwrap();
        let out = unet.forward(
            &r["unet_in_sample"],
            &r["unet_in_timestep"],
            &r["unet_in_context"],
            &r["unet_in_text_embeds"],
            &r["unet_in_time_ids"],
        );
        assert_close(&format!("{name} UNet forward"), &out, &r["unet_out"], 1e-5);
    }
}

#[test]
fn vae_decode_with_post_quant_conv_matches_diffusers() {
    let _g = tch::no_grad_guard();
    for name in CONFIGS {
        let r = reference(name);
        let d = model_dir(name).join("vae");
        let vae = VaeDecoder::new(&vb(&d), &VaeConfig::load(&d).unwrap()).unwrap();
        let out = vae.decode_latents(&r["vae_in"]);
        assert_close(&format!("{name} VAE decode"), &out, &r["vae_out"], 1e-5);
    }
}

fn check_run(
    name: &str,
    pipe: &SdxlPipeline,
    sampler: Scheduler,
    steps: usize,
    lat: &str,
    img: &str,
) {
    let r = reference(name);
    let m = reference_json(name);
    let req = Request::plain(
        m["prompt"].as_str().unwrap(),
        steps,
        m["guidance"].as_f64().unwrap(),
        m["seed"].as_i64().unwrap(),
        m["width"].as_i64().unwrap(),
        m["height"].as_i64().unwrap(),
    );
    let out = pipe.generate(&req, sampler, &mut |_, _| Ok(())).unwrap();
    assert_close(
        &format!("{name} {sampler:?} final latents"),
        &out.latents,
        &r[lat],
        1e-4,
    );
    let got = Vec::<u8>::try_from(out.image.view([-1])).unwrap();
    let want = Vec::<u8>::try_from(r[img].view([-1])).unwrap();
    let frac = fraction_within_one(&got, &want);
    assert!(
        frac >= 0.999,
        "{name} {sampler:?}: only {frac} of pixel values within 1"
    );
}

#[test]
fn whole_pipeline_matches_diffusers_with_euler_and_dpm_solver() {
    for name in CONFIGS {
        let m = reference_json(name);
        let pipe = pipeline(name);
        let steps = m["steps"].as_u64().unwrap() as usize;
        check_run(
            name,
            &pipe,
            Scheduler::EulerDiscrete,
            steps,
            "final_latents",
            "image_u8",
        );
        check_run(
            name,
            &pipe,
            Scheduler::DpmSolverPp2mKarras,
            4,
            "dpm_final_latents",
            "dpm_image_u8",
        );
    }
}

#[test]
fn r2f_on_sdxl_matches_the_official_loop() {
    let (r, m) = (
        reference("sdxl-tiny-a-r2f"),
        reference_json("sdxl-tiny-a-r2f"),
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
    let (prompts, order) = prompt_schedule(&mode, "", steps, Family::Sdxl);
    let want: Vec<usize> = m["r2f_step_prompt"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(
        order, want,
        "per-step prompt indices with the SDXL map [0,3,5,10,20,30]"
    );
    let pipe = pipeline("sdxl-tiny-a");
    let req = Request {
        prompts: prompts.clone(),
        step_prompt: order,
        negative_prompt: String::new(),
        guidance: m["guidance"].as_f64().unwrap(),
        seed: m["seed"].as_i64().unwrap(),
        width: m["width"].as_i64().unwrap(),
        height: m["height"].as_i64().unwrap(),
    };
    let out = pipe
        .generate(&req, Scheduler::DpmSolverPp2mKarras, &mut |_, _| Ok(()))
        .unwrap();
    assert_close(
        "SDXL R2F final latents",
        &out.latents,
        &r["r2f_final_latents"],
        1e-4,
    );
    let got = Vec::<u8>::try_from(out.image.view([-1])).unwrap();
    let want = Vec::<u8>::try_from(r["r2f_image_u8"].view([-1])).unwrap();
    assert!(fraction_within_one(&got, &want) >= 0.999);
    let plain = Request {
        prompts: vec![prompts.last().unwrap().clone()],
        step_prompt: vec![0; steps],
        ..req
    };
    let p = pipe
        .generate(&plain, Scheduler::DpmSolverPp2mKarras, &mut |_, _| Ok(()))
        .unwrap();
    assert_close(
        "SDXL plain (DPM++, 50 steps)",
        &p.latents,
        &r["r2f_plain_final_latents"],
        1e-4,
    );
    assert!(
        rel_err(&out.latents, &p.latents) > 1e-3,
        "R2F must differ from plain"
    );
}
