//! Speed benchmarks: the SD3 or SDXL denoiser and VAE at full size with random weights (speed
//! does not depend on the values, so no download is needed), the configurations `r2f bench`
//! measures, and the reports of `r2f bench` and `r2f bench-service`.

pub mod e2e;
pub mod gateway;
pub mod model;
pub mod parity;
pub mod rarebench;
pub mod service;

use std::fmt;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use crate::bench::service::ServiceReport;
use crate::device::{device_name, dtype_name, synchronize};
use crate::models::mmdit::{Mmdit, MmditConfig};
use crate::models::unet::{Unet, UnetConfig};
use crate::models::vae::{VaeConfig, VaeDecoder};
use crate::models::weights::{Vb, Weights};
use crate::pipelines::apply_cfg_to_batch;
use crate::schedulers::flow_match::{FlowMatchConfig, FlowMatchSchedule};

/// The denoiser to measure.
pub enum Denoiser {
    Sd3(MmditConfig),
    Sdxl(UnetConfig),
}

/// A configuration to measure: its name (as `r2f bench --model` spells it), denoiser and VAE.
pub struct Preset {
    pub name: &'static str,
    pub denoiser: Denoiser,
    pub vae: VaeConfig,
}

/// SD3-medium at full size.
pub fn sd3_medium() -> Preset {
    Preset {
        name: "sd3",
        denoiser: Denoiser::Sd3(MmditConfig::sd3_medium()),
        vae: VaeConfig::sd3(),
    }
}

/// SDXL base at full size.
pub fn sdxl_base() -> Preset {
    Preset {
        name: "sdxl",
        denoiser: Denoiser::Sdxl(UnetConfig::sdxl_base()),
        vae: VaeConfig::sdxl(),
    }
}

/// A small VAE for the smoke-run presets.
fn tiny_vae(mut v: VaeConfig) -> VaeConfig {
    v.block_out_channels = vec![32, 32, 64, 64];
    v.layers_per_block = 1;
    v
}

/// A two-layer SD3 transformer and a small VAE, for a smoke run.
pub fn sd3_tiny() -> Preset {
    let mut t = MmditConfig::sd3_medium();
    t.num_layers = 2;
    t.num_attention_heads = 2;
    t.caption_projection_dim = 128;
    t.joint_attention_dim = 256;
    t.pooled_projection_dim = 64;
    Preset {
        name: "sd3-tiny",
        denoiser: Denoiser::Sd3(t),
        vae: tiny_vae(VaeConfig::sd3()),
    }
}

/// A narrow SDXL UNet and a small VAE, for a smoke run.
pub fn sdxl_tiny() -> Preset {
    let mut u = UnetConfig::sdxl_base();
    u.block_out_channels = vec![32, 64, 64];
    u.heads = vec![2, 4, 4];
    u.transformer_layers = vec![1, 1, 1];
    u.cross_attention_dim = 64;
    u.projection_class_embeddings_input_dim = 6 * 256 + 64;
    Preset {
        name: "sdxl-tiny",
        denoiser: Denoiser::Sdxl(u),
        vae: tiny_vae(VaeConfig::sdxl()),
    }
}

/// The presets as `r2f bench --model` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchModel {
    /// SD3-medium.
    Sd3,
    /// SDXL base.
    Sdxl,
    #[value(name = "sd3-tiny")]
    Sd3Tiny,
    #[value(name = "sdxl-tiny")]
    SdxlTiny,
}

impl BenchModel {
    /// The name `--model` spells.
    pub fn name(self) -> &'static str {
        match self {
            BenchModel::Sd3 => "sd3",
            BenchModel::Sdxl => "sdxl",
            BenchModel::Sd3Tiny => "sd3-tiny",
            BenchModel::SdxlTiny => "sdxl-tiny",
        }
    }

    pub fn preset(self) -> Preset {
        match self {
            BenchModel::Sd3 => sd3_medium(),
            BenchModel::Sdxl => sdxl_base(),
            BenchModel::Sd3Tiny => sd3_tiny(),
            BenchModel::SdxlTiny => sdxl_tiny(),
        }
    }
}

