//! The SD3 pipeline as diffusers' `StableDiffusion3Pipeline`: CLIP-L + CLIP-G penultimate
//! features concatenated and padded (or cropped) to the T5 width, T5 tokens appended, pooled
//! CLIP outputs concatenated; classifier-free guidance with the batch ordered [negative,
//! positive]; flow-matching Euler steps in float32; VAE decode with scaling and shift.
//!
//! Each distinct prompt of a request is encoded once; every step picks its conditioning from
//! those encodings, which is what R2F's alternating prompt schedule needs.

pub mod plus;

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
use crate::models::mmdit::{Mmdit, MmditConfig};
use crate::models::t5::{T5Config, T5Encoder};
use crate::models::tokenizer::PromptTokenizer;
use crate::models::vae::{VaeConfig, VaeDecoder};
use crate::models::weights::{Vb, Weights};
use crate::schedulers::flow_match::{FlowMatchConfig, FlowMatchSchedule};

/// diffusers' default `max_sequence_length` for SD3.
pub const DEFAULT_T5_TOKENS: usize = 256;
/// The T5 length of the official R2F SD3 pipeline (`tokenizer_max_length`).
pub const R2F_T5_TOKENS: usize = 77;

pub struct Sd3Pipeline {
    tok_l: PromptTokenizer,
    tok_g: PromptTokenizer,
    tok_t5: Option<PromptTokenizer>,
    clip_l: ClipTextModel,
    clip_g: ClipTextModel,
    t5: Option<T5Encoder>,
    pub transformer: Mmdit,
    pub vae: VaeDecoder,
    scheduler_config: FlowMatchConfig,
    device: Device,
    dtype: Kind,
    t5_dtype: Kind,
    /// T5 sequence length (256 in diffusers' pipeline, 77 in the official R2F code).
    pub t5_tokens: usize,
}

/// The component configurations of an SD3 model, for [`Sd3Pipeline::random`].
#[derive(Debug, Clone)]
pub struct Sd3Configs {
    pub clip_l: ClipConfig,
    pub clip_g: ClipConfig,
    pub t5: Option<T5Config>,
    pub transformer: MmditConfig,
    pub vae: VaeConfig,
    pub scheduler: FlowMatchConfig,
}

impl Sd3Configs {
    /// stabilityai/stable-diffusion-3-medium: CLIP-L, CLIP-G, T5-XXL, the 24-block MMDiT, the
    /// 16-channel VAE.
    pub fn sd3_medium() -> Self {
        Self {
            clip_l: ClipConfig::clip_l(),
            clip_g: ClipConfig::clip_g(),
            t5: Some(T5Config::t5_xxl()),
            transformer: MmditConfig::sd3_medium(),
            vae: VaeConfig::sd3(),
            scheduler: FlowMatchConfig::sd3(),
        }
    }
}

/// A prompt's token ids: CLIP-L and CLIP-G (77 each) and T5 (`t5_tokens`, when there is a T5).
pub struct TokenIds {
    pub clip_l: Vec<i64>,
    pub clip_g: Vec<i64>,
    pub t5: Option<Vec<i64>>,
}

/// The dtype T5 runs in: T5 overflows in fp16 (known), bf16 keeps its range.
fn t5_dtype_for(dtype: Kind) -> Kind {
    if dtype == Kind::Half {
        Kind::BFloat16
    } else {
        dtype
    }
}

