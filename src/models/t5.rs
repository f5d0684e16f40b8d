//! The T5 v1.1 encoder (SD3's `text_encoder_3`) as transformers' `T5EncoderModel`: RMS
//! LayerNorms, unscaled attention with a bucketed relative position bias computed by the first
//! layer and shared by all, gated-GELU (or ReLU) feed-forward.

use std::path::Path;

use serde::Deserialize;
use tch::{Kind, Tensor};

use super::layers::{merge_heads, split_heads, Linear, RmsNorm};
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
    pub feed_forward_proj: String,
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
fn default_ff() -> String {
    "relu".into()
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
            feed_forward_proj: "gated-gelu".into(),
        }
    }
}

enum FeedForward {
    /// `gated-gelu`: wo(gelu_tanh(wi_0 x) * wi_1 x).
    GatedGelu {
        wi0: Linear,
        wi1: Linear,
        wo: Linear,
    },
    /// `relu`: wo(relu(wi x)).
    Relu { wi: Linear, wo: Linear },
}

impl FeedForward {
    fn new(vb: &Vb, cfg: &T5Config) -> anyhow::Result<Self> {
        let (d, f) = (cfg.d_model, cfg.d_ff);
        Ok(match cfg.feed_forward_proj.as_str() {
            "gated-gelu" => Self::GatedGelu {
                wi0: Linear::new(&vb.pp("wi_0"), d, f, false)?,
                wi1: Linear::new(&vb.pp("wi_1"), d, f, false)?,
                wo: Linear::new(&vb.pp("wo"), f, d, false)?,
            },
            "relu" => Self::Relu {
                wi: Linear::new(&vb.pp("wi"), d, f, false)?,
                wo: Linear::new(&vb.pp("wo"), f, d, false)?,
            },
            other => anyhow::bail!("unsupported T5 feed_forward_proj `{other}`"),
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Self::GatedGelu { wi0, wi1, wo } => {
                wo.forward(&(wi0.forward(x).gelu("tanh") * wi1.forward(x)))
            }
            Self::Relu { wi, wo } => wo.forward(&wi.forward(x).relu()),
        }
    }
}

struct Block {
    attn_norm: RmsNorm,
    qkv: Linear,
    o: Linear,
    ff_norm: RmsNorm,
    ff: FeedForward,
    heads: i64,
}

impl Block {
    fn new(vb: &Vb, cfg: &T5Config) -> anyhow::Result<Self> {
        let inner = cfg.num_heads * cfg.d_kv;
        let sa = vb.pp("layer").pp(0).pp("SelfAttention");
        let q = Linear::new(&sa.pp("q"), cfg.d_model, inner, false)?;
        let k = Linear::new(&sa.pp("k"), cfg.d_model, inner, false)?;
        let v = Linear::new(&sa.pp("v"), cfg.d_model, inner, false)?;
        Ok(Self {
            attn_norm: RmsNorm::new(
                &vb.pp("layer").pp(0).pp("layer_norm"),
                cfg.d_model,
                cfg.layer_norm_epsilon,
            )?,
            qkv: Linear::fuse(&[q, k, v]),
            o: Linear::new(&sa.pp("o"), inner, cfg.d_model, false)?,
            ff_norm: RmsNorm::new(
                &vb.pp("layer").pp(1).pp("layer_norm"),
                cfg.d_model,
                cfg.layer_norm_epsilon,
            )?,
            ff: FeedForward::new(&vb.pp("layer").pp(1).pp("DenseReluDense"), cfg)?,
            heads: cfg.num_heads,
        })
    }

    fn forward(&self, x: &Tensor, bias: &Tensor) -> Tensor {
        let h = self.attn_norm.forward(x);
        let qkv = self.qkv.forward(&h).chunk(3, -1);
        let (q, k, v) = (
            split_heads(&qkv[0], self.heads),
            split_heads(&qkv[1], self.heads),
            split_heads(&qkv[2], self.heads),
        );
        // T5 does not scale the scores by 1/sqrt(d); the position bias enters as an additive mask.
        let a = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            Some(bias),
            0.0,
            false,
            Some(1.0),
            false,
        );
        let x = x + self.o.forward(&merge_heads(&a));
        let h = self.ff_norm.forward(&x);
        &x + self.ff.forward(&h)
    }
}

pub struct T5Encoder {
    embed: Tensor,
    relative_bias: Tensor,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
    num_buckets: i64,
    max_distance: i64,
}

impl T5Encoder {
    pub fn new(vb: &Vb, cfg: &T5Config) -> anyhow::Result<Self> {
        let embed_name = if vb.contains("shared.weight") {
            "shared"
        } else {
            "encoder.embed_tokens"
        };
        let enc = vb.pp("encoder");
        let blocks = (0..cfg.num_layers)
            .map(|i| Block::new(&enc.pp("block").pp(i), cfg))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            embed: vb
                .pp(embed_name)
                .get("weight", &[cfg.vocab_size, cfg.d_model])?,
            relative_bias: enc
                .pp("block.0.layer.0.SelfAttention.relative_attention_bias")
                .get(
                    "weight",
                    &[cfg.relative_attention_num_buckets, cfg.num_heads],
                )?,
            blocks,
            final_norm: RmsNorm::new(
                &enc.pp("final_layer_norm"),
                cfg.d_model,
                cfg.layer_norm_epsilon,
            )?,
            num_buckets: cfg.relative_attention_num_buckets,
            max_distance: cfg.relative_attention_max_distance,
        })
    }

    /// Bidirectional relative position buckets, as `T5Attention._relative_position_bucket`.
    fn position_bias(&self, seq: i64) -> Tensor {
        let device = self.embed.device();
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
        let bias = self.relative_bias.index_select(0, &buckets.flatten(0, -1));
        bias.view([seq, seq, -1]).permute([2, 0, 1]).unsqueeze(0)
    }

    /// `ids`: `[batch, seq]`; returns the last hidden state `[batch, seq, d_model]`.
    /// No attention mask: the SD3 pipeline passes none, so padding tokens are attended to.
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        let (b, seq) = ids.size2().expect("[batch, seq] token ids");
        let mut x = self
            .embed
            .index_select(0, &ids.flatten(0, -1))
            .view([b, seq, -1]);
        let bias = self.position_bias(seq).to_kind(x.kind());
        for block in &self.blocks {
            x = block.forward(&x, &bias);
        }
        self.final_norm.forward(&x)
    }
}