pub struct BenchOptions {
    pub device: Device,
    pub dtype: Kind,
    pub width: i64,
    pub height: i64,
    pub steps: usize,
    pub warmup: usize,
    pub context_tokens: i64,
    pub preset: Preset,
    /// A diffusers-layout model folder whose denoiser (`transformer/` for SD3 presets, `unet/`
    /// for SDXL ones: config and weights) replaces the preset's random one: the same weights
    /// another implementation loads, for a side-by-side measurement.
    pub weights: Option<std::path::PathBuf>,
}

/// What `r2f bench` prints, one `key=value` group a line.
#[derive(Debug)]
pub struct BenchReport {
    pub model: &'static str,
    pub width: i64,
    pub height: i64,
    pub device: Device,
    pub dtype: Kind,
    pub steps: usize,
    pub ms_per_step: f64,
    pub denoise_ms: f64,
    pub vae_decode_ms: f64,
    pub peak_gpu_bytes: Option<u64>,
    /// The SDPA kernel libtorch picks for the denoiser's largest attention at these shapes.
    pub attention: AttentionChoice,
}

/// Which scaled-dot-product-attention kernel libtorch picks (`at::_fused_sdp_choice`) for an
/// attention of `shape` ([batch, heads, tokens, head dim]) in the bench's dtype and device: what
/// to compare with the kernel PyTorch picks for diffusers on the same machine
/// (scripts/diffusers_anchor.py).
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionChoice {
    pub shape: [i64; 4],
    /// PyTorch's `SDPBackend` names: MATH, FLASH_ATTENTION, EFFICIENT_ATTENTION,
    /// CUDNN_ATTENTION, OVERRIDEABLE (ERROR when none applies).
    pub backend: &'static str,
    /// cuDNN's version (9.19.0 as 91900) where libtorch has cuDNN.
    pub cudnn_version: Option<i64>,
}

impl AttentionChoice {
    /// The choice for the largest attention of `o`'s denoiser: SD3's joint attention over the
    /// image patches and the context; SDXL's self-attention at the first level with
    /// transformers (a quarter of the latent side).
    pub fn of(o: &BenchOptions) -> Self {
        let shape = match &o.preset.denoiser {
            Denoiser::Sd3(c) => {
                let side = |px: i64| px / 8 / c.patch_size;
                let tokens = side(o.height) * side(o.width) + o.context_tokens;
                [2, c.num_attention_heads, tokens, c.attention_head_dim]
            }
            Denoiser::Sdxl(u) => {
                let (heads, channels) = (u.heads[1], u.block_out_channels[1]);
                [2, heads, (o.height / 16) * (o.width / 16), channels / heads]
            }
        };
        let q = Tensor::zeros(shape, (o.dtype, o.device));
        let choice =
            Tensor::internal_fused_sdp_choice(&q, &q, &q, None::<Tensor>, 0.0, false, None, false);
        let backend = match choice {
            0 => "MATH",
            1 => "FLASH_ATTENTION",
            2 => "EFFICIENT_ATTENTION",
            3 => "CUDNN_ATTENTION",
            4 => "OVERRIDEABLE",
            _ => "ERROR",
        };
        let cudnn_version = tch::Cuda::cudnn_is_available().then(tch::utils::version_cudnn);
        Self {
            shape,
            backend,
            cudnn_version,
        }
    }
}

impl BenchReport {
    /// The report as JSON (`r2f bench --json`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "model": self.model,
            "width": self.width,
            "height": self.height,
            "device": device_name(self.device),
            "dtype": dtype_name(self.dtype),
            "steps": self.steps,
            "ms_per_step": self.ms_per_step,
            "denoise_ms": self.denoise_ms,
            "vae_decode_ms": self.vae_decode_ms,
            "peak_gpu_bytes": self.peak_gpu_bytes,
            "attention": {
                "shape": self.attention.shape,
                "sdp_backend": self.attention.backend,
                "cudnn_version": self.attention.cudnn_version,
            },
        })
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "model={} size={}x{} dtype={} device={} steps={}",
            self.model,
            self.width,
            self.height,
            dtype_name(self.dtype),
            device_name(self.device),
            self.steps
        )?;
        writeln!(f, "ms_per_step={:.2}", self.ms_per_step)?;
        writeln!(f, "denoise_ms={:.1}", self.denoise_ms)?;
        writeln!(f, "vae_decode_ms={:.1}", self.vae_decode_ms)?;
        writeln!(
            f,
            "sdp_backend={} shape={:?}",
            self.attention.backend, self.attention.shape
        )?;
        match self.peak_gpu_bytes {
            Some(b) => write!(f, "gpu_memory_mib={}", b >> 20),
            None => write!(f, "gpu_memory_mib=n/a"),
        }
    }
}

