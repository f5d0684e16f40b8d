//! Small building blocks shared by every model: linear, embedding, norms, convolution, attention.

use tch::{Kind, Tensor};

use super::weights::{Vb, WeightError};

pub type Result<T> = std::result::Result<T, WeightError>;

pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(vb: &Vb, in_dim: i64, out_dim: i64, bias: bool) -> Result<Self> {
        let weight = vb.get("weight", &[out_dim, in_dim])?;
        let bias = if bias {
            Some(vb.get("bias", &[out_dim])?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Several linears with the same input fused into one matrix multiply (q/k/v projections):
    /// one GEMM instead of three, split afterwards. The fused layer has a bias when every part
    /// has one.
    pub fn fuse(parts: &[Linear]) -> Linear {
        let weight = Tensor::cat(&parts.iter().map(|p| &p.weight).collect::<Vec<_>>(), 0);
        let biases: Option<Vec<&Tensor>> = parts.iter().map(|p| p.bias.as_ref()).collect();
        let bias = biases.map(|b| Tensor::cat(&b, 0));
        Linear { weight, bias }
    }
}

/// A lookup table (`nn.Embedding`): row `i` of `weight` for token id `i`.
pub struct Embedding {
    weight: Tensor,
}

impl Embedding {
    pub fn new(vb: &Vb, num_embeddings: i64, dim: i64) -> Result<Self> {
        Ok(Self {
            weight: vb.get("weight", &[num_embeddings, dim])?,
        })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `ids [..]` (int64) -> `[.., dim]`.
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        let mut shape = ids.size();
        shape.push(-1);
        self.weight
            .index_select(0, &ids.flatten(0, -1))
            .view(shape.as_slice())
    }
}

/// LayerNorm over the last dimension, with or without affine parameters.
pub struct LayerNorm {
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    dim: i64,
    eps: f64,
}

impl LayerNorm {
    pub fn new(vb: &Vb, dim: i64, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: Some(vb.get("weight", &[dim])?),
            bias: Some(vb.get("bias", &[dim])?),
            dim,
            eps,
        })
    }

    pub fn no_affine(dim: i64, eps: f64) -> Self {
        Self {
            weight: None,
            bias: None,
            dim,
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm(
            [self.dim],
            self.weight.as_ref(),
            self.bias.as_ref(),
            self.eps,
            true,
        )
    }
}

/// RMS norm as diffusers' `RMSNorm` and T5's `T5LayerNorm` compute it: the variance in float32,
/// then the weight in the weight's dtype.
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(vb: &Vb, dim: i64, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get("weight", &[dim])?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let xf = x.to_kind(Kind::Float);
        let var = xf.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let normed = xf * (var + self.eps).rsqrt();
        normed.to_kind(self.weight.kind()) * &self.weight
    }
}

pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: i64,
    eps: f64,
}

impl GroupNorm {
    pub fn new(vb: &Vb, groups: i64, channels: i64, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get("weight", &[channels])?,
            bias: vb.get("bias", &[channels])?,
            groups,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.group_norm(
            self.groups,
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}

pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: i64,
    padding: i64,
}

impl Conv2d {
    pub fn new(
        vb: &Vb,
        in_ch: i64,
        out_ch: i64,
        kernel: i64,
        stride: i64,
        padding: i64,
    ) -> Result<Self> {
        Ok(Self {
            weight: vb.get("weight", &[out_ch, in_ch, kernel, kernel])?,
            bias: Some(vb.get("bias", &[out_ch])?),
            stride,
            padding,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(
            &self.weight,
            self.bias.as_ref(),
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            1,
        )
    }
}

/// Scaled dot-product attention on `[batch, heads, seq, head_dim]` tensors through libtorch's
/// fused SDPA (flash / memory-efficient kernels on CUDA, the math kernel on the CPU).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Tensor {
    Tensor::scaled_dot_product_attention(q, k, v, None::<Tensor>, 0.0, causal, None, false)
}

/// `[b, s, heads*d]` -> `[b, heads, s, d]`.
pub fn split_heads(x: &Tensor, heads: i64) -> Tensor {
    x.unflatten(-1, [heads, -1]).transpose(1, 2)
}

/// `[b, heads, s, d]` -> `[b, s, heads*d]`.
pub fn merge_heads(x: &Tensor) -> Tensor {
    x.transpose(1, 2).flatten(2, 3)
}
