//! One generation, from validated parameters to a PNG: the code path shared by `r2f generate`
//! and the worker.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::bail;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tch::{Device, Kind};

use crate::device::{device_name, dtype_name};
use crate::image::{encode_image, ImageFormat};
use crate::models::hub::{Family, ModelFolder};
use crate::pipelines::sd3::plus::{RegionKnobs, RegionRequest};
use crate::pipelines::sd3::Sd3Pipeline;
use crate::pipelines::sdxl::SdxlPipeline;
use crate::pipelines::{Output, Request};
use crate::plan::{R2fPlan, RegionPlan};
use crate::r2f::regions::RegionMask;
use crate::r2f::{step_prompts, PromptSchedule, StopStepMap};
use crate::schedulers::discrete::Scheduler;

crate::named_enum! {
    /// How a job's prompt conditions the steps, by name (jobs' `mode`, `--mode`).
    pub enum JobMode("mode") {
        R2f = "r2f",
        R2fplus = "r2fplus",
        Plain = "plain",
    }
}

/// How the prompt conditions the steps: a mode with what it needs to run (its name alone is a
/// [`JobMode`], as jobs and `--mode` spell it).
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// The base model with the prompt alone.
    Plain,
    /// The rare-to-frequent prompt schedule over the plan's prompts.
    R2f {
        plan: R2fPlan,
        schedule: PromptSchedule,
        /// None: the model family's map (SD3 [0,5,10,20,30,40], SDXL [0,3,5,10,20,30]).
        stop_steps: Option<StopStepMap>,
    },
    /// R2F+ (SD3 only): R2F per object region, with bbox attention guidance and latent fusion.
    R2fPlus {
        plan: RegionPlan,
        knobs: RegionKnobs,
    },
}

impl Mode {
    pub fn job_mode(&self) -> JobMode {
        match self {
            Mode::Plain => JobMode::Plain,
            Mode::R2f { .. } => JobMode::R2f,
            Mode::R2fPlus { .. } => JobMode::R2fplus,
        }
    }

    pub fn name(&self) -> &'static str {
        self.job_mode().name()
    }

    /// The plan in its official JSON shape (none for a plain run).
    pub fn plan_json(&self) -> Option<serde_json::Value> {
        match self {
            Mode::Plain => None,
            Mode::R2f { plan, .. } => Some(plan.to_official_json()),
            Mode::R2fPlus { plan, .. } => serde_json::to_value(plan).ok(),
        }
    }
}

/// The level -> stop-step map of a model family.
pub fn stop_step_map(family: Family) -> StopStepMap {
    match family {
        Family::Sd3 => StopStepMap::SD3,
        Family::Sdxl => StopStepMap::SDXL,
    }
}

/// The prompt schedule of a mode: the prompt list and the index of the prompt of each step.
pub fn prompt_schedule(
    mode: &Mode,
    prompt: &str,
    steps: usize,
    family: Family,
) -> (Vec<String>, Vec<usize>) {
    match mode {
        // R2F+ conditions each run per step (`r2f::plus`); its overall prompt is the base one.
        Mode::Plain | Mode::R2fPlus { .. } => (vec![prompt.to_string()], vec![0; steps]),
        Mode::R2f {
            plan,
            schedule,
            stop_steps,
        } => {
            let map = stop_steps.unwrap_or_else(|| stop_step_map(family));
            let order = step_prompts(plan.prompts.len(), &plan.levels, steps, &map, *schedule);
            (plan.prompts.clone(), order)
        }
    }
}

/// Generation parameters as a user gives them; `None` takes the model's default.
#[derive(Debug, Clone, Default)]
pub struct Params {
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub seed: i64,
    pub width: Option<i64>,
    pub height: Option<i64>,
    pub negative_prompt: String,
    pub t5_tokens: Option<usize>,
    /// SDXL scheduler; None: the model's default for the mode.
    pub scheduler: Option<Scheduler>,
}

/// Parameters with every default resolved and every bound checked.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub steps: usize,
    pub guidance: f64,
    pub seed: i64,
    pub width: i64,
    pub height: i64,
}

/// What a loaded model can draw: checked when a job is validated, so that a size the model
/// cannot draw is rejected before any work rather than failing on the GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelCaps {
    pub family: Family,
    /// Width and height when a job gives none.
    pub default_size: i64,
    /// The largest width or height (SD3: the positional table × patch × VAE factor).
    pub max_side: Option<i64>,
}

