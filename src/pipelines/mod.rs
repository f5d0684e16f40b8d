//! Pipelines: encode prompts once, denoise with a per-step choice of conditioning, decode.

pub mod sd3;
pub mod sdxl;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use tch::{Device, Kind, Tensor};

use crate::models::hub::ModelFolder;
use crate::models::weights::Vb;

/// What one generation asks for. `prompts` are the distinct prompts that condition the steps
/// (one for a plain run; the frequent-to-rare sequence for R2F) and `step_prompt[i]` is the index
/// of the prompt that conditions step `i`, so `step_prompt.len()` is the number of steps.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompts: Vec<String>,
    pub step_prompt: Vec<usize>,
    pub negative_prompt: String,
    pub guidance: f64,
    pub seed: i64,
    pub width: i64,
    pub height: i64,
}

impl Request {
    /// A plain run: one prompt for every step.
    pub fn plain(
        prompt: &str,
        steps: usize,
        guidance: f64,
        seed: i64,
        width: i64,
        height: i64,
    ) -> Self {
        Self {
            prompts: vec![prompt.to_string()],
            step_prompt: vec![0; steps],
            negative_prompt: String::new(),
            guidance,
            seed,
            width,
            height,
        }
    }

    pub fn steps(&self) -> usize {
        self.step_prompt.len()
    }

    /// Checks steps, the prompt schedule's indices and the size against the VAE factor `f`;
    /// returns the latent size `(h, w)`.
    pub fn latent_size(&self, f: i64) -> anyhow::Result<(i64, i64)> {
        if self.steps() == 0 {
            anyhow::bail!("at least one denoising step is needed");
        }
        if let Some(bad) = self.step_prompt.iter().find(|&&i| i >= self.prompts.len()) {
            anyhow::bail!(
                "prompt schedule names prompt {bad}, but only {} are given",
                self.prompts.len()
            );
        }
        if self.height % f != 0 || self.width % f != 0 {
            anyhow::bail!(
                "image size {}x{} is not a multiple of {f}",
                self.width,
                self.height
            );
        }
        Ok((self.height / f, self.width / f))
    }
}

/// One prompt's conditioning: the token sequence `[b, seq, dim]` and the pooled embedding
/// `[b, pooled_dim]`.
pub struct Conditioning {
    pub context: Tensor,
    pub pooled: Tensor,
}

impl Conditioning {
    /// The classifier-free-guidance batch `[negative, positive]` (or the positive alone).
    pub fn with_negative(self, negative: Option<&Conditioning>) -> Conditioning {
        match negative {
            Some(n) => Conditioning {
                context: Tensor::cat(&[&n.context, &self.context], 0),
                pooled: Tensor::cat(&[&n.pooled, &self.pooled], 0),
            },
            None => self,
        }
    }
}

/// Loads a model folder's components onto one device.
pub(crate) struct ComponentLoader<'a> {
    pub model: &'a ModelFolder,
    pub device: Device,
}

impl ComponentLoader<'_> {
    /// The component in folder `name` (logged as `what`): its weights opened in `dtype`, its
    /// config read with `config`, the model built with `build` (a failure there names the
    /// folder).
    pub fn load<C, T>(
        &self,
        name: &str,
        what: &str,
        dtype: Kind,
        config: impl FnOnce(&Path) -> anyhow::Result<C>,
        build: impl FnOnce(&Vb, &C) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        tracing::info!(component = what, "loading");
        let dir = self.model.require(name)?;
        let vb = self.model.weights(&dir, self.device, dtype)?;
        build(&vb, &config(&dir)?).with_context(|| format!("loading {}", dir.display()))
    }
}

/// Classifier-free guidance: `uncond + guidance * (cond - uncond)`.
pub fn apply_cfg(uncond: &Tensor, cond: &Tensor, guidance: f64) -> Tensor {
    uncond + (cond - uncond) * guidance
}

/// [`apply_cfg`] on the halves of a `[negative, positive]` batch output.
pub fn apply_cfg_to_batch(output: &Tensor, guidance: f64) -> Tensor {
    let halves = output.chunk(2, 0);
    apply_cfg(&halves[0], &halves[1], guidance)
}

#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub encode: Duration,
    /// Denoising, without the R2F+ bbox guidance.
    pub denoise: Duration,
    /// The R2F+ bbox guidance (forward and backward passes on the latent); zero otherwise.
    pub guidance: Duration,
    pub decode: Duration,
}

pub struct Output {
    /// Final latents before VAE decode, float32 on the CPU, `[1, C, H/f, W/f]`.
    pub latents: Tensor,
    /// The image as `[H, W, 3]` uint8 on the CPU.
    pub image: Tensor,
    pub timings: Timings,
}

/// Initial latents per the contract: libtorch's global generator seeded with `seed`, drawn on
/// the CPU in float32, so the same seed gives the same noise on any machine.
pub fn initial_latents(seed: i64, shape: &[i64]) -> Tensor {
    seeded_draws(seed, &[shape]).remove(0)
}

/// Consecutive draws of `shapes` from libtorch's global CPU generator after one
/// `manual_seed(seed)` (float32, CPU): the same stream as a `torch.Generator("cpu")` seeded with
/// `seed`. The seeding and the draws hold one process-wide lock, so that no other thread's use
/// of the global generator can interleave (two generations in one process, or tests).
pub fn seeded_draws(seed: i64, shapes: &[&[i64]]) -> Vec<Tensor> {
    static GLOBAL_GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _lock = GLOBAL_GENERATOR
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    tch::manual_seed(seed);
    shapes
        .iter()
        .map(|shape| Tensor::randn(*shape, (tch::Kind::Float, tch::Device::Cpu)))
        .collect()
}

/// A decoded `[1, 3, H, W]` image in [-1, 1] -> `[H, W, 3]` uint8, as diffusers'
/// postprocess does: `(x / 2 + 0.5).clamp(0, 1)`, then `round(x * 255)` in float32.
pub fn to_u8_image(decoded: &Tensor) -> Tensor {
    let x = decoded
        .to_device(tch::Device::Cpu)
        .to_kind(tch::Kind::Float);
    let x = (x * 0.5 + 0.5).clamp(0.0, 1.0);
    (x * 255.0)
        .round()
        .to_kind(tch::Kind::Uint8)
        .squeeze_dim(0)
        .permute([1, 2, 0])
        .contiguous()
}

/// One stage of a generation (encode, denoise, decode): timed, and a tracing span while it
/// runs (exported as a child of the job's span when traces are exported).
pub(crate) struct Stage {
    start: Instant,
    _span: tracing::span::EnteredSpan,
}

impl Stage {
    pub(crate) fn encode() -> Self {
        Self::of(tracing::info_span!("encode"))
    }

    pub(crate) fn denoise() -> Self {
        Self::of(tracing::info_span!("denoise"))
    }

    pub(crate) fn decode() -> Self {
        Self::of(tracing::info_span!("decode"))
    }

    fn of(span: tracing::Span) -> Self {
        Self {
            start: Instant::now(),
            _span: span.entered(),
        }
    }

    /// The stage's time; its span ends here.
    pub(crate) fn elapsed(self) -> Duration {
        self.start.elapsed()
    }
}
