//! CLIP text encoders (OpenAI CLIP-L and OpenCLIP bigG) as transformers' `CLIPTextModel` /
//! `CLIPTextModelWithProjection`: causal self-attention, pre-LN blocks, final LayerNorm, pooled
//! output at the end-of-text token, optional text projection.
//!
//! Struct fields are named as the checkpoint keys (`text_model.encoder.layers.3.mlp.fc1` is
//! `text_model.encoder.layers[3].mlp.fc1`). Checkpoints come in two layouts, both loaded: the
//! tower under `text_model.` (transformers 4, and `CLIPTextModelWithProjection`), or at the root
//! (`CLIPTextModel` as transformers 5 writes it, without the wrapper).

use std::path::Path;

use serde::Deserialize;
use tch::{Kind, Tensor};

use super::layers::{attention, merge_heads, split_heads, Embedding, LayerNorm, Linear};
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
    pub hidden_act: HiddenAct,
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
fn default_act() -> HiddenAct {
    HiddenAct::QuickGelu
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
            hidden_act: HiddenAct::QuickGelu,
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
            hidden_act: HiddenAct::Gelu,
            layer_norm_eps: 1e-5,
            projection_dim: Some(1280),
            eos_token_id: 2,
        }
    }
}

/// `hidden_act` of a CLIP text config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum HiddenAct {
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP).
    QuickGelu,
    /// Exact (erf) GELU (OpenCLIP bigG).
    Gelu,
    /// GELU with the tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
}

impl TryFrom<String> for HiddenAct {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        super::choice(
            "hidden_act",
            &value,
            &[
                ("quick_gelu", Self::QuickGelu),
                ("gelu", Self::Gelu),
                ("gelu_new", Self::GeluTanh),
                ("gelu_pytorch_tanh", Self::GeluTanh),
            ],
        )
    }
}

impl HiddenAct {
    fn forward(self, x: &Tensor) -> Tensor {
        match self {
            Self::QuickGelu => x * (x * 1.702).sigmoid(),
            Self::Gelu => x.gelu("none"),
            Self::GeluTanh => x.gelu("tanh"),
        }
    }
}

/// transformers' `CLIPAttention` (`self_attn`): causal multi-head self-attention.
struct ClipAttention {
    /// `q_proj`, `k_proj`, `v_proj` fused (one GEMM).
    qkv_proj: Linear,
    out_proj: Linear,
    heads: i64,
}

impl ClipAttention {
    fn new(vb: &Vb, cfg: &ClipConfig) -> anyhow::Result<Self> {
        let h = cfg.hidden_size;
        let linear = |name: &str| Linear::new(&vb.pp(name), h, h, true);
        Ok(Self {
            qkv_proj: Linear::fuse(&[linear("q_proj")?, linear("k_proj")?, linear("v_proj")?]),
            out_proj: linear("out_proj")?,
            heads: cfg.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let qkv = self.qkv_proj.forward(x).chunk(3, -1);
        let q = split_heads(&qkv[0], self.heads);
        let k = split_heads(&qkv[1], self.heads);
        let v = split_heads(&qkv[2], self.heads);
        self.out_proj
            .forward(&merge_heads(&attention(&q, &k, &v, true)))
    }
}

/// transformers' `CLIPMLP` (`mlp`).
struct ClipMlp {
    fc1: Linear,
    fc2: Linear,
    activation: HiddenAct,
}

impl ClipMlp {
    fn new(vb: &Vb, cfg: &ClipConfig) -> anyhow::Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            fc1: Linear::new(&vb.pp("fc1"), h, i, true)?,
            fc2: Linear::new(&vb.pp("fc2"), i, h, true)?,
            activation: cfg.hidden_act,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.fc2
            .forward(&self.activation.forward(&self.fc1.forward(x)))
    }
}

/// transformers' `CLIPEncoderLayer` (`encoder.layers.N`): pre-LN attention and MLP residuals.
struct ClipEncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    mlp: ClipMlp,
}