/// What `r2f bench-service` prints, one `key=value` group a line.
impl fmt::Display for ServiceReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "jobs={} succeeded={} wall_s={:.2}",
            self.jobs,
            self.succeeded,
            self.wall.as_secs_f64()
        )?;
        writeln!(f, "jobs_per_second={:.2}", self.jobs_per_second)?;
        writeln!(f, "model_ms_per_job={:.1}", self.model_ms)?;
        writeln!(
            f,
            "worker_overhead_ms_per_job={:.1}",
            self.worker_overhead_ms
        )?;
        write!(
            f,
            "saturated_overhead_ms_per_job={:.1}",
            self.saturated_overhead_ms
        )
    }
}

/// The denoiser built with random weights, and random conditioning of its shapes (CFG batch 2).
struct RandomDenoiser {
    mmdit: Option<Mmdit>,
    unet: Option<Unet>,
    channels: i64,
    context: Tensor,
    pooled: Tensor,
}

fn build(o: &BenchOptions, vb: &Vb) -> anyhow::Result<RandomDenoiser> {
    let opts = (o.dtype, o.device);
    Ok(match &o.preset.denoiser {
        Denoiser::Sd3(cfg) => {
            eprintln!(
                "building the SD3 transformer ({} layers, dim {}) with random weights on {} in {}",
                cfg.num_layers,
                cfg.inner_dim(),
                device_name(o.device),
                dtype_name(o.dtype)
            );
            let context = Tensor::randn([2, o.context_tokens, cfg.joint_attention_dim], opts);
            let pooled = Tensor::randn([2, cfg.pooled_projection_dim], opts);
            RandomDenoiser {
                mmdit: Some(Mmdit::new(vb, cfg)?),
                unet: None,
                channels: cfg.in_channels,
                context,
                pooled,
            }
        }
        Denoiser::Sdxl(cfg) => {
            eprintln!(
                "building the SDXL UNet (channels {:?}) with random weights on {} in {}",
                cfg.block_out_channels,
                device_name(o.device),
                dtype_name(o.dtype)
            );
            let context = Tensor::randn([2, 77, cfg.cross_attention_dim], opts);
            let pooled_dim =
                cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim;
            let pooled = Tensor::randn([2, pooled_dim], opts);
            RandomDenoiser {
                mmdit: None,
                unet: Some(Unet::new(vb, cfg)?),
                channels: cfg.in_channels,
                context,
                pooled,
            }
        }
    })
}

/// The denoiser's weights: random, or (`weights`) the folder's `transformer/` or `unet/` with
/// the configuration it holds, which then replaces the preset's.
fn denoiser_weights(o: &BenchOptions) -> anyhow::Result<(Vb, Option<Denoiser>)> {
    let Some(dir) = &o.weights else {
        return Ok((Vb::new(Weights::random(o.device, o.dtype)), None));
    };
    let (name, what) = match &o.preset.denoiser {
        Denoiser::Sd3(_) => ("transformer", "SD3 transformer"),
        Denoiser::Sdxl(_) => ("unet", "SDXL UNet"),
    };
    let dir = dir.join(name);
    eprintln!("loading the {what} from {}", dir.display());
    let denoiser = match &o.preset.denoiser {
        Denoiser::Sd3(_) => Denoiser::Sd3(MmditConfig::load(&dir)?),
        Denoiser::Sdxl(_) => Denoiser::Sdxl(UnetConfig::load(&dir)?),
    };
    Ok((Vb::from_dir(&dir, o.device, o.dtype)?, Some(denoiser)))
}