impl Sd3Pipeline {
    pub fn load(model: &ModelFolder, device: Device, dtype: Kind) -> anyhow::Result<Self> {
        if model.family != Family::Sd3 {
            anyhow::bail!("{} is not an SD3 model folder", model.root.display());
        }
        let _guard = tch::no_grad_guard();
        let t5_dtype = t5_dtype_for(dtype);
        let start = Instant::now();

        tracing::info!(component = "tokenizers", "loading");
        let tok_l = PromptTokenizer::clip(&model.require("tokenizer")?)?;
        let tok_g = PromptTokenizer::clip(&model.require("tokenizer_2")?)?;
        let tok_t5 = match model.component("tokenizer_3") {
            Some(dir) => Some(PromptTokenizer::t5(&dir, DEFAULT_T5_TOKENS)?),
            None => None,
        };

        let loader = ComponentLoader { model, device };
        let clip = |vb: &Vb, cfg: &ClipConfig| ClipTextModel::new(vb, cfg, true);
        let clip_l = loader.load(
            "text_encoder",
            "text_encoder (CLIP-L)",
            dtype,
            ClipConfig::load,
            clip,
        )?;
        let clip_g = loader.load(
            "text_encoder_2",
            "text_encoder_2 (CLIP-G)",
            dtype,
            ClipConfig::load,
            clip,
        )?;
        let t5 = match model.component("text_encoder_3") {
            Some(_) => Some(loader.load(
                "text_encoder_3",
                "text_encoder_3 (T5)",
                t5_dtype,
                T5Config::load,
                T5Encoder::new,
            )?),
            None => {
                tracing::warn!("no text_encoder_3: T5 features are zeros, as diffusers does");
                None
            }
        };
        if t5.is_some() && tok_t5.is_none() {
            anyhow::bail!(
                "{}: text_encoder_3 without tokenizer_3",
                model.root.display()
            );
        }

        let transformer = loader.load(
            "transformer",
            "transformer",
            dtype,
            MmditConfig::load,
            Mmdit::new,
        )?;
        let vae = loader.load("vae", "vae", dtype, VaeConfig::load, VaeDecoder::new)?;
        let scheduler_config = FlowMatchConfig::load(&model.require("scheduler")?)?;
        tracing::info!(
            seconds = start.elapsed().as_secs_f64(),
            model = %model.root.display(),
            "SD3 model loaded"
        );
        Ok(Self {
            tok_l,
            tok_g,
            tok_t5,
            clip_l,
            clip_g,
            t5,
            transformer,
            vae,
            scheduler_config,
            device,
            dtype,
            t5_dtype,
            t5_tokens: DEFAULT_T5_TOKENS,
        })
    }

