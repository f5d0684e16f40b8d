//! ResNet blocks and resamplers shared by the SDXL UNet and the VAE decoder, as diffusers'
//! `ResnetBlock2D`, `Upsample2D` and `Downsample2D` (convolutional variants).

use tch::Tensor;

use super::layers::{Conv2d, GroupNorm, Linear, Result};
use super::weights::Vb;

/// diffusers' `ResnetBlock2D` with the default time-scale-shift: GroupNorm, SiLU, conv; plus the
/// projected time embedding when the block has one (UNet); 1x1 shortcut when channels change.
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    /// Present in UNet blocks (`temb_channels`), absent in the VAE.
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    /// Present when the input and output channels differ.
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    pub fn new(
        vb: &Vb,
        in_channels: i64,
        out_channels: i64,
        temb_channels: Option<i64>,
        groups: i64,
        eps: f64,
    ) -> Result<Self> {
        let (cin, cout) = (in_channels, out_channels);
        Ok(Self {
            norm1: GroupNorm::new(&vb.pp("norm1"), groups, cin, eps)?,
            conv1: Conv2d::new(&vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj: match temb_channels {
                Some(t) => Some(Linear::new(&vb.pp("time_emb_proj"), t, cout, true)?),
                None => None,
            },
            norm2: GroupNorm::new(&vb.pp("norm2"), groups, cout, eps)?,
            conv2: Conv2d::new(&vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            conv_shortcut: if cin != cout {
                Some(Conv2d::new(&vb.pp("conv_shortcut"), cin, cout, 1, 1, 0)?)
            } else {
                None
            },
        })
    }

    /// `silu_temb`: SiLU of the time embedding, which the block projects (UNet only).
    pub fn forward(&self, x: &Tensor, silu_temb: Option<&Tensor>) -> Tensor {
        let mut h = self.conv1.forward(&self.norm1.forward(x).silu());
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, silu_temb) {
            h += proj.forward(t).unsqueeze(-1).unsqueeze(-1);
        }
        let h = self.conv2.forward(&self.norm2.forward(&h).silu());
        match &self.conv_shortcut {
            Some(shortcut) => shortcut.forward(x) + h,
            None => x + h,
        }
    }
}

/// diffusers' `Downsample2D` with a convolution: a stride-2 3x3 conv.
pub struct Downsample2D {
    conv: Conv2d,
}

impl Downsample2D {
    pub fn new(vb: &Vb, channels: i64) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(&vb.pp("conv"), channels, channels, 3, 2, 1)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.conv.forward(x)
    }
}

/// diffusers' `Upsample2D` with a convolution: nearest-neighbour upsampling, then a 3x3 conv.
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vb: &Vb, channels: i64) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(&vb.pp("conv"), channels, channels, 3, 1, 1)?,
        })
    }

    /// Upsamples to `output_size` (`[h, w]`), or by 2 when none is given.
    pub fn forward(&self, x: &Tensor, output_size: Option<[i64; 2]>) -> Tensor {
        let size = x.size();
        let [h, w] = output_size.unwrap_or([size[2] * 2, size[3] * 2]);
        self.conv.forward(&x.upsample_nearest2d([h, w], None, None))
    }
}
