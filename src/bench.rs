//! Speed benchmark of the SD3 denoiser and VAE at full size with random weights (speed does not
//! depend on the values, so no download is needed).

use std::time::Instant;

use tch::{Device, Kind, Tensor};

use crate::device::{device_name, dtype_name, synchronize};
use crate::models::mmdit::{Mmdit, MmditConfig};
use crate::models::unet::{Unet, UnetConfig};
use crate::models::vae::{VaeConfig, VaeDecoder};
use crate::models::weights::{Vb, Weights};
use crate::schedulers::flow_match::{FlowMatchConfig, FlowMatchSchedule};

/// The denoiser to measure.
pub enum Denoiser {
    Sd3(MmditConfig),
    Sdxl(UnetConfig),
}

pub struct BenchOptions {
    pub device: Device,
    pub kind: Kind,
    pub width: i64,
    pub height: i64,
    pub steps: usize,
    pub warmup: usize,
    pub context_tokens: i64,
    pub denoiser: Denoiser,
    pub vae: VaeConfig,
}

#[derive(Debug)]
pub struct BenchReport {
    pub ms_per_step: f64,
    pub denoise_ms: f64,
    pub vae_decode_ms: f64,
    pub peak_gpu_bytes: Option<u64>,
}

pub fn run(o: &BenchOptions) -> anyhow::Result<BenchReport> {
    let _guard = tch::no_grad_guard();
    tch::manual_seed(0);
    let vb = Vb::new(Weights::random(0, o.device, o.kind));
    // SDXL's VAE runs in float32 when the model is fp16 (force_upcast), as diffusers does.
    let vae_kind = match (&o.denoiser, o.kind) {
        (Denoiser::Sdxl(_), Kind::Half) => Kind::Float,
        _ => o.kind,
    };
    let vae = VaeDecoder::new(&Vb::new(Weights::random(1, o.device, vae_kind)), &o.vae)?;
    let f = o.vae.scale_factor();
    let (lh, lw) = (o.height / f, o.width / f);
    let schedule = FlowMatchSchedule::new(&FlowMatchConfig::sd3(), o.steps.max(1));
    let timesteps = Tensor::from_slice(&schedule.timesteps).to_device(o.device);
    let (mmdit, unet, channels, context, pooled) = match &o.denoiser {
        Denoiser::Sd3(cfg) => {
            eprintln!(
                "building the SD3 transformer ({} layers, dim {}) with random weights on {} in {}",
                cfg.num_layers,
                cfg.inner_dim(),
                device_name(o.device),
                dtype_name(o.kind)
            );
            let ctx = Tensor::randn(
                [2, o.context_tokens, cfg.joint_attention_dim],
                (o.kind, o.device),
            );
            let pooled = Tensor::randn([2, cfg.pooled_projection_dim], (o.kind, o.device));
            (
                Some(Mmdit::new(&vb, cfg)?),
                None,
                cfg.in_channels,
                ctx,
                pooled,
            )
        }
        Denoiser::Sdxl(cfg) => {
            eprintln!(
                "building the SDXL UNet (channels {:?}) with random weights on {} in {}",
                cfg.block_out_channels,
                device_name(o.device),
                dtype_name(o.kind)
            );
            let ctx = Tensor::randn([2, 77, cfg.cross_attention_dim], (o.kind, o.device));
            let pooled_dim =
                cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim;
            let pooled = Tensor::randn([2, pooled_dim], (o.kind, o.device));
            (
                None,
                Some(Unet::new(&vb, cfg)?),
                cfg.in_channels,
                ctx,
                pooled,
            )
        }
    };
    let (h, w) = (o.height as f32, o.width as f32);
    let time_ids = Tensor::from_slice(&[h, w, 0.0, 0.0, h, w])
        .unsqueeze(0)
        .repeat([2, 1])
        .to_device(o.device)
        .to_kind(o.kind);
    let latents = Tensor::randn([1, channels, lh, lw], (o.kind, o.device));

    let step = |latents: &Tensor, i: usize| -> anyhow::Result<Tensor> {
        let t = timesteps.narrow(0, i as i64, 1).expand([2], false);
        let input = Tensor::cat(&[latents, latents], 0);
        let v = match (&mmdit, &unet) {
            (Some(m), _) => m.forward(&input, &t, &context, &pooled)?,
            (_, Some(u)) => u.forward(&input, &t, &context, &pooled, &time_ids),
            _ => unreachable!("one denoiser is built"),
        };
        let parts = v.chunk(2, 0);
        let v = &parts[0] + (&parts[1] - &parts[0]) * 7.0;
        Ok(
            (latents.to_kind(Kind::Float) + v.to_kind(Kind::Float) * schedule.dt(i) as f64)
                .to_kind(o.kind),
        )
    };

    eprintln!("warm-up: {} steps", o.warmup);
    let mut x = latents.shallow_clone();
    for i in 0..o.warmup {
        x = step(&x, i % schedule.steps())?;
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
    let x = x.to_kind(vae_kind);
    let _ = vae.decode_latents(&x);
    synchronize(o.device);
    let t0 = Instant::now();
    let img = vae.decode_latents(&x);
    synchronize(o.device);
    let vae_decode_ms = t0.elapsed().as_secs_f64() * 1e3;
    let _ = img.size();

    Ok(BenchReport {
        ms_per_step: denoise_ms / o.steps as f64,
        denoise_ms,
        vae_decode_ms,
        peak_gpu_bytes: if o.device.is_cuda() {
            crate::metrics::process_gpu_bytes()
        } else {
            None
        },
    })
}
