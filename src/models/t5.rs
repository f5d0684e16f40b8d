//! The T5 v1.1 encoder (SD3's `text_encoder_3`) as transformers' `T5EncoderModel`: RMS
//! LayerNorms, unscaled attention with a bucketed relative position bias computed by the first
//! layer and shared by all, gated-GELU (or ReLU) feed-forward.
//!
//! Struct fields are named as the checkpoint keys, snake-cased, with `_` for an index
//! (`encoder.block.3.layer.1.DenseReluDense.wi_0` is
//! `encoder.block[3].layer_1.dense_relu_dense.wi_0`). The stack is read under `encoder.` or at
//! the root, whichever the checkpoint has; the token embedding is `shared`, or the stack's
//! `embed_tokens` when there is no `shared`.

use std::path::Path;

use serde::Deserialize;
use tch::{Kind, Tensor};

use super::layers::{merge_heads, split_heads, Embedding, Linear, RmsNorm};
use super::weights::Vb;

#[derive(Debug, Clone, Deserialize)]
pub struct T5Config {
    pub vocab_size: i64,
    pub d_model: i64,
    pub d_kv: i64,
    pub d_ff: i64,
    pub num_layers: i64,
    pub num_heads: i64,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: i64,
    #[serde(default = "default_distance")]
    pub relative_attention_max_distance: i64,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_ff")]
    pub feed_forward_proj: FeedForwardProj,
}

fn default_buckets() -> i64 {
    32
}
fn default_distance() -> i64 {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff() -> FeedForwardProj {
    FeedForwardProj::Relu
}

impl T5Config {
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        super::read_config(&dir.join("config.json"), "T5")
    }

    /// T5 v1.1 XXL encoder as shipped in SD3's `text_encoder_3`.
    pub fn t5_xxl() -> Self {
        Self {
            vocab_size: 32128,
            d_model: 4096,
            d_kv: 64,
            d_ff: 10240,
            num_layers: 24,
            num_heads: 64,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: FeedForwardProj::GatedGelu,
        }
    }
}

/// `feed_forward_proj` of a T5 config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum FeedForwardProj {
    /// `wo(relu(wi x))` (T5 v1.0).
    Relu,
    /// `wo(gelu_tanh(wi_0 x) * wi_1 x)` (T5 v1.1, SD3).
    GatedGelu,
}

impl TryFrom<String> for FeedForwardProj {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        super::choice(
            "feed_forward_proj",
            &value,
            &[("relu", Self::Relu), ("gated-gelu", Self::GatedGelu)],
        )
    }
}

/// transformers' `T5DenseActDense` / `T5DenseGatedActDense` (`DenseReluDense`).
enum DenseReluDense {
    Relu {
        wi: Linear,
        wo: Linear,
    },
    GatedGelu {
        wi_0: Linear,
        wi_1: Linear,
        wo: Linear,
    },
}

impl DenseReluDense {
    fn new(vb: &Vb, cfg: &T5Config) -> anyhow::Result<Self> {
        let (d, f) = (cfg.d_model, cfg.d_ff);
        Ok(match cfg.feed_forward_proj {
            FeedForwardProj::Relu => Self::Relu {
                wi: Linear::new(&vb.pp("wi"), d, f, false)?,
                wo: Linear::new(&vb.pp("wo"), f, d, false)?,
            },
            FeedForwardProj::GatedGelu => Self::GatedGelu {
                wi_0: Linear::new(&vb.pp("wi_0"), d, f, false)?,
                wi_1: Linear::new(&vb.pp("wi_1"), d, f, false)?,
                wo: Linear::new(&vb.pp("wo"), f, d, false)?,
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Self::Relu { wi, wo } => wo.forward(&wi.forward(x).relu()),
            Self::GatedGelu { wi_0, wi_1, wo } => {
                wo.forward(&(wi_0.forward(x).gelu("tanh") * wi_1.forward(x)))
            }
        }
    }
}

/// transformers' `T5Attention` (`SelfAttention`), unscaled; the position bias comes from the
/// stack.
struct T5Attention {
    /// `q`, `k`, `v` fused (one GEMM).
    qkv: Linear,
    o: Linear,
    heads: i64,
}

impl T5Attention {
    fn new(vb: &Vb, cfg: &T5Config) -> anyhow::Result<Self> {
        let inner = cfg.num_heads * cfg.d_kv;
        let linear = |name: &str| Linear::new(&vb.pp(name), cfg.d_model, inner, false);
        Ok(Self {
            qkv: Linear::fuse(&[linear("q")?, linear("k")?, linear("v")?]),
            o: Linear::new(&vb.pp("o"), inner, cfg.d_model, false)?,
            heads: cfg.num_heads,
        })
    }

    fn forward(&self, x: &Tensor, position_bias: &Tensor) -> Tensor {
        let qkv = self.qkv.forward(x).chunk(3, -1);
        let q = split_heads(&qkv[0], self.heads);
        let k = split_heads(&qkv[1], self.heads);
        let v = split_heads(&qkv[2], self.heads);
        // T5 does not scale the scores by 1/sqrt(d); the position bias enters as an additive mask.
        let a = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            Some(position_bias),
            0.0,
            false,
            Some(1.0),
            false,
        );
        self.o.forward(&merge_heads(&a))
    }
}

/// transformers' `T5LayerSelfAttention` (`layer.0`): pre-norm attention with a residual.
struct T5LayerSelfAttention {
    /// `SelfAttention`.
    self_attention: T5Attention,
    layer_norm: RmsNorm,
}

/// transformers' `T5LayerFF` (`layer.1`): pre-norm feed-forward with a residual.
struct T5LayerFF {
    /// `DenseReluDense`.
    dense_relu_dense: DenseReluDense,
    layer_norm: RmsNorm,
}

/// transformers' `T5Block` (`block.N`) of an encoder.
struct T5Block {
    layer_0: T5LayerSelfAttention,
    layer_1: T5LayerFF,
}

impl T5Block {
    fn new(vb: &Vb, cfg: &T5Config) -> anyhow::Result<Self> {
        let (d, eps) = (cfg.d_model, cfg.layer_norm_epsilon);
        let (layer_0, layer_1) = (vb.pp("layer.0"), vb.pp("layer.1"));
        Ok(Self {
            layer_0: T5LayerSelfAttention {
                self_attention: T5Attention::new(&layer_0.pp("SelfAttention"), cfg)?,
                layer_norm: RmsNorm::new(&layer_0.pp("layer_norm"), d, eps)?,
            },
            layer_1: T5LayerFF {
                dense_relu_dense: DenseReluDense::new(&layer_1.pp("DenseReluDense"), cfg)?,
                layer_norm: RmsNorm::new(&layer_1.pp("layer_norm"), d, eps)?,
            },
        })
    }

