//! The decoder half of diffusers' `AutoencoderKL` (SD3's 16-channel VAE and SDXL's 4-channel
//! one): optional post-quant conv, mid block (resnet, single-head attention, resnet), up blocks
//! with nearest-neighbour upsampling, GroupNorm + SiLU + conv out.

use std::path::Path;

use serde::Deserialize;
use tch::Tensor;

use super::layers::{attention, Conv2d, GroupNorm, Linear};
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

/// diffusers' `ResnetBlock2D` (default time-scale-shift): GroupNorm, SiLU, conv; plus the
/// projected time embedding when the block has one (UNet); 1x1 shortcut when channels change.
pub(crate) struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(vb: &Vb, cin: i64, cout: i64, groups: i64) -> anyhow::Result<Self> {
        Self::with_time(vb, cin, cout, groups, 1e-6, None)
    }

    pub(crate) fn with_time(
        vb: &Vb,
        cin: i64,
        cout: i64,
        groups: i64,
        eps: f64,
        temb_channels: Option<i64>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            norm1: GroupNorm::new(&vb.pp("norm1"), groups, cin, eps)?,
            conv1: Conv2d::new(&vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_proj: match temb_channels {
                Some(t) => Some(Linear::new(&vb.pp("time_emb_proj"), t, cout, true)?),
                None => None,
            },
            norm2: GroupNorm::new(&vb.pp("norm2"), groups, cout, eps)?,
            conv2: Conv2d::new(&vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            shortcut: if cin != cout {
                Some(Conv2d::new(&vb.pp("conv_shortcut"), cin, cout, 1, 1, 0)?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_t(x, None)
    }

    /// `silu_temb`: SiLU of the time embedding (the block projects it).
    pub(crate) fn forward_t(&self, x: &Tensor, silu_temb: Option<&Tensor>) -> Tensor {
        let mut h = self.conv1.forward(&self.norm1.forward(x).silu());
        if let (Some(p), Some(t)) = (&self.time_proj, silu_temb) {
            h += p.forward(t).unsqueeze(-1).unsqueeze(-1);
        }
        let h = self.conv2.forward(&self.norm2.forward(&h).silu());
        match &self.shortcut {
            Some(s) => s.forward(x) + h,
            None => x + h,
        }
    }
}

/// Single-head spatial self-attention with a residual connection.
struct SpatialAttention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl SpatialAttention {
    fn new(vb: &Vb, ch: i64, groups: i64) -> anyhow::Result<Self> {
        Ok(Self {
            norm: GroupNorm::new(&vb.pp("group_norm"), groups, ch, 1e-6)?,
            q: Linear::new(&vb.pp("to_q"), ch, ch, true)?,
            k: Linear::new(&vb.pp("to_k"), ch, ch, true)?,
            v: Linear::new(&vb.pp("to_v"), ch, ch, true)?,
            out: Linear::new(&vb.pp("to_out.0"), ch, ch, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().expect("4-d feature map");
        let t = self.norm.forward(x).view([b, c, h * w]).transpose(1, 2);
        let q = self.q.forward(&t).unsqueeze(1);
        let k = self.k.forward(&t).unsqueeze(1);
        let v = self.v.forward(&t).unsqueeze(1);
        let a = attention(&q, &k, &v, false).squeeze_dim(1);
        let a = self.out.forward(&a).transpose(1, 2).reshape([b, c, h, w]);
        a + x
    }
}

struct UpBlock {
    resnets: Vec<ResnetBlock>,
    upsample: Option<Conv2d>,
}

pub struct VaeDecoder {
    cfg: VaeConfig,
    post_quant: Option<Conv2d>,
    conv_in: Conv2d,
    mid_res1: ResnetBlock,
    mid_attn: Option<SpatialAttention>,
    mid_res2: ResnetBlock,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl VaeDecoder {
    /// `vb`: the root of the `vae/` weights (keys `decoder.*`, `post_quant_conv.*`).
    pub fn new(vb: &Vb, cfg: &VaeConfig) -> anyhow::Result<Self> {
        let g = cfg.norm_num_groups;
        let lat = cfg.latent_channels;
        let chans = &cfg.block_out_channels;
        let top = *chans
            .last()
            .ok_or_else(|| anyhow::anyhow!("VAE config has no block_out_channels"))?;
        let dec = vb.pp("decoder");
        let mid = dec.pp("mid_block");
        let mut up = Vec::new();
        let mut prev = top;
        for (i, &ch) in chans.iter().rev().enumerate() {
            let ub = dec.pp("up_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let cin = if j == 0 { prev } else { ch };
                    ResnetBlock::new(&ub.pp("resnets").pp(j), cin, ch, g)
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let upsample = if i + 1 < chans.len() {
                Some(Conv2d::new(&ub.pp("upsamplers.0.conv"), ch, ch, 3, 1, 1)?)
            } else {
                None
            };
            up.push(UpBlock { resnets, upsample });
            prev = ch;
        }
        Ok(Self {
            post_quant: if cfg.use_post_quant_conv {
                Some(Conv2d::new(&vb.pp("post_quant_conv"), lat, lat, 1, 1, 0)?)
            } else {
                None
            },
            conv_in: Conv2d::new(&dec.pp("conv_in"), lat, top, 3, 1, 1)?,
            mid_res1: ResnetBlock::new(&mid.pp("resnets.0"), top, top, g)?,
            mid_attn: if cfg.mid_block_add_attention {
                Some(SpatialAttention::new(&mid.pp("attentions.0"), top, g)?)
            } else {
                None
            },
            mid_res2: ResnetBlock::new(&mid.pp("resnets.1"), top, top, g)?,
            up,
            norm_out: GroupNorm::new(&dec.pp("conv_norm_out"), g, chans[0], 1e-6)?,
            conv_out: Conv2d::new(&dec.pp("conv_out"), chans[0], cfg.out_channels, 3, 1, 1)?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// Raw decoder: latent space -> image in [-1, 1] (not clamped).
    pub fn decode_raw(&self, z: &Tensor) -> Tensor {
        let z = match &self.post_quant {
            Some(c) => c.forward(z),
            None => z.shallow_clone(),
        };
        let mut x = self.conv_in.forward(&z);
        x = self.mid_res1.forward(&x);
        if let Some(a) = &self.mid_attn {
            x = a.forward(&x);
        }
        x = self.mid_res2.forward(&x);
        for block in &self.up {
            for r in &block.resnets {
                x = r.forward(&x);
            }
            if let Some(conv) = &block.upsample {
                let (_, _, h, w) = x.size4().expect("4-d feature map");
                x = conv.forward(&x.upsample_nearest2d([h * 2, w * 2], None, None));
            }
        }
        self.conv_out.forward(&self.norm_out.forward(&x).silu())
    }

    /// Denoised latents -> image in [-1, 1], undoing the pipeline's latent scaling and shift.
    pub fn decode_latents(&self, latents: &Tensor) -> Tensor {
        let z = latents / self.cfg.scaling_factor + self.cfg.shift_factor.unwrap_or(0.0);
        self.decode_raw(&z)
    }
}
