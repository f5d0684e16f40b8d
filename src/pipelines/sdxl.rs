//! The SDXL pipeline as diffusers' `StableDiffusionXLPipeline`: CLIP-L and CLIP-G penultimate
//! features concatenated, pooled CLIP-G text embeddings, zero negative embeddings when no
//! negative prompt is given (`force_zeros_for_empty_prompt`), six size/crop time ids,
//! classifier-free guidance [negative, positive], Euler discrete or DPM-Solver++ 2M Karras, VAE
//! decode in float32 when the model runs in fp16 (`force_upcast`: the SDXL VAE overflows in fp16).

use std::time::Instant;

use anyhow::Context;
use tch::{Device, Kind, Tensor};

use super::{
    apply_cfg_to_batch, initial_latents, to_u8_image, ComponentLoader, Conditioning, Output,
    Request, Stage, Timings,
};
use crate::device::synchronize;
use crate::models::clip::{ClipConfig, ClipTextModel};
use crate::models::hub::{Family, ModelFolder};
use crate::models::tokenizer::PromptTokenizer;
use crate::models::unet::{Unet, UnetConfig};
use crate::models::vae::{VaeConfig, VaeDecoder};
use crate::models::weights::{Vb, Weights};
use crate::schedulers::discrete::{DiscreteConfig, DiscreteSchedule, Sampler, Scheduler};

/// The component configurations of an SDXL model, for [`SdxlPipeline::random`].
#[derive(Debug, Clone)]
pub struct SdxlConfigs {
    pub clip_l: ClipConfig,
    pub clip_g: ClipConfig,
    pub unet: UnetConfig,
    pub vae: VaeConfig,
    pub scheduler: DiscreteConfig,
}

impl SdxlConfigs {
    /// stabilityai/stable-diffusion-xl-base-1.0.
    pub fn sdxl_base() -> Self {
        let mut clip_l = ClipConfig::clip_l();
        clip_l.projection_dim = None;
        Self {
            clip_l,
            clip_g: ClipConfig::clip_g(),
            unet: UnetConfig::sdxl_base(),
            vae: VaeConfig::sdxl(),
            scheduler: DiscreteConfig::sdxl(),
        }
    }
}

pub struct SdxlPipeline {
    tok_l: PromptTokenizer,
    tok_g: PromptTokenizer,
    clip_l: ClipTextModel,
    clip_g: ClipTextModel,
    pub unet: Unet,
    pub vae: VaeDecoder,
    scheduler_config: DiscreteConfig,
    device: Device,
    dtype: Kind,
    vae_dtype: Kind,
}

impl SdxlPipeline {
    pub fn load(model: &ModelFolder, device: Device, dtype: Kind) -> anyhow::Result<Self> {
        if model.family != Family::Sdxl {
            anyhow::bail!("{} is not an SDXL model folder", model.root.display());
        }
        let _g = tch::no_grad_guard();
        let start = Instant::now();
        let step = |what: &str| tracing::info!(component = what, "loading");
        step("tokenizers");
        let tok_l = PromptTokenizer::clip(&model.require("tokenizer")?)?;
        let tok_g = PromptTokenizer::clip(&model.require("tokenizer_2")?)?;
        let loader = ComponentLoader { model, device };
        let clip_l = loader.load(
            "text_encoder",
            "text_encoder (CLIP-L)",
            dtype,
            ClipConfig::load,
            |vb, cfg| ClipTextModel::new(vb, cfg, false),
        )?;
        let clip_g = loader.load(
            "text_encoder_2",
            "text_encoder_2 (CLIP-G)",
            dtype,
            ClipConfig::load,
            |vb, cfg| ClipTextModel::new(vb, cfg, true),
        )?;
        let unet = loader.load("unet", "unet", dtype, UnetConfig::load, Unet::new)?;
        step("vae");
        let dir = model.require("vae")?;
        let vae_cfg = VaeConfig::load(&dir)?;
        let vae_dtype = if dtype == Kind::Half && vae_cfg.force_upcast.unwrap_or(true) {
            Kind::Float
        } else {
            dtype
        };
        let vae = VaeDecoder::new(&model.weights(&dir, device, vae_dtype)?, &vae_cfg)
            .with_context(|| format!("loading {}", dir.display()))?;
        let scheduler_config = DiscreteConfig::load(&model.require("scheduler")?)?;
        tracing::info!(seconds = start.elapsed().as_secs_f64(), model = %model.root.display(), "SDXL model loaded");
        Ok(Self {
            tok_l,
            tok_g,
            clip_l,
            clip_g,
            unet,
            vae,
            scheduler_config,
            device,
            dtype,
            vae_dtype,
        })
    }

