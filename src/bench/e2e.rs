//! `r2f bench --e2e`: whole jobs at full size through the same `generate` path as the worker,
//! with random weights for every component built in memory on the device (no weights on disk,
//! no download) and the tokenizers of a model folder. Figures comparable with the reference
//! table of `docs/gpu.md`: encode / denoise / decode / PNG / total seconds per job, and peak GPU
//! memory.

use std::fmt;
use std::path::PathBuf;
use std::time::Instant;

use indexmap::IndexMap;
use serde::Serialize;
use tch::{Device, Kind};

use crate::bench::{sd3_tiny, sdxl_tiny, BenchModel, Denoiser};
use crate::device::{device_name, dtype_name, synchronize};
use crate::generate::{generate_image, Encoding, Engine, JobMode, Mode, ModelIdentity, Params};
use crate::models::clip::{ClipConfig, HiddenAct};
use crate::models::t5::{FeedForwardProj, T5Config};
use crate::pipelines::sd3::plus::RegionKnobs;
use crate::pipelines::sd3::{Sd3Configs, Sd3Pipeline};
use crate::pipelines::sdxl::{SdxlConfigs, SdxlPipeline};
use crate::plan::{R2fPlan, RegionObject, RegionPlan};
use crate::r2f::PromptSchedule;
use crate::schedulers::discrete::DiscreteConfig;
use crate::schedulers::flow_match::FlowMatchConfig;

pub struct E2eOptions {
    pub model: BenchModel,
    pub device: Device,
    pub dtype: Kind,
    pub width: i64,
    pub height: i64,
    /// A model folder whose `tokenizer*/` folders tokenize the prompts (default: the bundled
    /// tiny fixtures, which carry the real CLIP vocabulary).
    pub tokenizers: Option<PathBuf>,
    /// Steps of the plain job (default: 28 for SD3, 30 for SDXL, as the reference table).
    pub plain_steps: Option<usize>,
    /// Steps of the R2F and R2F+ jobs (50, the official runs).
    pub r2f_steps: usize,
    /// Also run an R2F+ job with two objects (SD3 only).
    pub r2fplus: bool,
}

/// One measured job.
#[derive(Debug, Clone, Serialize)]
pub struct E2eJob {
    pub job: String,
    pub steps: usize,
    pub encode_s: f64,
    pub denoise_s: f64,
    pub guidance_s: f64,
    pub decode_s: f64,
    pub png_s: f64,
    pub total_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct E2eReport {
    pub model: String,
    pub device: String,
    pub dtype: String,
    pub width: i64,
    pub height: i64,
    /// Building every component with random weights (not a load from disk).
    pub build_s: f64,
    pub jobs: Vec<E2eJob>,
    /// Peak GPU memory of the process (NVML), when on CUDA.
    pub peak_gpu_bytes: Option<u64>,
}

impl fmt::Display for E2eReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} {}x{} on {} in {} (random weights, built in {:.1} s)",
            self.model, self.width, self.height, self.device, self.dtype, self.build_s
        )?;
        writeln!(
            f,
            "{:<8} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "job", "steps", "encode s", "denoise s", "guide s", "decode s", "png s", "total s"
        )?;
        for j in &self.jobs {
            writeln!(
                f,
                "{:<8} {:>5} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                j.job,
                j.steps,
                j.encode_s,
                j.denoise_s,
                j.guidance_s,
                j.decode_s,
                j.png_s,
                j.total_s
            )?;
        }
        match self.peak_gpu_bytes {
            Some(b) => write!(
                f,
                "peak GPU memory: {:.2} GiB",
                b as f64 / (1u64 << 30) as f64
            ),
            None => write!(f, "peak GPU memory: n/a"),
        }
    }
}

fn tiny_clip(hidden: i64, projection_dim: Option<i64>, hidden_act: HiddenAct) -> ClipConfig {
    ClipConfig {
        vocab_size: 49408,
        hidden_size: hidden,
        intermediate_size: 2 * hidden,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        max_position_embeddings: 77,
        hidden_act,
        layer_norm_eps: 1e-5,
        projection_dim,
        eos_token_id: 2,
    }
}