    fn forward(&self, x: &Tensor, position_bias: &Tensor) -> Tensor {
        let attn = &self.layer_0;
        let x = x + attn
            .self_attention
            .forward(&attn.layer_norm.forward(x), position_bias);
        let ff = &self.layer_1;
        &x + ff.dense_relu_dense.forward(&ff.layer_norm.forward(&x))
    }
}

/// transformers' `T5Stack` as an encoder (`encoder`).
struct T5Stack {
    block: Vec<T5Block>,
    /// `block.0.layer.0.SelfAttention.relative_attention_bias`: buckets x heads, owned by the
    /// first block's attention in the checkpoint, and shared by every block.
    relative_attention_bias: Embedding,
    final_layer_norm: RmsNorm,
    num_buckets: i64,
    max_distance: i64,
}

impl T5Stack {
    fn new(vb: &Vb, cfg: &T5Config) -> anyhow::Result<Self> {
        Ok(Self {
            block: (0..cfg.num_layers)
                .map(|i| T5Block::new(&vb.pp("block").pp(i), cfg))
                .collect::<anyhow::Result<Vec<_>>>()?,
            relative_attention_bias: Embedding::new(
                &vb.pp("block.0.layer.0.SelfAttention.relative_attention_bias"),
                cfg.relative_attention_num_buckets,
                cfg.num_heads,
            )?,
            final_layer_norm: RmsNorm::new(
                &vb.pp("final_layer_norm"),
                cfg.d_model,
                cfg.layer_norm_epsilon,
            )?,
            num_buckets: cfg.relative_attention_num_buckets,
            max_distance: cfg.relative_attention_max_distance,
        })
    }

    /// Bidirectional relative position buckets, as `T5Attention._relative_position_bucket`,
    /// looked up: `[1, heads, seq, seq]`.
    fn position_bias(&self, seq: i64, device: tch::Device) -> Tensor {
        let ctx = Tensor::arange(seq, (Kind::Int64, device)).unsqueeze(1);
        let mem = Tensor::arange(seq, (Kind::Int64, device)).unsqueeze(0);
        let relative = mem - ctx; // key position minus query position
        let half = self.num_buckets / 2;
        let mut buckets = relative.gt(0).to_kind(Kind::Int64) * half;
        let rel = relative.abs();
        let max_exact = half / 2;
        let is_small = rel.lt(max_exact);
        let large = (rel.to_kind(Kind::Float) / max_exact as f64).log()
            / ((self.max_distance as f64) / (max_exact as f64)).ln()
            * ((half - max_exact) as f64);
        let large = (large.to_kind(Kind::Int64) + max_exact).clamp_max(half - 1);
        buckets += rel.where_self(&is_small, &large);
        // [seq, seq, heads] -> [1, heads, seq, seq]
        self.relative_attention_bias
            .forward(&buckets)
            .permute([2, 0, 1])
            .unsqueeze(0)
    }

    fn forward(&self, embeds: &Tensor) -> Tensor {
        let seq = embeds.size()[1];
        let bias = self
            .position_bias(seq, embeds.device())
            .to_kind(embeds.kind());
        let mut x = embeds.shallow_clone();
        for block in &self.block {
            x = block.forward(&x, &bias);
        }
        self.final_layer_norm.forward(&x)
    }
}

/// transformers' `T5EncoderModel`.
pub struct T5Encoder {
    shared: Embedding,
    encoder: T5Stack,
}

impl T5Encoder {
    pub fn new(vb: &Vb, cfg: &T5Config) -> anyhow::Result<Self> {
        let encoder =
            vb.pp_first_containing(&["encoder", ""], "block.0.layer.0.SelfAttention.q.weight")?;
        // `shared` and the stack's `embed_tokens` are the same tied table; checkpoints keep one
        // or both.
        let shared = if vb.contains("shared.weight") {
            vb.pp("shared")
        } else {
            encoder.pp("embed_tokens")
        };
        Ok(Self {
            shared: Embedding::new(&shared, cfg.vocab_size, cfg.d_model)?,
            encoder: T5Stack::new(&encoder, cfg)?,
        })
    }

    /// `ids`: `[batch, seq]`; returns the last hidden state `[batch, seq, d_model]`.
    /// No attention mask: the SD3 pipeline passes none, so padding tokens are attended to.
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        self.encoder.forward(&self.shared.forward(ids))
    }
}
