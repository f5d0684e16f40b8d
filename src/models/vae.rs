//! The decoder half of diffusers' `AutoencoderKL` (SD3's 16-channel VAE and SDXL's 4-channel
//! one): optional post-quant conv, mid block (resnet, single-head attention, resnet), up blocks
//! with nearest-neighbour upsampling, GroupNorm + SiLU + conv out. The encoder (`encoder.*`,
//! `quant_conv`) is not loaded: r2f only decodes.
//!
//! Struct fields are named as the checkpoint keys (`decoder.up_blocks.1.resnets.0.conv1` is
//! `decoder.up_blocks[1].resnets[0].conv1`).

use std::path::Path;

use serde::Deserialize;
use tch::Tensor;

use super::layers::{attention, Conv2d, GroupNorm, Linear};
use super::resnet::{ResnetBlock2D, Upsample2D};
use super::weights::Vb;

#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "default_channels")]
    pub in_channels: i64,
    #[serde(default = "default_channels")]
    pub out_channels: i64,
    pub block_out_channels: Vec<i64>,
    #[serde(default = "default_layers")]
    pub layers_per_block: i64,
    pub latent_channels: i64,
    #[serde(default = "default_groups")]
    pub norm_num_groups: i64,
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    #[serde(default)]
    pub force_upcast: Option<bool>,
}

fn default_channels() -> i64 {
    3
}
fn default_layers() -> i64 {
    1
}
fn default_groups() -> i64 {
    32
}
fn default_scaling() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}

impl VaeConfig {
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        super::read_config(&dir.join("config.json"), "VAE")
    }

    /// SD3's VAE (`vae/config.json` of stable-diffusion-3-medium-diffusers).
    pub fn sd3() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 16,
            norm_num_groups: 32,
            scaling_factor: 1.5305,
            shift_factor: Some(0.0609),
            use_post_quant_conv: false,
            mid_block_add_attention: true,
            force_upcast: Some(true),
        }
    }

    /// SDXL's VAE (`vae/config.json` of stable-diffusion-xl-base-1.0).
    pub fn sdxl() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.13025,
            shift_factor: None,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
            force_upcast: Some(true),
        }
    }

    /// Pixels per latent along each side: 2^(number of blocks - 1).
    pub fn scale_factor(&self) -> i64 {
        1 << (self.block_out_channels.len().saturating_sub(1))
    }
}

/// The resnets of the VAE: no time embedding, GroupNorm eps 1e-6.
fn resnet(
    vb: &Vb,
    in_channels: i64,
    out_channels: i64,
    groups: i64,
) -> anyhow::Result<ResnetBlock2D> {
    Ok(ResnetBlock2D::new(
        vb,
        in_channels,
        out_channels,
        None,
        groups,
        1e-6,
    )?)
}

/// diffusers' `Attention` as the VAE mid block uses it: single-head spatial self-attention
/// behind a GroupNorm, with a residual connection.
struct Attention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    /// `to_out.0`.
    to_out: Linear,
}

