//! One generation, from validated parameters to a PNG: the code path shared by `r2f generate`
//! and the worker.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::bail;
use tch::{Device, Kind};

use crate::device::{device_name, dtype_name};
use crate::image::{encode_image, ImageFormat};
use crate::models::hub::{Family, ModelFolder};
use crate::pipelines::sd3::plus::{RegionKnobs, RegionRequest};
use crate::pipelines::sd3::Sd3Pipeline;
use crate::pipelines::sdxl::SdxlPipeline;
use crate::pipelines::{Output, Request};
use crate::plan::{R2fPlan, RegionPlan};
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
            // R2F+ encodes T5 at 256 tokens, as the official pipeline and diffusers do.
            pipe.t5_tokens = p
                .t5_tokens
                .unwrap_or(crate::pipelines::sd3::DEFAULT_T5_TOKENS);
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
                // diffusers' SD3 pipeline encodes T5 at 256 tokens; the official R2F code at 77.
                let default_t5 = match mode {
                    Mode::R2f { .. } => crate::pipelines::sd3::R2F_T5_TOKENS,
                    _ => crate::pipelines::sd3::DEFAULT_T5_TOKENS,
                };
                pipe.t5_tokens = p.t5_tokens.unwrap_or(default_t5);
                pipe.generate(&req, on_step)
            }
            Engine::Sdxl(pipe) => {
                // Plain: the model folder's scheduler; R2F: DPM-Solver++ 2M Karras, as the
                // official R2F-SDXL runs.
                let scheduler = match p.scheduler {
                    Some(s) => s,
                    None => match mode {
                        Mode::R2f { .. } => Scheduler::DpmSolverPp2mKarras,
                        _ => pipe.default_scheduler(),
                    },
                };
                pipe.generate(&req, scheduler, on_step)
            }
        }
    }
}

/// What a finished generation hands back to its caller.
pub struct Generated {
    /// The encoded image (PNG unless another format was asked for), metadata included.
    pub bytes: Vec<u8>,
    pub output: Output,
    pub resolved: Resolved,
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

/// What an image says about itself (PNG text chunks, XMP in JPEG and WebP).
pub struct ImageMetadata<'a> {
    pub prompt: &'a str,
    pub negative_prompt: &'a str,
    pub seed: String,
    pub model: &'a str,
    pub mode: JobMode,
    /// The plan in its official JSON shape (empty for a plain run).
    pub plan: String,
    pub steps: String,
    pub guidance: String,
    pub dtype: String,
    pub device: String,
}

impl ImageMetadata<'_> {
    /// The fields as (key, text) pairs, in the order the image carries them.
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("prompt", self.prompt.to_string()),
            ("negative_prompt", self.negative_prompt.to_string()),
            ("seed", self.seed.clone()),
            ("model", self.model.to_string()),
            ("mode", self.mode.name().to_string()),
            ("plan", self.plan.clone()),
            ("steps", self.steps.clone()),
            ("guidance", self.guidance.clone()),
            ("dtype", self.dtype.clone()),
            ("device", self.device.clone()),
            ("software", format!("r2f {}", env!("CARGO_PKG_VERSION"))),
        ]
    }
}

/// Runs one generation and encodes it in `encoding` with its metadata (PNG text chunks, XMP).
#[allow(clippy::too_many_arguments)]
pub fn generate_image(
    engine: &mut Engine,
    model_name: &str,
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
    let text = ImageMetadata {
        prompt,
        negative_prompt: &p.negative_prompt,
        seed: resolved.seed.to_string(),
        model: model_name,
        mode: mode.job_mode(),
        plan: mode.plan_json().map(|p| p.to_string()).unwrap_or_default(),
        steps: resolved.steps.to_string(),
        guidance: resolved.guidance.to_string(),
        dtype: dtype_name(engine.dtype()).to_string(),
        device: device_name(engine.device()),
    }
    .fields();
    let bytes = encode_image(&output.image, &text, encoding.format, encoding.quality)?;
    Ok(Generated {
        bytes,
        output,
        resolved,
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