impl ModelCaps {
    /// Checks a job's size (with the model's defaults filled in) and mode against the model
    /// and the limits; the message names what is wrong.
    pub fn check_size(
        &self,
        width: Option<i64>,
        height: Option<i64>,
        max_pixels: i64,
    ) -> Result<(), String> {
        let (w, h) = (
            width.unwrap_or(self.default_size),
            height.unwrap_or(self.default_size),
        );
        if w.saturating_mul(h) > max_pixels {
            return Err(format!(
                "image of {w}x{h} = {} pixels is over the limit of {max_pixels} (max_pixels)",
                w.saturating_mul(h),
            ));
        }
        if let Some(max) = self.max_side {
            if w > max || h > max {
                return Err(format!(
                    "image of {w}x{h} is larger than this model draws (at most {max} pixels a side)"
                ));
            }
        }
        Ok(())
    }
}

/// A loaded model, ready to generate.
pub enum Engine {
    Sd3(Box<Sd3Pipeline>),
    Sdxl(Box<SdxlPipeline>),
}

impl Engine {
    pub fn load(model: &ModelFolder, device: Device, dtype: Kind) -> anyhow::Result<Self> {
        match model.family {
            Family::Sd3 => Ok(Engine::Sd3(Box::new(Sd3Pipeline::load(
                model, device, dtype,
            )?))),
            Family::Sdxl => Ok(Engine::Sdxl(Box::new(SdxlPipeline::load(
                model, device, dtype,
            )?))),
        }
    }

    pub fn caps(&self) -> ModelCaps {
        match self {
            Engine::Sd3(pipe) => {
                let cfg = pipe.transformer.config();
                let f = pipe.vae_scale_factor();
                ModelCaps {
                    family: Family::Sd3,
                    default_size: cfg.sample_size * f,
                    max_side: cfg.pos_embed_max_size.map(|m| m * cfg.patch_size * f),
                }
            }
            Engine::Sdxl(pipe) => ModelCaps {
                family: Family::Sdxl,
                default_size: pipe.unet.config().sample_size * pipe.vae_scale_factor(),
                max_side: None,
            },
        }
    }

    pub fn family(&self) -> Family {
        match self {
            Engine::Sd3(_) => Family::Sd3,
            Engine::Sdxl(_) => Family::Sdxl,
        }
    }

    pub fn device(&self) -> Device {
        match self {
            Engine::Sd3(p) => p.device(),
            Engine::Sdxl(p) => p.device(),
        }
    }

    pub fn dtype(&self) -> Kind {
        match self {
            Engine::Sd3(p) => p.dtype(),
            Engine::Sdxl(p) => p.dtype(),
        }
    }

    /// The model's defaults (diffusers' pipeline defaults) filled into `p`.
    /// Plain runs take diffusers' pipeline defaults; R2F runs the official R2F defaults.
    pub fn resolve(&self, mode: &Mode, p: &Params, max_pixels: i64) -> anyhow::Result<Resolved> {
        let (steps, guidance, size) = match self {
            Engine::Sd3(pipe) => (
                if matches!(mode, Mode::R2f { .. } | Mode::R2fPlus { .. }) {
                    50
                } else {
                    28
                },
                7.0,
                pipe.transformer.config().sample_size * pipe.vae_scale_factor(),
            ),
            // diffusers' SDXL defaults (50 steps, guidance 5.0), which the official R2F-SDXL
            // runs keep.
            Engine::Sdxl(pipe) => (
                50,
                5.0,
                pipe.unet.config().sample_size * pipe.vae_scale_factor(),
            ),
        };
        let r = Resolved {
            steps: p.steps.unwrap_or(steps),
            guidance: p.guidance.unwrap_or(guidance),
            seed: p.seed,
            width: p.width.unwrap_or(size),
            height: p.height.unwrap_or(size),
        };
        if r.width * r.height > max_pixels {
            bail!(
                "image of {}x{} = {} pixels is over the limit of {max_pixels} (max_pixels)",
                r.width,
                r.height,
                r.width * r.height,
            );
        }
        Ok(r)
    }