impl Attention {
    fn new(vb: &Vb, channels: i64, groups: i64) -> anyhow::Result<Self> {
        let linear = |name: &str| Linear::new(&vb.pp(name), channels, channels, true);
        Ok(Self {
            group_norm: GroupNorm::new(&vb.pp("group_norm"), groups, channels, 1e-6)?,
            to_q: linear("to_q")?,
            to_k: linear("to_k")?,
            to_v: linear("to_v")?,
            to_out: linear("to_out.0")?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        // [b, c, h, w] -> [b, h*w, c] tokens.
        let tokens = self.group_norm.forward(x).flatten(2, 3).transpose(1, 2);
        let q = self.to_q.forward(&tokens).unsqueeze(1);
        let k = self.to_k.forward(&tokens).unsqueeze(1);
        let v = self.to_v.forward(&tokens).unsqueeze(1);
        let a = attention(&q, &k, &v, false).squeeze_dim(1);
        let a = self
            .to_out
            .forward(&a)
            .transpose(1, 2)
            .reshape(size.as_slice());
        a + x
    }
}

/// diffusers' `UNetMidBlock2D` (`decoder.mid_block`): resnet, then (attention, resnet) pairs;
/// the attention is absent when `mid_block_add_attention` is false.
struct MidBlock {
    /// `attentions.0`.
    attentions: Option<Attention>,
    /// `resnets.0`, `resnets.1`.
    resnets: [ResnetBlock2D; 2],
}

impl MidBlock {
    fn new(vb: &Vb, cfg: &VaeConfig, channels: i64) -> anyhow::Result<Self> {
        let g = cfg.norm_num_groups;
        Ok(Self {
            attentions: if cfg.mid_block_add_attention {
                Some(Attention::new(&vb.pp("attentions.0"), channels, g)?)
            } else {
                None
            },
            resnets: [
                resnet(&vb.pp("resnets.0"), channels, channels, g)?,
                resnet(&vb.pp("resnets.1"), channels, channels, g)?,
            ],
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let [first, second] = &self.resnets;
        let mut x = first.forward(x, None);
        if let Some(attention) = &self.attentions {
            x = attention.forward(&x);
        }
        second.forward(&x, None)
    }
}

/// diffusers' `UpDecoderBlock2D` (`decoder.up_blocks.N`): resnets, then an upsampler except in
/// the last block.
struct UpDecoderBlock {
    resnets: Vec<ResnetBlock2D>,
    /// `upsamplers.0`.
    upsamplers: Option<Upsample2D>,
}

impl UpDecoderBlock {
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut x = x.shallow_clone();
        for resnet in &self.resnets {
            x = resnet.forward(&x, None);
        }
        match &self.upsamplers {
            Some(upsampler) => upsampler.forward(&x, None),
            None => x,
        }
    }
}

/// diffusers' `Decoder` (`decoder`).
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpDecoderBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: &Vb, cfg: &VaeConfig) -> anyhow::Result<Self> {
        let g = cfg.norm_num_groups;
        let channels = &cfg.block_out_channels;
        let (Some(&first), Some(&top)) = (channels.first(), channels.last()) else {
            anyhow::bail!("VAE config has no block_out_channels");
        };
        let mut up_blocks = Vec::new();
        let mut prev = top;
        for (i, &ch) in channels.iter().rev().enumerate() {
            let block = vb.pp("up_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let cin = if j == 0 { prev } else { ch };
                    resnet(&block.pp("resnets").pp(j), cin, ch, g)
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let upsamplers = if i + 1 < channels.len() {
                Some(Upsample2D::new(&block.pp("upsamplers.0"), ch)?)
            } else {
                None
            };
            up_blocks.push(UpDecoderBlock {
                resnets,
                upsamplers,
            });
            prev = ch;
        }
        Ok(Self {
            conv_in: Conv2d::new(&vb.pp("conv_in"), cfg.latent_channels, top, 3, 1, 1)?,
            mid_block: MidBlock::new(&vb.pp("mid_block"), cfg, top)?,
            up_blocks,
            conv_norm_out: GroupNorm::new(&vb.pp("conv_norm_out"), g, first, 1e-6)?,
            conv_out: Conv2d::new(&vb.pp("conv_out"), first, cfg.out_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, z: &Tensor) -> Tensor {
        let mut x = self.mid_block.forward(&self.conv_in.forward(z));
        for block in &self.up_blocks {
            x = block.forward(&x);
        }
        self.conv_out
            .forward(&self.conv_norm_out.forward(&x).silu())
    }
}

pub struct VaeDecoder {
    cfg: VaeConfig,
    post_quant_conv: Option<Conv2d>,
    decoder: Decoder,
}

impl VaeDecoder {
    /// `vb`: the root of the `vae/` weights (keys `decoder.*`, `post_quant_conv.*`).
    pub fn new(vb: &Vb, cfg: &VaeConfig) -> anyhow::Result<Self> {
        let lat = cfg.latent_channels;
        Ok(Self {
            post_quant_conv: if cfg.use_post_quant_conv {
                Some(Conv2d::new(&vb.pp("post_quant_conv"), lat, lat, 1, 1, 0)?)
            } else {
                None
            },
            decoder: Decoder::new(&vb.pp("decoder"), cfg)?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// Raw decoder: latent space -> image in [-1, 1] (not clamped).
    pub fn decode_raw(&self, z: &Tensor) -> Tensor {
        match &self.post_quant_conv {
            Some(conv) => self.decoder.forward(&conv.forward(z)),
            None => self.decoder.forward(z),
        }
    }

    /// Denoised latents -> image in [-1, 1], undoing the pipeline's latent scaling and shift.
    pub fn decode_latents(&self, latents: &Tensor) -> Tensor {
        let z = latents / self.cfg.scaling_factor + self.cfg.shift_factor.unwrap_or(0.0);
        self.decode_raw(&z)
    }
}