impl ClipEncoderLayer {
    fn new(vb: &Vb, cfg: &ClipConfig) -> anyhow::Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        Ok(Self {
            layer_norm1: LayerNorm::new(&vb.pp("layer_norm1"), h, eps)?,
            self_attn: ClipAttention::new(&vb.pp("self_attn"), cfg)?,
            layer_norm2: LayerNorm::new(&vb.pp("layer_norm2"), h, eps)?,
            mlp: ClipMlp::new(&vb.pp("mlp"), cfg)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let x = x + self.self_attn.forward(&self.layer_norm1.forward(x));
        let h = self.mlp.forward(&self.layer_norm2.forward(&x));
        x + h
    }
}

/// transformers' `CLIPTextEmbeddings` (`embeddings`): token plus absolute position embeddings.
struct ClipTextEmbeddings {
    token_embedding: Embedding,
    position_embedding: Embedding,
}

impl ClipTextEmbeddings {
    fn new(vb: &Vb, cfg: &ClipConfig) -> anyhow::Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            token_embedding: Embedding::new(&vb.pp("token_embedding"), cfg.vocab_size, h)?,
            position_embedding: Embedding::new(
                &vb.pp("position_embedding"),
                cfg.max_position_embeddings,
                h,
            )?,
        })
    }

    /// `ids [b, seq]` -> `[b, seq, hidden]`; positions 0..seq.
    fn forward(&self, ids: &Tensor) -> Tensor {
        let seq = ids.size()[1];
        let positions = self.position_embedding.weight().narrow(0, 0, seq);
        self.token_embedding.forward(ids) + positions
    }
}

/// transformers' `CLIPEncoder` (`encoder`).
struct ClipEncoder {
    layers: Vec<ClipEncoderLayer>,
}

/// transformers' `CLIPTextTransformer` (`text_model`, or the checkpoint's root).
struct ClipTextTransformer {
    embeddings: ClipTextEmbeddings,
    encoder: ClipEncoder,
    final_layer_norm: LayerNorm,
    eos_token_id: i64,
}

impl ClipTextTransformer {
    fn new(vb: &Vb, cfg: &ClipConfig) -> anyhow::Result<Self> {
        let layers = vb.pp("encoder").pp("layers");
        Ok(Self {
            embeddings: ClipTextEmbeddings::new(&vb.pp("embeddings"), cfg)?,
            encoder: ClipEncoder {
                layers: (0..cfg.num_hidden_layers)
                    .map(|i| ClipEncoderLayer::new(&layers.pp(i), cfg))
                    .collect::<anyhow::Result<Vec<_>>>()?,
            },
            final_layer_norm: LayerNorm::new(
                &vb.pp("final_layer_norm"),
                cfg.hidden_size,
                cfg.layer_norm_eps,
            )?,
            eos_token_id: cfg.eos_token_id,
        })
    }

    /// `(hidden_states[-2], pooled)`: the input of the last encoder layer, and the final-
    /// LayerNormed state at the end-of-text position.
    fn forward(&self, ids: &Tensor) -> (Tensor, Tensor) {
        let mut x = self.embeddings.forward(ids);
        // With no layers, `hidden_states[-2]` would be the embeddings: the same as here.
        let mut penultimate = x.shallow_clone();
        for layer in &self.encoder.layers {
            penultimate = x.shallow_clone();
            x = layer.forward(&x);
        }
        let last = self.final_layer_norm.forward(&x);
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
        (penultimate, pooled)
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

/// transformers' `CLIPTextModel`, or `CLIPTextModelWithProjection` with `text_projection`.
pub struct ClipTextModel {
    text_model: ClipTextTransformer,
    text_projection: Option<Linear>,
}

impl ClipTextModel {
    /// `with_projection`: load `text_projection` (CLIPTextModelWithProjection). The tower is
    /// read under `text_model.` or at the root, whichever the checkpoint has.
    pub fn new(vb: &Vb, cfg: &ClipConfig, with_projection: bool) -> anyhow::Result<Self> {
        let text_model =
            vb.pp_first_containing(&["text_model", ""], "embeddings.token_embedding.weight")?;
        let text_projection = if with_projection {
            let p = cfg
                .projection_dim
                .ok_or_else(|| anyhow::anyhow!("CLIP config has no projection_dim"))?;
            Some(Linear::new(
                &vb.pp("text_projection"),
                cfg.hidden_size,
                p,
                false,
            )?)
        } else {
            None
        };
        Ok(Self {
            text_model: ClipTextTransformer::new(&text_model, cfg)?,
            text_projection,
        })
    }

    /// `ids`: `[batch, seq]` int64 on the model's device.
    pub fn forward(&self, ids: &Tensor) -> ClipOutput {
        let (penultimate, pooled) = self.text_model.forward(ids);
        let text_embeds = self.text_projection.as_ref().map(|p| p.forward(&pooled));
        ClipOutput {
            penultimate,
            pooled,
            text_embeds,
        }
    }
}