    /// An SD3 pipeline with random weights for every component (speed measurements: the
    /// values do not matter), built in memory on `device`, with the tokenizers of the model
    /// folder `tokenizers` (`tokenizer/`, `tokenizer_2/`, `tokenizer_3/`).
    pub fn random(
        cfg: &Sd3Configs,
        tokenizers: &std::path::Path,
        device: Device,
        dtype: Kind,
    ) -> anyhow::Result<Self> {
        let _guard = tch::no_grad_guard();
        let t5_dtype = t5_dtype_for(dtype);
        let vb = |kind| Vb::new(Weights::random(device, kind));
        let tok = |name: &str| PromptTokenizer::clip(&tokenizers.join(name));
        let tok_t5 = match &cfg.t5 {
            Some(_) => Some(PromptTokenizer::t5(
                &tokenizers.join("tokenizer_3"),
                DEFAULT_T5_TOKENS,
            )?),
            None => None,
        };
        let built = |what: &str| tracing::info!(component = what, "built with random weights");
        let clip_l = ClipTextModel::new(&vb(dtype), &cfg.clip_l, true)?;
        built("text_encoder (CLIP-L)");
        let clip_g = ClipTextModel::new(&vb(dtype), &cfg.clip_g, true)?;
        built("text_encoder_2 (CLIP-G)");
        let t5 = match &cfg.t5 {
            Some(c) => Some(T5Encoder::new(&vb(t5_dtype), c)?),
            None => None,
        };
        built("text_encoder_3 (T5)");
        let transformer = Mmdit::new(&vb(dtype), &cfg.transformer)?;
        built("transformer");
        let vae = VaeDecoder::new(&vb(dtype), &cfg.vae)?;
        built("vae");
        Ok(Self {
            tok_l: tok("tokenizer")?,
            tok_g: tok("tokenizer_2")?,
            tok_t5,
            clip_l,
            clip_g,
            t5,
            transformer,
            vae,
            scheduler_config: cfg.scheduler.clone(),
            device,
            dtype,
            t5_dtype,
            t5_tokens: DEFAULT_T5_TOKENS,
        })
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn dtype(&self) -> Kind {
        self.dtype
    }

    pub fn scheduler_config(&self) -> &FlowMatchConfig {
        &self.scheduler_config
    }

    /// Pixels per latent along each side.
    pub fn vae_scale_factor(&self) -> i64 {
        self.vae.config().scale_factor()
    }

    pub fn latent_channels(&self) -> i64 {
        self.transformer.config().in_channels
    }

    /// Token ids as the pipeline computes them.
    pub fn token_ids(&self, prompt: &str) -> anyhow::Result<TokenIds> {
        let t5 = match &self.tok_t5 {
            Some(t) => Some(t.with_length(self.t5_tokens)?.encode(prompt)?),
            None => None,
        };
        Ok(TokenIds {
            clip_l: self.tok_l.encode(prompt)?,
            clip_g: self.tok_g.encode(prompt)?,
            t5,
        })
    }

    fn ids_tensor(&self, ids: &[i64]) -> Tensor {
        Tensor::from_slice(ids).unsqueeze(0).to_device(self.device)
    }

    /// Encodes one prompt (diffusers' `encode_prompt` for one side of the CFG batch).
    pub fn encode(&self, prompt: &str) -> anyhow::Result<Conditioning> {
        let _guard = tch::no_grad_guard();
        let ids = self.token_ids(prompt)?;
        let l = self.clip_l.forward(&self.ids_tensor(&ids.clip_l));
        let g = self.clip_g.forward(&self.ids_tensor(&ids.clip_g));
        let joint = self.transformer.config().joint_attention_dim;
        let clip = Tensor::cat(&[&l.penultimate, &g.penultimate], -1);
        // F.pad to the T5 width; a negative amount crops, as in diffusers.
        let clip_width = clip.size()[2];
        let clip = clip.constant_pad_nd([0, joint - clip_width]);
        let t5 = match (&self.t5, ids.t5) {
            (Some(t5), Some(ids)) => t5.forward(&self.ids_tensor(&ids)).to_kind(self.dtype),
            // diffusers pads with zeros of the CLIP length (tokenizer_max_length) when T5 is absent.
            _ => Tensor::zeros(
                [1, self.tok_l.length() as i64, joint],
                (self.dtype, self.device),
            ),
        };
        let context = Tensor::cat(&[clip.to_kind(self.dtype), t5], 1);
        let pooled = Tensor::cat(
            &[
                l.text_embeds.context("CLIP-L has no text projection")?,
                g.text_embeds.context("CLIP-G has no text projection")?,
            ],
            -1,
        )
        .to_kind(self.dtype);
        Ok(Conditioning { context, pooled })
    }

    /// Runs a request. `on_step(i, n)` is called after each denoising step.
    pub fn generate(
        &self,
        req: &Request,
        on_step: &mut dyn FnMut(usize, usize) -> anyhow::Result<()>,
    ) -> anyhow::Result<Output> {
        let _guard = tch::no_grad_guard();
        let steps = req.steps();
        let (lh, lw) = req.latent_size(self.vae_scale_factor())?;
        self.transformer.check_latent_size(lh, lw)?;
        let mut timings = Timings::default();

        // Encode each distinct prompt once, plus the negative prompt.
        let t0 = Stage::encode();
        let cfg = req.guidance > 1.0;
        let negative = if cfg {
            Some(self.encode(&req.negative_prompt)?)
        } else {
            None
        };
        let conds = req
            .prompts
            .iter()
            .map(|p| Ok(self.encode(p)?.with_negative(negative.as_ref())))
            .collect::<anyhow::Result<Vec<_>>>()?;
        synchronize(self.device);
        timings.encode = t0.elapsed();

        let t0 = Stage::denoise();
        let noise_schedule = FlowMatchSchedule::new(&self.scheduler_config, steps);
        let channels = self.latent_channels();
        let mut latents = initial_latents(req.seed, &[1, channels, lh, lw])
            .to_device(self.device)
            .to_kind(self.dtype);
        let batch = if cfg { 2 } else { 1 };
        // Timesteps go to the device once, before the loop: no host round trip per step.
        let timesteps = Tensor::from_slice(&noise_schedule.timesteps).to_device(self.device);
        for i in 0..steps {
            let cond = &conds[req.step_prompt[i]];
            let t = timesteps.narrow(0, i as i64, 1).expand([batch], false);
            let input = if cfg {
                Tensor::cat(&[&latents, &latents], 0)
            } else {
                latents.shallow_clone()
            };
            let v = self
                .transformer
                .forward(&input, &t, &cond.context, &cond.pooled)?;
            let v = if cfg {
                apply_cfg_to_batch(&v, req.guidance)
            } else {
                v
            };
            latents = noise_schedule.step(i, &latents, &v);
            on_step(i + 1, steps)?;
        }
        synchronize(self.device);
        timings.denoise = t0.elapsed();

        let t0 = Stage::decode();
        let decoded = self.vae.decode_latents(&latents);
        let image = to_u8_image(&decoded);
        timings.decode = t0.elapsed();
        Ok(Output {
            latents: latents.to_device(Device::Cpu).to_kind(Kind::Float),
            image,
            timings,
        })
    }

    pub fn t5_dtype(&self) -> Kind {
        self.t5_dtype
    }
}