    /// The SDXL sampler a run of `mode` uses (None for SD3, which has one).
    pub fn scheduler_for(&self, mode: &Mode, p: &Params) -> Option<Scheduler> {
        match self {
            Engine::Sd3(_) => None,
            Engine::Sdxl(pipe) => Some(sdxl_scheduler(pipe, mode, p)),
        }
    }

    /// The T5 sequence length a run of `mode` encodes at (None for SDXL, which has no T5).
    pub fn t5_tokens_for(&self, mode: &Mode, p: &Params) -> Option<usize> {
        match self {
            Engine::Sd3(_) => Some(t5_tokens_of(mode, p)),
            Engine::Sdxl(_) => None,
        }
    }

    pub fn run(
        &mut self,
        prompt: &str,
        mode: &Mode,
        p: &Params,
        r: &Resolved,
        on_step: &mut dyn FnMut(usize, usize) -> anyhow::Result<()>,
    ) -> anyhow::Result<Output> {
        if let Mode::R2fPlus { plan, knobs } = mode {
            let Engine::Sd3(pipe) = self else {
                bail!(
                    "R2F+ runs on SD3 models only (this model is {:?})",
                    self.family()
                );
            };
            pipe.t5_tokens = t5_tokens_of(mode, p);
            let req = RegionRequest {
                plan: plan.clone(),
                negative_prompt: p.negative_prompt.clone(),
                guidance: r.guidance,
                seed: r.seed,
                width: r.width,
                height: r.height,
                steps: r.steps,
                knobs: knobs.clone(),
            };
            return Ok(pipe.generate_regions(&req, on_step)?.output);
        }
        let (prompts, step_prompt) = prompt_schedule(mode, prompt, r.steps, self.family());
        let req = Request {
            prompts,
            step_prompt,
            negative_prompt: p.negative_prompt.clone(),
            guidance: r.guidance,
            seed: r.seed,
            width: r.width,
            height: r.height,
        };
        match self {
            Engine::Sd3(pipe) => {
                pipe.t5_tokens = t5_tokens_of(mode, p);
                pipe.generate(&req, on_step)
            }
            Engine::Sdxl(pipe) => {
                let scheduler = sdxl_scheduler(pipe, mode, p);
                pipe.generate(&req, scheduler, on_step)
            }
        }
    }
}

/// SD3's T5 sequence length: the job's, else diffusers' 256 (plain, and R2F+ as the official
/// R2F+ pipeline does), or the official R2F code's 77 in R2F mode.
fn t5_tokens_of(mode: &Mode, p: &Params) -> usize {
    p.t5_tokens.unwrap_or(match mode {
        Mode::R2f { .. } => crate::pipelines::sd3::R2F_T5_TOKENS,
        _ => crate::pipelines::sd3::DEFAULT_T5_TOKENS,
    })
}

/// SDXL's sampler: the job's, else in plain mode the model folder's scheduler and in R2F mode
/// DPM-Solver++ 2M Karras, as the official R2F-SDXL runs.
fn sdxl_scheduler(pipe: &SdxlPipeline, mode: &Mode, p: &Params) -> Scheduler {
    match p.scheduler {
        Some(s) => s,
        None => match mode {
            Mode::R2f { .. } => Scheduler::DpmSolverPp2mKarras,
            _ => pipe.default_scheduler(),
        },
    }
}

/// What a finished generation hands back to its caller.
pub struct Generated {
    /// The encoded image (PNG unless another format was asked for), metadata included.
    pub bytes: Vec<u8>,
    pub output: Output,
    pub resolved: Resolved,
    /// What the image's metadata says (also the job's `result.json`).
    pub record: GenerationRecord,
    pub seconds: f64,
}

/// The file format of an output and the quality of the lossy ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoding {
    pub format: ImageFormat,
    pub quality: u8,
}

impl Encoding {
    /// PNG, the default (lossless; `quality` unused).
    pub const PNG: Encoding = Encoding {
        format: ImageFormat::Png,
        quality: 0,
    };
}

/// Where the weights of a loaded model came from, for the metadata record.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelIdentity {
    /// The model as the job or the command named it (a logical name, a folder, a Hub id).
    pub name: String,
    /// The Hub commit of the snapshot, when the model came from a Hugging Face cache.
    pub revision: Option<String>,
    /// [`ModelFolder::weights_fingerprint`] (none for weights built in memory).
    pub weights_hash: Option<String>,
}