pub fn run(o: &BenchOptions) -> anyhow::Result<BenchReport> {
    if o.width % 16 != 0 || o.height % 16 != 0 || o.width <= 0 || o.height <= 0 {
        anyhow::bail!("width and height must be positive multiples of 16");
    }
    if o.steps == 0 {
        anyhow::bail!("steps must be at least 1");
    }
    let _guard = tch::no_grad_guard();
    tch::manual_seed(0);
    let (vb, denoiser) = denoiser_weights(o)?;
    let loaded;
    let o = match denoiser {
        Some(denoiser) => {
            loaded = BenchOptions {
                preset: Preset {
                    name: o.preset.name,
                    denoiser,
                    vae: o.preset.vae.clone(),
                },
                weights: o.weights.clone(),
                ..*o
            };
            &loaded
        }
        None => o,
    };
    // SDXL's VAE runs in float32 when the model is fp16 (force_upcast), as diffusers does.
    let vae_dtype = match (&o.preset.denoiser, o.dtype) {
        (Denoiser::Sdxl(_), Kind::Half) => Kind::Float,
        _ => o.dtype,
    };
    let vae_cfg = &o.preset.vae;
    let vae = VaeDecoder::new(&Vb::new(Weights::random(o.device, vae_dtype)), vae_cfg)?;
    let f = vae_cfg.scale_factor();
    let (lh, lw) = (o.height / f, o.width / f);
    let noise_schedule = FlowMatchSchedule::new(&FlowMatchConfig::sd3(), o.steps.max(1));
    let timesteps = Tensor::from_slice(&noise_schedule.timesteps).to_device(o.device);
    let d = build(o, &vb)?;
    let (h, w) = (o.height as f32, o.width as f32);
    let time_ids = Tensor::from_slice(&[h, w, 0.0, 0.0, h, w])
        .unsqueeze(0)
        .repeat([2, 1])
        .to_device(o.device)
        .to_kind(o.dtype);
    let latents = Tensor::randn([1, d.channels, lh, lw], (o.dtype, o.device));

    // One CFG step (guidance 7) and a flow-matching Euler update, whatever the denoiser.
    let step = |latents: &Tensor, i: usize| -> anyhow::Result<Tensor> {
        let t = timesteps.narrow(0, i as i64, 1).expand([2], false);
        let input = Tensor::cat(&[latents, latents], 0);
        let v = match (&d.mmdit, &d.unet) {
            (Some(m), _) => m.forward(&input, &t, &d.context, &d.pooled)?,
            (_, Some(u)) => u.forward(&input, &t, &d.context, &d.pooled, &time_ids),
            _ => unreachable!("one denoiser is built"),
        };
        Ok(noise_schedule.step(i, latents, &apply_cfg_to_batch(&v, 7.0)))
    };

    eprintln!("warm-up: {} steps", o.warmup);
    let mut x = latents.shallow_clone();
    for i in 0..o.warmup {
        x = step(&x, i % noise_schedule.steps())?;
    }
    synchronize(o.device);

    eprintln!("timing: {} denoising steps (CFG batch 2)", o.steps);
    let t0 = Instant::now();
    let mut x = latents.shallow_clone();
    for i in 0..o.steps {
        x = step(&x, i)?;
    }
    synchronize(o.device);
    let denoise_ms = t0.elapsed().as_secs_f64() * 1e3;

    // One untimed decode to warm the kernels, then a timed one.
    let x = x.to_kind(vae_dtype);
    let _ = vae.decode_latents(&x);
    synchronize(o.device);
    let t0 = Instant::now();
    let img = vae.decode_latents(&x);
    synchronize(o.device);
    let vae_decode_ms = t0.elapsed().as_secs_f64() * 1e3;
    let _ = img.size();

    Ok(BenchReport {
        model: o.preset.name,
        width: o.width,
        height: o.height,
        device: o.device,
        dtype: o.dtype,
        steps: o.steps,
        ms_per_step: denoise_ms / o.steps as f64,
        denoise_ms,
        vae_decode_ms,
        peak_gpu_bytes: if o.device.is_cuda() {
            crate::service::metrics::process_gpu_bytes()
        } else {
            None
        },
        attention: AttentionChoice::of(o),
    })
}