/// The SD3 smoke configuration: the `sd3-tiny` transformer and VAE with text encoders of
/// matching widths (CLIP 32 + 32 pooled into 64, T5 at the joint width 256).
pub fn sd3_tiny_configs() -> Sd3Configs {
    let p = sd3_tiny();
    let Denoiser::Sd3(transformer) = p.denoiser else {
        unreachable!("sd3_tiny is an SD3 preset")
    };
    Sd3Configs {
        clip_l: tiny_clip(32, Some(32), HiddenAct::QuickGelu),
        clip_g: tiny_clip(32, Some(32), HiddenAct::Gelu),
        t5: Some(T5Config {
            vocab_size: 32128,
            d_model: transformer.joint_attention_dim,
            d_kv: 32,
            d_ff: 512,
            num_layers: 2,
            num_heads: 4,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: FeedForwardProj::GatedGelu,
        }),
        transformer,
        vae: p.vae,
        scheduler: FlowMatchConfig::sd3(),
    }
}

/// The SDXL smoke configuration: the `sdxl-tiny` UNet and VAE with CLIP-L 32 and CLIP-G 32
/// (context 64) projected to the UNet's pooled width.
fn sdxl_tiny_configs() -> SdxlConfigs {
    let p = sdxl_tiny();
    let Denoiser::Sdxl(unet) = p.denoiser else {
        unreachable!("sdxl_tiny is an SDXL preset")
    };
    let pooled = unet.projection_class_embeddings_input_dim - 6 * unet.addition_time_embed_dim;
    SdxlConfigs {
        clip_l: tiny_clip(32, None, HiddenAct::QuickGelu),
        clip_g: tiny_clip(unet.cross_attention_dim - 32, Some(pooled), HiddenAct::Gelu),
        unet,
        vae: p.vae,
        scheduler: DiscreteConfig::sdxl(),
    }
}

/// The default tokenizer folder of a preset: a bundled fixture model.
fn default_tokenizers(sd3: bool) -> PathBuf {
    crate::bench::parity::default_fixtures().join(if sd3 { "sd3-tiny-a" } else { "sdxl-tiny-a" })
}

/// The R2F job's plan: three prompts (two frequent, one rare), levels 2 and 3.
fn r2f_plan() -> R2fPlan {
    R2fPlan {
        prompts: vec![
            "a furry animal warrior holding a sword".into(),
            "a furry frog warrior holding a sword".into(),
            "a furry frog warrior holding a glowing sword".into(),
        ],
        levels: vec![2, 3],
    }
}

/// The R2F+ job's plan: two objects side by side.
fn r2fplus_plan() -> RegionPlan {
    let object = |prompt: &str, object: &str, r2f: &str, bbox| RegionObject {
        prompt: prompt.into(),
        object: object.into(),
        r2f: vec![r2f.into()],
        visual_detail_levels: vec![3],
        bbox,
    };
    let mut objects = IndexMap::new();
    objects.insert(
        "#1".to_string(),
        object(
            "a photo of #1",
            "a hairy shark",
            "a hairy animal",
            [0.05, 0.3, 0.45, 0.8],
        ),
    );
    objects.insert(
        "#2".to_string(),
        object(
            "a photo of #2",
            "a spotted clam",
            "a spotted shell",
            [0.55, 0.4, 0.95, 0.8],
        ),
    );
    RegionPlan {
        original_prompt: "a hairy shark and a spotted clam on a beach".into(),
        base_prompt: "#1 and #2 on a beach".into(),
        objects,
    }
}

