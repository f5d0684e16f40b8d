//! CLIP text encoders (OpenAI CLIP-L and OpenCLIP bigG) as transformers' `CLIPTextModel` /
//! `CLIPTextModelWithProjection`: causal self-attention, pre-LN blocks, final LayerNorm, pooled
//! output at the end-of-text token, optional text projection.

use std::path::Path;

use serde::Deserialize;
use tch::{Kind, Tensor};

use super::layers::{attention, merge_heads, split_heads, LayerNorm, Linear};
use super::weights::Vb;

#[derive(Debug, Clone, Deserialize)]
pub struct ClipConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: i64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub projection_dim: Option<i64>,
    #[serde(default = "default_eos")]
    pub eos_token_id: i64,
}

fn default_positions() -> i64 {
    77
}
fn default_act() -> String {
    "quick_gelu".into()
}
fn default_ln_eps() -> f64 {
    1e-5
}
fn default_eos() -> i64 {
    2
}

impl ClipConfig {
    /// Reads `config.json` of a text encoder folder (a bare text config or a full CLIP config
    /// with a `text_config` section).
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("config.json");
        let mut value = super::read_json(&path)?;
        if let Some(inner) = value.get("text_config").cloned() {
            value = inner;
        }
        serde_json::from_value(value)
            .map_err(|e| anyhow::anyhow!("invalid CLIP config {}: {e}", path.display()))
    }

    /// OpenAI CLIP ViT-L/14 text tower.
    pub fn clip_l() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            projection_dim: Some(768),
            eos_token_id: 2,
        }
    }

    /// OpenCLIP ViT-bigG/14 text tower.
    pub fn clip_g() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 1280,
            intermediate_size: 5120,
            num_hidden_layers: 32,
            num_attention_heads: 20,
            max_position_embeddings: 77,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-5,
            projection_dim: Some(1280),
            eos_token_id: 2,
        }
    }
}

enum Activation {
    QuickGelu,
    Gelu,
    GeluTanh,
}

impl Activation {
    fn parse(name: &str) -> anyhow::Result<Self> {
        Ok(match name {
            "quick_gelu" => Self::QuickGelu,
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Self::GeluTanh,
            other => anyhow::bail!("unsupported CLIP activation `{other}`"),
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Self::QuickGelu => x * (x * 1.702).sigmoid(),
            Self::Gelu => x.gelu("none"),
            Self::GeluTanh => x.gelu("tanh"),
        }
    }
}

struct EncoderLayer {
    ln1: LayerNorm,
    qkv: Linear,
    out: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: i64,
    act: Activation,
}

impl EncoderLayer {
    fn new(vb: &Vb, cfg: &ClipConfig) -> anyhow::Result<Self> {
        let h = cfg.hidden_size;
        let attn = vb.pp("self_attn");
        let q = Linear::new(&attn.pp("q_proj"), h, h, true)?;
        let k = Linear::new(&attn.pp("k_proj"), h, h, true)?;
        let v = Linear::new(&attn.pp("v_proj"), h, h, true)?;
        Ok(Self {
            ln1: LayerNorm::new(&vb.pp("layer_norm1"), h, cfg.layer_norm_eps)?,
            qkv: Linear::fuse(&[q, k, v]),
            out: Linear::new(&attn.pp("out_proj"), h, h, true)?,
            ln2: LayerNorm::new(&vb.pp("layer_norm2"), h, cfg.layer_norm_eps)?,
            fc1: Linear::new(&vb.pp("mlp").pp("fc1"), h, cfg.intermediate_size, true)?,
            fc2: Linear::new(&vb.pp("mlp").pp("fc2"), cfg.intermediate_size, h, true)?,
            heads: cfg.num_attention_heads,
            act: Activation::parse(&cfg.hidden_act)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.ln1.forward(x);
        let qkv = self.qkv.forward(&h).chunk(3, -1);
        let (q, k, v) = (
            split_heads(&qkv[0], self.heads),
            split_heads(&qkv[1], self.heads),
            split_heads(&qkv[2], self.heads),
        );
        let a = merge_heads(&attention(&q, &k, &v, true));
        let x = x + self.out.forward(&a);
        let h = self
            .fc2
            .forward(&self.act.forward(&self.fc1.forward(&self.ln2.forward(&x))));
        x + h
    }
}

/// What the diffusion pipelines take from a CLIP text encoder.
pub struct ClipOutput {
    /// `hidden_states[-2]`: the output of the penultimate layer, before the final LayerNorm.
    pub penultimate: Tensor,
    /// The final-LayerNormed hidden state at the end-of-text position.
    pub pooled: Tensor,
    /// `pooled` through the text projection, when the model has one (`text_embeds`).
    pub text_embeds: Option<Tensor>,
}

pub struct ClipTextModel {
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_ln: LayerNorm,
    projection: Option<Linear>,
    eos_token_id: i64,
}

impl ClipTextModel {
    /// `with_projection`: load `text_projection` (CLIPTextModelWithProjection).
    pub fn new(vb: &Vb, cfg: &ClipConfig, with_projection: bool) -> anyhow::Result<Self> {
        let tm = vb.pp("text_model");
        let emb = tm.pp("embeddings");
        let h = cfg.hidden_size;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(&tm.pp("encoder").pp("layers").pp(i), cfg))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let projection = if with_projection {
            let p = cfg
                .projection_dim
                .ok_or_else(|| anyhow::anyhow!("CLIP config has no projection_dim"))?;
            Some(Linear::new(&vb.pp("text_projection"), h, p, false)?)
        } else {
            None
        };
        Ok(Self {
            token_embedding: emb
                .pp("token_embedding")
                .get("weight", &[cfg.vocab_size, h])?,
            position_embedding: emb
                .pp("position_embedding")
                .get("weight", &[cfg.max_position_embeddings, h])?,
            layers,
            final_ln: LayerNorm::new(&tm.pp("final_layer_norm"), h, cfg.layer_norm_eps)?,
            projection,
            eos_token_id: cfg.eos_token_id,
        })
    }

    /// `ids`: `[batch, seq]` int64 on the model's device.
    pub fn forward(&self, ids: &Tensor) -> ClipOutput {
        let (_b, seq) = ids.size2().expect("[batch, seq] token ids");
        let positions = self.position_embedding.narrow(0, 0, seq);
        let mut x = self.token_embedding.index_select(0, &ids.flatten(0, -1));
        x = x.view([ids.size()[0], seq, -1]) + positions;
        let mut penultimate = None;
        let n = self.layers.len();
        for (i, layer) in self.layers.iter().enumerate() {
            if i + 1 == n {
                penultimate = Some(x.shallow_clone());
            }
            x = layer.forward(&x);
        }
        let penultimate = penultimate.unwrap_or_else(|| x.shallow_clone());
        let last = self.final_ln.forward(&x);
        // transformers' pooling rule: the legacy configs (eos_token_id == 2) take the position of
        // the largest id, which is `<|endoftext|>` in the real vocabulary; others take the first
        // position holding eos_token_id.
        let eos_pos = if self.eos_token_id == 2 {
            ids.argmax(-1, false)
        } else {
            ids.eq(self.eos_token_id)
                .to_kind(Kind::Int)
                .argmax(-1, false)
        };
        let batch = Tensor::arange(ids.size()[0], (Kind::Int64, ids.device()));
        let pooled = last.index(&[Some(batch), Some(eos_pos)]);
        let text_embeds = self.projection.as_ref().map(|p| p.forward(&pooled));
        ClipOutput {
            penultimate,
            pooled,
            text_embeds,
        }
    }
}