    /// An SDXL pipeline with random weights for every component (speed measurements), built
    /// in memory on `device`, with the tokenizers of the model folder `tokenizers`.
    pub fn random(
        cfg: &SdxlConfigs,
        tokenizers: &std::path::Path,
        device: Device,
        dtype: Kind,
    ) -> anyhow::Result<Self> {
        let _g = tch::no_grad_guard();
        // The VAE runs in float32 under fp16 (force_upcast), as the published config asks.
        let vae_dtype = if dtype == Kind::Half && cfg.vae.force_upcast.unwrap_or(true) {
            Kind::Float
        } else {
            dtype
        };
        let vb = |kind| Vb::new(Weights::random(device, kind));
        let built = |what: &str| tracing::info!(component = what, "built with random weights");
        let clip_l = ClipTextModel::new(&vb(dtype), &cfg.clip_l, false)?;
        built("text_encoder (CLIP-L)");
        let clip_g = ClipTextModel::new(&vb(dtype), &cfg.clip_g, true)?;
        built("text_encoder_2 (CLIP-G)");
        let unet = Unet::new(&vb(dtype), &cfg.unet)?;
        built("unet");
        let vae = VaeDecoder::new(&vb(vae_dtype), &cfg.vae)?;
        built("vae");
        Ok(Self {
            tok_l: PromptTokenizer::clip(&tokenizers.join("tokenizer"))?,
            tok_g: PromptTokenizer::clip(&tokenizers.join("tokenizer_2"))?,
            clip_l,
            clip_g,
            unet,
            vae,
            scheduler_config: cfg.scheduler.clone(),
            device,
            dtype,
            vae_dtype,
        })
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn dtype(&self) -> Kind {
        self.dtype
    }

    pub fn vae_scale_factor(&self) -> i64 {
        self.vae.config().scale_factor()
    }

    /// The folder's scheduler is Euler discrete (SDXL's published config) unless it asks for
    /// Karras sigmas.
    pub fn default_scheduler(&self) -> Scheduler {
        if self.scheduler_config.use_karras_sigmas {
            Scheduler::DpmSolverPp2mKarras
        } else {
            Scheduler::EulerDiscrete
        }
    }

    fn ids(&self, ids: &[i64]) -> Tensor {
        Tensor::from_slice(ids).unsqueeze(0).to_device(self.device)
    }

    /// `[1, 77, 768+1280]` penultimate features and `[1, 1280]` pooled CLIP-G embeddings.
    pub fn encode(&self, prompt: &str) -> anyhow::Result<Conditioning> {
        let _g = tch::no_grad_guard();
        let l = self.clip_l.forward(&self.ids(&self.tok_l.encode(prompt)?));
        let g = self.clip_g.forward(&self.ids(&self.tok_g.encode(prompt)?));
        Ok(Conditioning {
            context: Tensor::cat(&[&l.penultimate, &g.penultimate], -1),
            pooled: g.text_embeds.context("CLIP-G has no text projection")?,
        })
    }

    pub fn generate(
        &self,
        req: &Request,
        scheduler: Scheduler,
        on_step: &mut dyn FnMut(usize, usize) -> anyhow::Result<()>,
    ) -> anyhow::Result<Output> {
        let _g = tch::no_grad_guard();
        let steps = req.steps();
        let (lh, lw) = req.latent_size(self.vae_scale_factor())?;
        let mut timings = Timings::default();

        let t0 = Stage::encode();
        let cfg = req.guidance > 1.0;
        let positives = req
            .prompts
            .iter()
            .map(|p| self.encode(p))
            .collect::<anyhow::Result<Vec<_>>>()?;
        // No negative prompt: zeros, as diffusers' force_zeros_for_empty_prompt.
        let negative = if !cfg {
            None
        } else if req.negative_prompt.is_empty() {
            Some(Conditioning {
                context: positives[0].context.zeros_like(),
                pooled: positives[0].pooled.zeros_like(),
            })
        } else {
            Some(self.encode(&req.negative_prompt)?)
        };
        let conds: Vec<Conditioning> = positives
            .into_iter()
            .map(|c| c.with_negative(negative.as_ref()))
            .collect();
        let batch = if cfg { 2 } else { 1 };
        let (h, w) = (req.height as f32, req.width as f32);
        let time_ids = Tensor::from_slice(&[h, w, 0.0, 0.0, h, w])
            .unsqueeze(0)
            .repeat([batch, 1])
            .to_device(self.device)
            .to_kind(self.dtype);
        synchronize(self.device);
        timings.encode = t0.elapsed();

        let t0 = Stage::denoise();
        let noise_schedule = DiscreteSchedule::new(&self.scheduler_config, scheduler, steps)?;
        let timesteps = Tensor::from_slice(&noise_schedule.timesteps).to_device(self.device);
        let init_sigma = noise_schedule.init_noise_sigma as f64;
        let mut sampler = Sampler::new(noise_schedule);
        let mut latents = initial_latents(req.seed, &[1, self.unet.config().in_channels, lh, lw])
            .to_device(self.device)
            .to_kind(self.dtype)
            * init_sigma;
        for i in 0..steps {
            let cond = &conds[req.step_prompt[i]];
            let t = timesteps.narrow(0, i as i64, 1).expand([batch], false);
            let input = if cfg {
                Tensor::cat(&[&latents, &latents], 0)
            } else {
                latents.shallow_clone()
            };
            let input = sampler.scale_model_input(&input, i);
            let eps = self
                .unet
                .forward(&input, &t, &cond.context, &cond.pooled, &time_ids);
            let eps = if cfg {
                apply_cfg_to_batch(&eps, req.guidance)
            } else {
                eps
            };
            latents = sampler.step(&eps, i, &latents);
            on_step(i + 1, steps)?;
        }
        synchronize(self.device);
        timings.denoise = t0.elapsed();

        let t0 = Stage::decode();
        let decoded = self.vae.decode_latents(&latents.to_kind(self.vae_dtype));
        let image = to_u8_image(&decoded);
        timings.decode = t0.elapsed();
        Ok(Output {
            latents: latents.to_device(Device::Cpu).to_kind(Kind::Float),
            image,
            timings,
        })
    }
}