pub fn run(o: &E2eOptions) -> anyhow::Result<E2eReport> {
    let sd3 = matches!(o.model, BenchModel::Sd3 | BenchModel::Sd3Tiny);
    let tokenizers = o
        .tokenizers
        .clone()
        .unwrap_or_else(|| default_tokenizers(sd3));
    if !tokenizers.join("tokenizer").is_dir() {
        anyhow::bail!(
            "no tokenizer folders in {} (pass --tokenizers MODEL_DIR)",
            tokenizers.display()
        );
    }
    eprintln!(
        "building {} with random weights on {} in {}",
        o.model.name(),
        device_name(o.device),
        dtype_name(o.dtype)
    );
    let t0 = Instant::now();
    let mut engine = match o.model {
        BenchModel::Sd3 => Engine::Sd3(Box::new(Sd3Pipeline::random(
            &Sd3Configs::sd3_medium(),
            &tokenizers,
            o.device,
            o.dtype,
        )?)),
        BenchModel::Sd3Tiny => Engine::Sd3(Box::new(Sd3Pipeline::random(
            &sd3_tiny_configs(),
            &tokenizers,
            o.device,
            o.dtype,
        )?)),
        BenchModel::Sdxl => Engine::Sdxl(Box::new(SdxlPipeline::random(
            &SdxlConfigs::sdxl_base(),
            &tokenizers,
            o.device,
            o.dtype,
        )?)),
        BenchModel::SdxlTiny => Engine::Sdxl(Box::new(SdxlPipeline::random(
            &sdxl_tiny_configs(),
            &tokenizers,
            o.device,
            o.dtype,
        )?)),
    };
    synchronize(o.device);
    let build_s = t0.elapsed().as_secs_f64();
    let plain_steps = o.plain_steps.unwrap_or(if sd3 { 28 } else { 30 });
    let mut jobs: Vec<(&str, Mode, usize)> = vec![
        (JobMode::Plain.name(), Mode::Plain, plain_steps),
        (
            JobMode::R2f.name(),
            Mode::R2f {
                plan: r2f_plan(),
                schedule: PromptSchedule::Faithful,
                stop_steps: None,
            },
            o.r2f_steps,
        ),
    ];
    if o.r2fplus && sd3 {
        jobs.push((
            JobMode::R2fplus.name(),
            Mode::R2fPlus {
                plan: r2fplus_plan(),
                knobs: RegionKnobs {
                    // A non-square size still runs, on the real token grid.
                    schedule: if o.width == o.height {
                        PromptSchedule::Faithful
                    } else {
                        PromptSchedule::Clean
                    },
                    ..RegionKnobs::default()
                },
            },
            o.r2f_steps,
        ));
    }
    let params = |steps| Params {
        steps: Some(steps),
        guidance: None,
        seed: 0,
        width: Some(o.width),
        height: Some(o.height),
        negative_prompt: String::new(),
        t5_tokens: None,
        scheduler: None,
    };
    let prompt = "a furry frog warrior holding a glowing sword";
    // One short untimed job first: kernel selection and allocator warm-up.
    eprintln!("warm-up: a 2-step plain job");
    generate_image(
        &mut engine,
        &ModelIdentity::named("bench"),
        prompt,
        &Mode::Plain,
        &params(2),
        i64::MAX,
        Encoding::PNG,
        &mut |_, _| Ok(()),
    )?;
    let mut measured = Vec::new();
    for (name, mode, steps) in jobs {
        eprintln!("job {name}: {steps} steps");
        let out = generate_image(
            &mut engine,
            &ModelIdentity::named("bench"),
            prompt,
            &mode,
            &params(steps),
            i64::MAX,
            Encoding::PNG,
            &mut |_, _| Ok(()),
        )?;
        let t = &out.output.timings;
        let parts = t.encode + t.denoise + t.guidance + t.decode;
        measured.push(E2eJob {
            job: name.to_string(),
            steps,
            encode_s: t.encode.as_secs_f64(),
            denoise_s: t.denoise.as_secs_f64(),
            guidance_s: t.guidance.as_secs_f64(),
            decode_s: t.decode.as_secs_f64(),
            png_s: (out.seconds - parts.as_secs_f64()).max(0.0),
            total_s: out.seconds,
        });
    }
    Ok(E2eReport {
        model: o.model.name().to_string(),
        device: device_name(o.device),
        dtype: dtype_name(o.dtype).to_string(),
        width: o.width,
        height: o.height,
        build_s,
        jobs: measured,
        peak_gpu_bytes: if o.device.is_cuda() {
            crate::service::metrics::process_gpu_bytes()
        } else {
            None
        },
    })
}
