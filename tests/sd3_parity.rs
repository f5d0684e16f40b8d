//! SD3 parity against diffusers 0.42.1 on the tiny random-weight fixtures made by
//! `scripts/make_fixtures.py` (fp32, CPU).
//!
//! Tolerances: 1e-5 relative (max |a-b| / max |b|) for single modules, where only the order of
//! float32 reductions can differ; 1e-4 for whole-pipeline latents, where those differences
//! compound over the steps; images: at least 99.9% of u8 values within 1 of diffusers'.

mod common;

use common::*;
use r2f::models::clip::{ClipConfig, ClipTextModel};
use r2f::models::hub::ModelFolder;
use r2f::models::mmdit::{Mmdit, MmditConfig};
use r2f::models::tokenizer::PromptTokenizer;
use r2f::models::vae::{VaeConfig, VaeDecoder};
use r2f::models::weights::{Vb, Weights};
use r2f::pipelines::sd3::Sd3Pipeline;
use r2f::pipelines::{initial_latents, Request};
use r2f::schedulers::flow_match::{FlowMatchConfig, FlowMatchSchedule};
use tch::{Device, Kind};

const CONFIGS: [&str; 2] = ["sd3-tiny-a", "sd3-tiny-b"];
const MODULE_TOL: f64 = 1e-5;
const PIPELINE_TOL: f64 = 1e-4;

fn vb(dir: &std::path::Path) -> Vb {
    Vb::new(Weights::from_dir(dir, Device::Cpu, Kind::Float).expect("weights"))
}

fn pipeline(config: &str) -> Sd3Pipeline {
    let folder = ModelFolder::open(&model_dir(config)).expect("model folder");
    Sd3Pipeline::load(&folder, Device::Cpu, Kind::Float).expect("pipeline")
}

#[test]
fn token_ids_match_transformers_for_every_probe_prompt() {
    let path = fixtures().join("ref/tokenizers.json");
    let probes: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let dir = model_dir("sd3-tiny-a");
    let clip_l = PromptTokenizer::clip(&dir.join("tokenizer")).unwrap();
    let clip_g = PromptTokenizer::clip(&dir.join("tokenizer_2")).unwrap();
    let t5_77 = PromptTokenizer::t5(&dir.join("tokenizer_3"), 77).unwrap();
    let t5_256 = t5_77.with_length(256).unwrap();
    let list = probes["prompts"].as_array().expect("a list of probes");
    assert!(list.len() >= 6);
    for probe in list {
        let prompt = probe["prompt"].as_str().unwrap();
        let want = |k: &str| -> Vec<i64> {
            probe[k]
                .as_array()
                .unwrap_or_else(|| panic!("probe field {k}"))
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect()
        };
        assert_eq!(
            clip_l.encode(prompt).unwrap(),
            want("clip_l"),
            "CLIP-L ids of {prompt:?}"
        );
        assert_eq!(
            clip_g.encode(prompt).unwrap(),
            want("clip_g"),
            "CLIP-G ids of {prompt:?}"
        );
        assert_eq!(
            t5_77.encode(prompt).unwrap(),
            want("t5_77"),
            "T5/77 ids of {prompt:?}"
        );
        assert_eq!(
            t5_256.encode(prompt).unwrap(),
            want("t5_256"),
            "T5/256 ids of {prompt:?}"
        );
    }
}

#[test]
fn pipeline_token_ids_match_diffusers() {
    for config in CONFIGS {
        let r = reference(config);
        let meta = reference_json(config);
        let pipe = pipeline(config);
        for (row, prompt) in [(0, ""), (1, meta["prompt"].as_str().unwrap())] {
            let t = pipe.token_ids(prompt).unwrap();
            assert_eq!(
                t.clip_l,
                ids(&r["clip_l_ids"], row),
                "{config} CLIP-L row {row}"
            );
            assert_eq!(
                t.clip_g,
                ids(&r["clip_g_ids"], row),
                "{config} CLIP-G row {row}"
            );
            assert_eq!(
                t.t5.unwrap(),
                ids(&r["t5_ids"], row),
                "{config} T5 row {row}"
            );
        }
    }
}

#[test]
fn clip_encoders_match_transformers() {
    let _g = tch::no_grad_guard();
    for config in CONFIGS {
        let r = reference(config);
        let dir = model_dir(config);
        for (sub, key) in [("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")] {
            let d = dir.join(sub);
            let model = ClipTextModel::new(&vb(&d), &ClipConfig::load(&d).unwrap(), true).unwrap();
            let out = model.forward(&r[&format!("{key}_ids")].to_kind(Kind::Int64));
            let hidden = &r[&format!("{key}_hidden")];
            let label = format!("{config} {key} hidden_states[-2]");
            assert_close(&label, &out.penultimate, hidden, MODULE_TOL);
            let pooled = &r[&format!("{key}_pooled")];
            let label = format!("{config} {key} text_embeds");
            assert_close(
                &label,
                out.text_embeds.as_ref().unwrap(),
                pooled,
                MODULE_TOL,
            );
        }
    }
}

#[test]
fn prompt_embeddings_match_diffusers_encode_prompt() {
    for config in CONFIGS {
        let r = reference(config);
        let meta = reference_json(config);
        let pipe = pipeline(config);
        let pos = pipe.encode(meta["prompt"].as_str().unwrap()).unwrap();
        let neg = pipe.encode("").unwrap();
        for (got, key) in [
            (&pos.context, "prompt_embeds"),
            (&pos.pooled, "pooled_prompt_embeds"),
            (&neg.context, "negative_prompt_embeds"),
            (&neg.pooled, "negative_pooled_prompt_embeds"),
        ] {
            assert_close(&format!("{config} {key}"), got, &r[key], MODULE_TOL);
        }
    }
}