impl ModelIdentity {
    /// The identity of a model folder under `name`; a folder that cannot be fingerprinted
    /// (a file unreadable after loading) has no hash rather than no model.
    pub fn of_folder(name: &str, folder: &ModelFolder) -> Self {
        let weights_hash = match folder.weights_fingerprint() {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!(error = %e, "no weights fingerprint for the metadata record");
                None
            }
        };
        Self {
            name: name.to_string(),
            revision: folder.revision(),
            weights_hash,
        }
    }

    /// A model known by name only (weights built in memory).
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_string(),
            ..Self::default()
        }
    }
}

/// The sampler every SD3 run uses (diffusers' `FlowMatchEulerDiscreteScheduler`).
pub const SD3_SCHEDULER: &str = "flow-match-euler";

/// The R2F+ knobs of a run, named as the job parameters that set them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RegionRecord {
    pub region_mask: RegionMask,
    pub bbox_guidance_steps: usize,
    pub bbox_guidance_iterations: usize,
    pub bbox_loss_scale: f64,
    pub latent_fusion_steps: usize,
    pub bbox_guidance_recompute: bool,
}

impl RegionRecord {
    /// The record of a run's knobs.
    pub fn of(k: &RegionKnobs) -> Self {
        Self {
            region_mask: k.mask,
            bbox_guidance_steps: k.guidance_steps,
            bbox_guidance_iterations: k.guidance_iterations,
            bbox_loss_scale: k.loss_scale,
            latent_fusion_steps: k.fusion_steps,
            bbox_guidance_recompute: k.recompute_blocks,
        }
    }
}

/// Everything that determines an image, as the image and the job's `result.json` carry it:
/// with the same weights, device and dtype, its fields make the same image again
/// (`r2f generate --from IMAGE` turns them back into a job).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct GenerationRecord {
    pub prompt: String,
    pub negative_prompt: String,
    /// The seed of this image's initial noise (a job's image `i` has the job's seed + `i`).
    pub seed: i64,
    pub steps: usize,
    pub guidance: f64,
    pub width: i64,
    pub height: i64,
    /// The model as the job or the command named it.
    pub model: String,
    /// `sd3` or `sdxl`.
    pub model_family: String,
    /// The Hub commit of the weights, when they came from a Hugging Face cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_revision: Option<String>,
    /// A 12-hex-digit fingerprint of the model folder's weights and configs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_hash: Option<String>,
    pub mode: JobMode,
    /// The plan in its official JSON shape (R2F, R2F+).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<Value>,
    /// The sampler: `flow-match-euler` (SD3), `euler` or `dpm++2m-karras` (SDXL).
    pub scheduler: String,
    /// How R2F picks each step's prompt (R2F, R2F+).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<PromptSchedule>,
    /// The level -> stop-step map (R2F, R2F+), at 50 steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_steps: Option<Vec<usize>>,
    /// R2F: the index in the plan's prompts of each step's prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_schedule: Option<Vec<usize>>,
    /// R2F+: the knobs of the region runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r2fplus: Option<RegionRecord>,
    /// SD3: the T5 sequence length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub t5_tokens: Option<usize>,
    /// `fp32`, `fp16` or `bf16`.
    pub dtype: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// The quality the image was encoded at (JPEG, WebP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<u8>,
    /// The version of r2f that made the image.
    pub r2f_version: String,
}

/// The record's fields an image carries as text verbatim; every other field is JSON text.
const RECORD_TEXT_FIELDS: &[&str] = &[
    "prompt",
    "negative_prompt",
    "model",
    "model_family",
    "model_revision",
    "weights_hash",
    "mode",
    "scheduler",
    "schedule",
    "dtype",
    "device",
    "r2f_version",
];

