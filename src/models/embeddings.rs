//! Timestep embeddings shared by the SD3 transformer and the SDXL UNet, as diffusers'
//! `embeddings.py`: sinusoidal features (`Timesteps`, no weights) and the Linear -> SiLU -> Linear
//! projection (`TimestepEmbedding`).

use tch::{Kind, Tensor};

use super::layers::{Linear, Result};
use super::weights::Vb;

/// diffusers' `Timesteps(num_channels, flip_sin_to_cos, downscale_freq_shift)`
/// (`get_timestep_embedding`): sinusoidal features of a `[n]` tensor, computed in float32.
pub struct Timesteps {
    pub num_channels: i64,
    pub flip_sin_to_cos: bool,
    pub downscale_freq_shift: f64,
}

impl Timesteps {
    /// `t [n]` -> `[n, num_channels]` float32.
    pub fn forward(&self, t: &Tensor) -> Tensor {
        let half = self.num_channels / 2;
        let exponent = Tensor::arange(half, (Kind::Float, t.device())) * (-(10000f64).ln())
            / (half as f64 - self.downscale_freq_shift);
        let freqs = exponent.exp();
        let args = t.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0);
        let (sin, cos) = (args.sin(), args.cos());
        let emb = if self.flip_sin_to_cos {
            Tensor::cat(&[cos, sin], -1)
        } else {
            Tensor::cat(&[sin, cos], -1)
        };
        if self.num_channels % 2 == 1 {
            emb.constant_pad_nd([0, 1])
        } else {
            emb
        }
    }
}

/// Linear -> SiLU -> Linear: diffusers' `TimestepEmbedding` (SD3's
/// `time_text_embed.timestep_embedder`, SDXL's `time_embedding` and `add_embedding`) and
/// `PixArtAlphaTextProjection` with its SiLU (SD3's `time_text_embed.text_embedder`), which has
/// the same two layers.
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(vb: &Vb, in_channels: i64, time_embed_dim: i64) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::new(&vb.pp("linear_1"), in_channels, time_embed_dim, true)?,
            linear_2: Linear::new(&vb.pp("linear_2"), time_embed_dim, time_embed_dim, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.linear_2.forward(&self.linear_1.forward(x).silu())
    }
}