#[test]
fn t5_encoder_matches_at_77_and_256_tokens() {
    let _g = tch::no_grad_guard();
    for config in CONFIGS {
        let r = reference(config);
        let d = model_dir(config).join("text_encoder_3");
        let t5 =
            r2f::models::t5::T5Encoder::new(&vb(&d), &r2f::models::t5::T5Config::load(&d).unwrap())
                .unwrap();
        for (ids_key, out_key) in [("t5_ids", "t5_hidden"), ("t5_ids_77", "t5_hidden_77")] {
            let out = t5.forward(&r[ids_key].to_kind(Kind::Int64));
            assert_close(
                &format!("{config} {out_key}"),
                &out,
                &r[out_key],
                MODULE_TOL,
            );
        }
    }
}

#[test]
fn transformer_forward_matches_diffusers() {
    let _g = tch::no_grad_guard();
    for config in CONFIGS {
        let r = reference(config);
        let d = model_dir(config).join("transformer");
        let model = Mmdit::new(&vb(&d), &MmditConfig::load(&d).unwrap()).unwrap();
        let out = model
            .forward(
                &r["tf_in_hidden"],
                &r["tf_in_timestep"],
                &r["tf_in_context"],
                &r["tf_in_pooled"],
            )
            .unwrap();
        assert_close(
            &format!("{config} transformer forward"),
            &out,
            &r["tf_out"],
            MODULE_TOL,
        );
    }
}

/// Bit identity holds on any machine here: the flow-matching schedule (diffusers'
/// `FlowMatchEulerDiscreteScheduler`, static shift) is made of IEEE-754 additions,
/// multiplications and divisions only (linspace, the shift `s·k / (1 + (k − 1)·s)`, float32
/// and float64 conversions), which are correctly rounded everywhere; no `pow`, `log` or `exp`
/// whose last bit depends on the machine's libm (compare `tests/sdxl_schedulers.rs`).
#[test]
fn scheduler_sigmas_and_timesteps_are_bit_identical() {
    for config in CONFIGS {
        let r = reference(config);
        let cfg = FlowMatchConfig::load(&model_dir(config).join("scheduler")).unwrap();
        for n in [1usize, 2, 28, 50] {
            let s = FlowMatchSchedule::new(&cfg, n);
            let want_sigmas = Vec::<f32>::try_from(&r[&format!("sigmas_{n}")]).unwrap();
            let want_t = Vec::<f32>::try_from(&r[&format!("timesteps_{n}")]).unwrap();
            assert_eq!(s.sigmas, want_sigmas, "{config} sigmas for {n} steps");
            assert_eq!(s.timesteps, want_t, "{config} timesteps for {n} steps");
        }
    }
}

#[test]
fn vae_decode_matches_diffusers() {
    let _g = tch::no_grad_guard();
    for config in CONFIGS {
        let r = reference(config);
        let d = model_dir(config).join("vae");
        let vae = VaeDecoder::new(&vb(&d), &VaeConfig::load(&d).unwrap()).unwrap();
        let out = vae.decode_latents(&r["vae_in"]);
        assert_close(
            &format!("{config} VAE decode"),
            &out,
            &r["vae_out"],
            MODULE_TOL,
        );
    }
}

#[test]
fn whole_pipeline_matches_diffusers_latents_and_pixels() {
    for config in CONFIGS {
        let r = reference(config);
        let m = reference_json(config);
        let pipe = pipeline(config);
        let (w, h) = (m["width"].as_i64().unwrap(), m["height"].as_i64().unwrap());
        let seed = m["seed"].as_i64().unwrap();
        let f = pipe.vae_scale_factor();
        // The contract's seed semantics give exactly the latents diffusers was handed.
        let init = initial_latents(seed, &[1, 16, h / f, w / f]);
        assert!(
            init.equal(&r["init_latents"]),
            "{config}: initial latents differ"
        );

        let req = Request::plain(
            m["prompt"].as_str().unwrap(),
            m["steps"].as_u64().unwrap() as usize,
            m["guidance"].as_f64().unwrap(),
            seed,
            w,
            h,
        );
        let mut seen = 0;
        let out = pipe
            .generate(&req, &mut |i, _| {
                seen = i;
                Ok(())
            })
            .unwrap();
        assert_eq!(seen, req.steps());
        assert_close(
            &format!("{config} final latents"),
            &out.latents,
            &r["final_latents"],
            PIPELINE_TOL,
        );
        let got = Vec::<u8>::try_from(out.image.view([-1])).unwrap();
        let want = Vec::<u8>::try_from(r["image_u8"].view([-1])).unwrap();
        let frac = fraction_within_one(&got, &want);
        assert!(
            frac >= 0.999,
            "{config}: only {frac} of pixel values within 1"
        );
    }
}

#[test]
fn plain_run_differs_with_another_seed() {
    // Guards the parity test against a pipeline that ignores its noise.
    let pipe = pipeline("sd3-tiny-a");
    let a = pipe
        .generate(
            &Request::plain("a red cube", 2, 7.0, 1, 64, 48),
            &mut |_, _| Ok(()),
        )
        .unwrap();
    let b = pipe
        .generate(
            &Request::plain("a red cube", 2, 7.0, 2, 64, 48),
            &mut |_, _| Ok(()),
        )
        .unwrap();
    assert!(rel_err(&a.latents, &b.latents) > 1e-2);
}