impl GenerationRecord {
    /// The record as (key, text) pairs, in the order the image carries them (PNG text chunks,
    /// XMP `r2f:` elements): strings verbatim, numbers, lists and objects as JSON.
    pub fn fields(&self) -> Vec<(String, String)> {
        let Ok(Value::Object(map)) = serde_json::to_value(self) else {
            unreachable!("a record serializes to a JSON object")
        };
        map.into_iter()
            .map(|(k, v)| {
                let text = match v {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                (k, text)
            })
            .collect()
    }

    /// Reads a record back from an image's fields (what [`GenerationRecord::fields`] wrote);
    /// fields it does not know are ignored, a missing or malformed one is named.
    pub fn from_fields(fields: &[(String, String)]) -> anyhow::Result<Self> {
        let mut map = serde_json::Map::new();
        for (key, text) in fields {
            let value = if RECORD_TEXT_FIELDS.contains(&key.as_str()) {
                Value::String(text.clone())
            } else if text.is_empty() {
                continue;
            } else {
                serde_json::from_str(text).map_err(|e| {
                    anyhow::anyhow!("metadata field `{key}` is not valid JSON ({e}): {text:?}")
                })?
            };
            map.insert(key.clone(), value);
        }
        serde_json::from_value(Value::Object(map))
            .map_err(|e| anyhow::anyhow!("the image's r2f metadata is incomplete: {e}"))
    }

    /// The SDXL sampler the record names (None for SD3's, which is the only one it has).
    pub fn scheduler(&self) -> anyhow::Result<Option<Scheduler>> {
        match self.scheduler.as_str() {
            SD3_SCHEDULER => Ok(None),
            name => Ok(Some(Scheduler::parse(name).map_err(anyhow::Error::msg)?)),
        }
    }
}

/// The record of one generation: everything [`Engine::run`] resolved.
#[allow(clippy::too_many_arguments)]
pub fn generation_record(
    engine: &Engine,
    model: &ModelIdentity,
    prompt: &str,
    mode: &Mode,
    p: &Params,
    r: &Resolved,
    encoding: Encoding,
) -> GenerationRecord {
    let family = engine.family();
    let (schedule, stop_steps, prompt_order, r2fplus) = match mode {
        Mode::Plain => (None, None, None, None),
        Mode::R2f {
            schedule,
            stop_steps,
            ..
        } => {
            let map = stop_steps.unwrap_or_else(|| stop_step_map(family));
            let (_, order) = prompt_schedule(mode, prompt, r.steps, family);
            (Some(*schedule), Some(map.0.to_vec()), Some(order), None)
        }
        Mode::R2fPlus { knobs, .. } => (
            Some(knobs.schedule),
            Some(knobs.stop_steps.0.to_vec()),
            None,
            Some(RegionRecord::of(knobs)),
        ),
    };
    GenerationRecord {
        prompt: prompt.to_string(),
        negative_prompt: p.negative_prompt.clone(),
        seed: r.seed,
        steps: r.steps,
        guidance: r.guidance,
        width: r.width,
        height: r.height,
        model: model.name.clone(),
        model_family: family.name().to_string(),
        model_revision: model.revision.clone(),
        weights_hash: model.weights_hash.clone(),
        mode: mode.job_mode(),
        plan: mode.plan_json(),
        scheduler: match engine.scheduler_for(mode, p) {
            Some(s) => s.name().to_string(),
            None => SD3_SCHEDULER.to_string(),
        },
        schedule,
        stop_steps,
        prompt_schedule: prompt_order,
        r2fplus,
        t5_tokens: engine.t5_tokens_for(mode, p),
        dtype: dtype_name(engine.dtype()).to_string(),
        device: device_name(engine.device()),
        quality: (encoding.format != ImageFormat::Png).then_some(encoding.quality),
        r2f_version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

/// Runs one generation and encodes it in `encoding` with its metadata record (PNG text chunks,
/// XMP).
#[allow(clippy::too_many_arguments)]
pub fn generate_image(
    engine: &mut Engine,
    model: &ModelIdentity,
    prompt: &str,
    mode: &Mode,
    p: &Params,
    max_pixels: i64,
    encoding: Encoding,
    on_step: &mut dyn FnMut(usize, usize) -> anyhow::Result<()>,
) -> anyhow::Result<Generated> {
    let resolved = engine.resolve(mode, p, max_pixels)?;
    let start = Instant::now();
    let output = engine.run(prompt, mode, p, &resolved, on_step)?;
    let record = generation_record(engine, model, prompt, mode, p, &resolved, encoding);
    let bytes = encode_image(
        &output.image,
        &record.fields(),
        encoding.format,
        encoding.quality,
    )?;
    Ok(Generated {
        bytes,
        output,
        resolved,
        record,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Where `--latents-out` goes.
pub fn write_latents(path: &PathBuf, latents: &tch::Tensor) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    tch::Tensor::write_safetensors(&[("latents", latents)], path)?;
    Ok(())
}
