//! The SD3 MMDiT (diffusers' `SD3Transformer2DModel`): patch embedding with a centre-cropped
//! positional table, timestep + pooled-text conditioning, adaLN-zero joint blocks over
//! [image tokens, context tokens], a context-pre-only last block, and the final modulated layer.
//!
//! Struct fields are named as the checkpoint keys (`transformer_blocks.3.norm1_context.linear`
//! is `transformer_blocks[3].norm1_context.linear`); fused projections say which keys they fuse.
//!
//! One file, not one per block: it follows `transformer_sd3.py` and the checkpoint's key tree
//! from the root to the leaves, so that a reader holds one model next to one diffusers file and
//! its weight keys; the shared layers live in `layers.rs` and `embeddings.rs`.

use std::path::Path;

use serde::Deserialize;
use tch::Tensor;

use super::embeddings::{TimestepEmbedding, Timesteps};
use super::layers::{attention, merge_heads, split_heads, Conv2d, LayerNorm, Linear, RmsNorm};
use super::weights::Vb;

#[derive(Debug, Clone, Deserialize)]
pub struct MmditConfig {
    #[serde(default = "default_sample")]
    pub sample_size: i64,
    pub patch_size: i64,
    pub in_channels: i64,
    pub num_layers: i64,
    pub attention_head_dim: i64,
    pub num_attention_heads: i64,
    pub joint_attention_dim: i64,
    pub caption_projection_dim: i64,
    pub pooled_projection_dim: i64,
    #[serde(default)]
    pub out_channels: Option<i64>,
    #[serde(default)]
    pub pos_embed_max_size: Option<i64>,
    #[serde(default)]
    pub dual_attention_layers: Vec<i64>,
    /// `null` (SD3) or `"rms_norm"` (SD3.5).
    #[serde(default)]
    pub qk_norm: Option<QkNorm>,
}

/// `qk_norm` of the transformer config: the normalisation of queries and keys per head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum QkNorm {
    RmsNorm,
}

impl TryFrom<String> for QkNorm {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        super::choice("qk_norm", &value, &[("rms_norm", Self::RmsNorm)])
    }
}

fn default_sample() -> i64 {
    128
}

impl MmditConfig {
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        super::read_config(&dir.join("config.json"), "transformer")
    }

    /// stabilityai/stable-diffusion-3-medium-diffusers `transformer/config.json`.
    pub fn sd3_medium() -> Self {
        Self {
            sample_size: 128,
            patch_size: 2,
            in_channels: 16,
            num_layers: 24,
            attention_head_dim: 64,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            caption_projection_dim: 1536,
            pooled_projection_dim: 2048,
            out_channels: Some(16),
            pos_embed_max_size: Some(192),
            dual_attention_layers: Vec::new(),
            qk_norm: None,
        }
    }

    pub fn inner_dim(&self) -> i64 {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> i64 {
        self.out_channels.unwrap_or(self.in_channels)
    }
}

/// `x * (1 + scale) + shift` with per-sample `[b, d]` modulation.
fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Tensor {
    // One kernel over the tokens (`shift + x * (1 + scale)`) instead of a multiply and an add.
    shift.unsqueeze(1).addcmul(x, &(scale.unsqueeze(1) + 1.0))
}

/// `x + gate * y` with a per-sample `[b, d]` gate.
fn gated(x: &Tensor, gate: &Tensor, y: &Tensor) -> Tensor {
    x.addcmul(&gate.unsqueeze(1), y)
}

/// The six adaLN-zero modulation vectors `[b, d]`, in the order the `linear` layer emits them.
struct Modulation {
    shift_msa: Tensor,
    scale_msa: Tensor,
    gate_msa: Tensor,
    shift_mlp: Tensor,
    scale_mlp: Tensor,
    gate_mlp: Tensor,
}

/// diffusers' `AdaLayerNormZero` (`norm1`, `norm1_context`): LayerNorm without affine
/// parameters, modulated by `linear(silu(temb))` split into six [`Modulation`] chunks.
struct AdaLayerNormZero {
    linear: Linear,
    norm: LayerNorm,
}

impl AdaLayerNormZero {
    fn new(vb: &Vb, dim: i64) -> anyhow::Result<Self> {
        Ok(Self {
            linear: Linear::new(&vb.pp("linear"), dim, 6 * dim, true)?,
            norm: LayerNorm::no_affine(dim, 1e-6),
        })
    }

    /// The attention input `norm(x) * (1 + scale_msa) + shift_msa`, and the modulation.
    fn forward(&self, x: &Tensor, silu_temb: &Tensor) -> (Tensor, Modulation) {
        let emb = self.linear.forward(silu_temb).chunk(6, 1);
        let chunk = |i: usize| emb[i].shallow_clone();
        let m = Modulation {
            shift_msa: chunk(0),
            scale_msa: chunk(1),
            gate_msa: chunk(2),
            shift_mlp: chunk(3),
            scale_mlp: chunk(4),
            gate_mlp: chunk(5),
        };
        (
            modulate(&self.norm.forward(x), &m.shift_msa, &m.scale_msa),
            m,
        )
    }
}

/// diffusers' `AdaLayerNormContinuous` (`norm_out`, and `norm1_context` of the last block):
/// LayerNorm without affine parameters, modulated by `linear(silu(temb))` split into
/// (scale, shift) — scale first, unlike adaLN-zero.
struct AdaLayerNormContinuous {
    linear: Linear,
    norm: LayerNorm,
}

impl AdaLayerNormContinuous {
    fn new(vb: &Vb, dim: i64) -> anyhow::Result<Self> {
        Ok(Self {
            linear: Linear::new(&vb.pp("linear"), dim, 2 * dim, true)?,
            norm: LayerNorm::no_affine(dim, 1e-6),
        })
    }

    fn forward(&self, x: &Tensor, silu_temb: &Tensor) -> Tensor {
        let emb = self.linear.forward(silu_temb).chunk(2, 1);
        let (scale, shift) = (&emb[0], &emb[1]);
        modulate(&self.norm.forward(x), shift, scale)
    }
}

/// diffusers' `FeedForward` with GELU(tanh) (`ff`, `ff_context`): `net.0` is the activation with
/// its input projection, `net.1` a dropout, `net.2` the output projection.
struct FeedForward {
    /// `net.0.proj`: D -> 4D.
    net_0_proj: Linear,
    /// `net.2`: 4D -> D.
    net_2: Linear,
}

impl FeedForward {
    fn new(vb: &Vb, dim: i64) -> anyhow::Result<Self> {
        Ok(Self {
            net_0_proj: Linear::new(&vb.pp("net.0.proj"), dim, 4 * dim, true)?,
            net_2: Linear::new(&vb.pp("net.2"), 4 * dim, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.net_2.forward(&self.net_0_proj.forward(x).gelu("tanh"))
    }
}

/// One stream's q/k/v split into heads, after the optional RMS qk-norm (SD3.5), with the q and k
/// from before the norm (what the R2F+ attention maps use).
struct Projected {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pre_norm: Tensor,
    k_pre_norm: Tensor,
}

/// One stream's fused q/k/v projection split into heads, with the optional RMS qk-norm.
fn project_qkv(
    x: &Tensor,
    to_qkv: &Linear,
    norm_q: Option<&RmsNorm>,
    norm_k: Option<&RmsNorm>,
    heads: i64,
) -> Projected {
    let qkv = to_qkv.forward(x).chunk(3, -1);
    let q_pre_norm = split_heads(&qkv[0], heads);
    let k_pre_norm = split_heads(&qkv[1], heads);
    let v = split_heads(&qkv[2], heads);
    let q = match norm_q {
        Some(norm) => norm.forward(&q_pre_norm),
        None => q_pre_norm.shallow_clone(),
    };
    let k = match norm_k {
        Some(norm) => norm.forward(&k_pre_norm),
        None => k_pre_norm.shallow_clone(),
    };
    Projected {
        q,
        k,
        v,
        q_pre_norm,
        k_pre_norm,
    }
}

/// The image-to-text attention probabilities of one block, as the official R2F+ hook computes
/// them (`docs/r2fplus.md` §1.5): `softmax(q_img · k_txtᵀ · (1/√head_dim))` over the text keys
/// only, from the projections **before** any qk-norm, scaled after the matmul.
/// `[b, heads, n_image, n_text]`.
fn text_attention_map(q_image: &Tensor, k_text: &Tensor) -> Tensor {
    let scale = 1.0 / (q_image.size()[3] as f64).sqrt();
    (q_image.matmul(&k_text.transpose(-2, -1)) * scale).softmax(-1, q_image.kind())
}

/// diffusers' joint `Attention` (`attn`): image-token projections (`to_q`, `to_k`, `to_v`,
/// `to_out.0`) and context-token projections (`add_q_proj`, `add_k_proj`, `add_v_proj`,
/// `to_add_out`) around one attention over both. `AddOut` is the context output projection:
/// a [`Linear`] (`to_add_out`) in full blocks, `()` in the last, context-pre-only block, which
/// has none.
struct JointAttention<AddOut> {
    /// `to_q`, `to_k`, `to_v` fused (one GEMM).
    to_qkv: Linear,
    norm_q: Option<RmsNorm>,
    norm_k: Option<RmsNorm>,
    /// `add_q_proj`, `add_k_proj`, `add_v_proj` fused.
    to_added_qkv: Linear,
    norm_added_q: Option<RmsNorm>,
    norm_added_k: Option<RmsNorm>,
    /// `to_out.0`.
    to_out: Linear,
    to_add_out: AddOut,
    heads: i64,
}

impl<AddOut> JointAttention<AddOut> {
    fn with_add_out(vb: &Vb, cfg: &MmditConfig, to_add_out: AddOut) -> anyhow::Result<Self> {
        let (d, hd) = (cfg.inner_dim(), cfg.attention_head_dim);
        let linear = |name: &str| Linear::new(&vb.pp(name), d, d, true);
        let qk_norm = |name: &str| -> anyhow::Result<Option<RmsNorm>> {
            Ok(match cfg.qk_norm {
                Some(QkNorm::RmsNorm) => Some(RmsNorm::new(&vb.pp(name), hd, 1e-6)?),
                None => None,
            })
        };
        Ok(Self {
            to_qkv: Linear::fuse(&[linear("to_q")?, linear("to_k")?, linear("to_v")?]),
            norm_q: qk_norm("norm_q")?,
            norm_k: qk_norm("norm_k")?,
            to_added_qkv: Linear::fuse(&[
                linear("add_q_proj")?,
                linear("add_k_proj")?,
                linear("add_v_proj")?,
            ]),
            norm_added_q: qk_norm("norm_added_q")?,
            norm_added_k: qk_norm("norm_added_k")?,
            to_out: linear("to_out.0")?,
            to_add_out,
            heads: cfg.num_attention_heads,
        })
    }

    /// One attention over [image tokens, context tokens] (that order, as diffusers'
    /// `JointAttnProcessor2_0`): the image part through `to_out`, the context part unprojected,
    /// and, when `want_map`, the block's [`text_attention_map`].
    fn attend(
        &self,
        hidden: &Tensor,
        context: &Tensor,
        want_map: bool,
    ) -> (Tensor, Tensor, Option<Tensor>) {
        let (norm_q, norm_k) = (self.norm_q.as_ref(), self.norm_k.as_ref());
        let image = project_qkv(hidden, &self.to_qkv, norm_q, norm_k, self.heads);
        let (norm_q, norm_k) = (self.norm_added_q.as_ref(), self.norm_added_k.as_ref());
        let text = project_qkv(context, &self.to_added_qkv, norm_q, norm_k, self.heads);
        let map = want_map.then(|| text_attention_map(&image.q_pre_norm, &text.k_pre_norm));
        let q = Tensor::cat(&[image.q, text.q], 2);
        let k = Tensor::cat(&[image.k, text.k], 2);
        let v = Tensor::cat(&[image.v, text.v], 2);
        let out = merge_heads(&attention(&q, &k, &v, false));
        let n_image = hidden.size()[1];
        let hidden_out = out.narrow(1, 0, n_image);
        let context_out = out.narrow(1, n_image, out.size()[1] - n_image);
        (self.to_out.forward(&hidden_out), context_out, map)
    }

    /// [`text_attention_map`] alone (no attention): the image queries and text keys only.
    fn text_map(&self, hidden: &Tensor, context: &Tensor) -> Tensor {
        let q = split_heads(&self.to_qkv.forward(hidden).chunk(3, -1)[0], self.heads);
        let k = split_heads(
            &self.to_added_qkv.forward(context).chunk(3, -1)[1],
            self.heads,
        );
        text_attention_map(&q, &k)
    }
}

impl JointAttention<Linear> {
    fn new(vb: &Vb, cfg: &MmditConfig) -> anyhow::Result<Self> {
        let d = cfg.inner_dim();
        Self::with_add_out(vb, cfg, Linear::new(&vb.pp("to_add_out"), d, d, true)?)
    }

    /// (image tokens, context tokens) attention outputs, both projected.
    fn forward(
        &self,
        hidden: &Tensor,
        context: &Tensor,
        want_map: bool,
    ) -> (Tensor, Tensor, Option<Tensor>) {
        let (hidden_out, context_out, map) = self.attend(hidden, context, want_map);
        (hidden_out, self.to_add_out.forward(&context_out), map)
    }
}

impl JointAttention<()> {
    fn new(vb: &Vb, cfg: &MmditConfig) -> anyhow::Result<Self> {
        Self::with_add_out(vb, cfg, ())
    }

    /// The image tokens' attention output (the context tokens only serve as keys and values).
    fn forward(&self, hidden: &Tensor, context: &Tensor) -> Tensor {
        self.attend(hidden, context, false).0
    }
}

/// The second half of a stream in a joint block, after attention: the gated attention residual,
/// then the gated feed-forward residual on the re-normalised, modulated tokens.
fn attention_and_ff_residuals(
    x: &Tensor,
    attn_output: &Tensor,
    m: &Modulation,
    norm2: &LayerNorm,
    ff: &FeedForward,
) -> Tensor {
    let x = gated(x, &m.gate_msa, attn_output);
    let ff_output = ff.forward(&modulate(&norm2.forward(&x), &m.shift_mlp, &m.scale_mlp));
    gated(&x, &m.gate_mlp, &ff_output)
}

/// diffusers' `JointTransformerBlock`: both streams modulated by adaLN-zero, one joint
/// attention, and a feed-forward per stream.
struct JointTransformerBlock {
    norm1: AdaLayerNormZero,
    norm1_context: AdaLayerNormZero,
    attn: JointAttention<Linear>,
    norm2: LayerNorm,
    ff: FeedForward,
    norm2_context: LayerNorm,
    ff_context: FeedForward,
}

impl JointTransformerBlock {
    fn new(vb: &Vb, cfg: &MmditConfig) -> anyhow::Result<Self> {
        let d = cfg.inner_dim();
        Ok(Self {
            norm1: AdaLayerNormZero::new(&vb.pp("norm1"), d)?,
            norm1_context: AdaLayerNormZero::new(&vb.pp("norm1_context"), d)?,
            attn: JointAttention::<Linear>::new(&vb.pp("attn"), cfg)?,
            norm2: LayerNorm::no_affine(d, 1e-6),
            ff: FeedForward::new(&vb.pp("ff"), d)?,
            norm2_context: LayerNorm::no_affine(d, 1e-6),
            ff_context: FeedForward::new(&vb.pp("ff_context"), d)?,
        })
    }

    /// `silu_temb`: SiLU of the conditioning embedding (shared by every block).
    /// Returns the updated (image tokens, context tokens), and the block's text attention map
    /// when `want_map`.
    fn forward(
        &self,
        hidden: &Tensor,
        context: &Tensor,
        silu_temb: &Tensor,
        want_map: bool,
    ) -> (Tensor, Tensor, Option<Tensor>) {
        let (norm_hidden, m) = self.norm1.forward(hidden, silu_temb);
        let (norm_context, c_m) = self.norm1_context.forward(context, silu_temb);
        let (attn_output, context_attn_output, map) =
            self.attn.forward(&norm_hidden, &norm_context, want_map);
        let hidden = attention_and_ff_residuals(hidden, &attn_output, &m, &self.norm2, &self.ff);
        let context = attention_and_ff_residuals(
            context,
            &context_attn_output,
            &c_m,
            &self.norm2_context,
            &self.ff_context,
        );
        (hidden, context, map)
    }
}

/// The last joint block (`context_pre_only`): the context tokens only enter the attention as
/// keys and values, through an `AdaLayerNormContinuous`; no context output projection or
/// feed-forward, and no context output.
struct ContextPreOnlyJointBlock {
    norm1: AdaLayerNormZero,
    norm1_context: AdaLayerNormContinuous,
    attn: JointAttention<()>,
    norm2: LayerNorm,
    ff: FeedForward,
}

impl ContextPreOnlyJointBlock {
    fn new(vb: &Vb, cfg: &MmditConfig) -> anyhow::Result<Self> {
        let d = cfg.inner_dim();
        Ok(Self {
            norm1: AdaLayerNormZero::new(&vb.pp("norm1"), d)?,
            norm1_context: AdaLayerNormContinuous::new(&vb.pp("norm1_context"), d)?,
            attn: JointAttention::<()>::new(&vb.pp("attn"), cfg)?,
            norm2: LayerNorm::no_affine(d, 1e-6),
            ff: FeedForward::new(&vb.pp("ff"), d)?,
        })
    }

    /// Returns the updated image tokens.
    fn forward(&self, hidden: &Tensor, context: &Tensor, silu_temb: &Tensor) -> Tensor {
        let (norm_hidden, m) = self.norm1.forward(hidden, silu_temb);
        let norm_context = self.norm1_context.forward(context, silu_temb);
        let attn_output = self.attn.forward(&norm_hidden, &norm_context);
        attention_and_ff_residuals(hidden, &attn_output, &m, &self.norm2, &self.ff)
    }

    /// The block's text attention map only: its attention output does not feed any map.
    fn text_map(&self, hidden: &Tensor, context: &Tensor, silu_temb: &Tensor) -> Tensor {
        let (norm_hidden, _) = self.norm1.forward(hidden, silu_temb);
        let norm_context = self.norm1_context.forward(context, silu_temb);
        self.attn.text_map(&norm_hidden, &norm_context)
    }
}

/// diffusers' `PatchEmbed` (`pos_embed`): a patch-size-strided conv and the positional table,
/// centre-cropped to the patch grid.
struct PatchEmbed {
    proj: Conv2d,
    /// `[1, max * max, D]` for a `max x max` grid (`pos_embed_max_size`).
    pos_embed: Tensor,
    pos_embed_max_size: i64,
}

impl PatchEmbed {
    fn new(vb: &Vb, cfg: &MmditConfig) -> anyhow::Result<Self> {
        let (d, p) = (cfg.inner_dim(), cfg.patch_size);
        let max = cfg
            .pos_embed_max_size
            .ok_or_else(|| anyhow::anyhow!("transformer config has no pos_embed_max_size"))?;
        Ok(Self {
            proj: Conv2d::new(&vb.pp("proj"), cfg.in_channels, d, p, p, 0)?,
            pos_embed: vb.get("pos_embed", &[1, max * max, d])?,
            pos_embed_max_size: max,
        })
    }

    /// The positional table centre-cropped to an `h x w` patch grid.
    fn cropped_pos_embed(&self, h: i64, w: i64) -> anyhow::Result<Tensor> {
        let max = self.pos_embed_max_size;
        if h > max || w > max {
            anyhow::bail!(
                "image of {h}x{w} patches exceeds the model's positional table of {max}x{max}"
            );
        }
        let (top, left) = ((max - h) / 2, (max - w) / 2);
        Ok(self
            .pos_embed
            .view([1, max, max, -1])
            .narrow(1, top, h)
            .narrow(2, left, w)
            .reshape([1, h * w, -1]))
    }

    /// `latents [b, c, h, w]` -> patch tokens `[b, (h/p) * (w/p), D]` with positions added.
    fn forward(&self, latents: &Tensor, grid_h: i64, grid_w: i64) -> anyhow::Result<Tensor> {
        let x = self.proj.forward(latents).flatten(2, -1).transpose(1, 2);
        Ok((x + self.cropped_pos_embed(grid_h, grid_w)?).to_kind(latents.kind()))
    }
}

/// diffusers' `CombinedTimestepTextProjEmbeddings` (`time_text_embed`): the embedded timestep
/// plus the projected pooled text embedding.
struct CombinedTimestepTextProjEmbeddings {
    time_proj: Timesteps,
    timestep_embedder: TimestepEmbedding,
    text_embedder: TimestepEmbedding,
}

impl CombinedTimestepTextProjEmbeddings {
    fn new(vb: &Vb, cfg: &MmditConfig) -> anyhow::Result<Self> {
        let d = cfg.inner_dim();
        Ok(Self {
            time_proj: Timesteps {
                num_channels: 256,
                flip_sin_to_cos: true,
                downscale_freq_shift: 0.0,
            },
            timestep_embedder: TimestepEmbedding::new(&vb.pp("timestep_embedder"), 256, d)?,
            text_embedder: TimestepEmbedding::new(
                &vb.pp("text_embedder"),
                cfg.pooled_projection_dim,
                d,
            )?,
        })
    }

    fn forward(&self, timestep: &Tensor, pooled: &Tensor) -> Tensor {
        let t = self.time_proj.forward(timestep).to_kind(pooled.kind());
        self.timestep_embedder.forward(&t) + self.text_embedder.forward(pooled)
    }
}

pub struct Mmdit {
    cfg: MmditConfig,
    pos_embed: PatchEmbed,
    time_text_embed: CombinedTimestepTextProjEmbeddings,
    context_embedder: Linear,
    /// `transformer_blocks.0` to `transformer_blocks.{num_layers - 2}`.
    transformer_blocks: Vec<JointTransformerBlock>,
    /// `transformer_blocks.{num_layers - 1}`.
    last_transformer_block: ContextPreOnlyJointBlock,
    norm_out: AdaLayerNormContinuous,
    proj_out: Linear,
}

impl Mmdit {
    pub fn new(vb: &Vb, cfg: &MmditConfig) -> anyhow::Result<Self> {
        if !cfg.dual_attention_layers.is_empty() {
            anyhow::bail!(
                "transformer config uses dual_attention_layers (SD3.5 MMDiT-X), which r2f does not support"
            );
        }
        let d = cfg.inner_dim();
        if d != cfg.caption_projection_dim {
            anyhow::bail!(
                "transformer config: heads x head_dim = {d} must equal caption_projection_dim = {}",
                cfg.caption_projection_dim
            );
        }
        if cfg.num_layers < 1 {
            anyhow::bail!("transformer config: num_layers must be at least 1");
        }
        let blocks = vb.pp("transformer_blocks");
        let last = cfg.num_layers - 1;
        let p = cfg.patch_size;
        Ok(Self {
            pos_embed: PatchEmbed::new(&vb.pp("pos_embed"), cfg)?,
            time_text_embed: CombinedTimestepTextProjEmbeddings::new(
                &vb.pp("time_text_embed"),
                cfg,
            )?,
            context_embedder: Linear::new(
                &vb.pp("context_embedder"),
                cfg.joint_attention_dim,
                cfg.caption_projection_dim,
                true,
            )?,
            transformer_blocks: (0..last)
                .map(|i| JointTransformerBlock::new(&blocks.pp(i), cfg))
                .collect::<anyhow::Result<Vec<_>>>()?,
            last_transformer_block: ContextPreOnlyJointBlock::new(&blocks.pp(last), cfg)?,
            norm_out: AdaLayerNormContinuous::new(&vb.pp("norm_out"), d)?,
            proj_out: Linear::new(&vb.pp("proj_out"), d, p * p * cfg.out_channels(), true)?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &MmditConfig {
        &self.cfg
    }

    /// Checks that a latent of `h x w` fits the positional table and the patch size.
    pub fn check_latent_size(&self, h: i64, w: i64) -> anyhow::Result<()> {
        let p = self.cfg.patch_size;
        if h % p != 0 || w % p != 0 {
            anyhow::bail!("latent size {h}x{w} is not a multiple of the patch size {p}");
        }
        self.pos_embed.cropped_pos_embed(h / p, w / p).map(|_| ())
    }

    /// The patch tokens, the SiLU'd conditioning embedding and the embedded context of a
    /// forward's inputs, with the patch grid.
    fn embed(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        context: &Tensor,
        pooled: &Tensor,
    ) -> anyhow::Result<(Tensor, Tensor, Tensor, (i64, i64))> {
        let (_b, _c, h, w) = latents.size4()?;
        let p = self.cfg.patch_size;
        let grid = (h / p, w / p);
        let hidden = self.pos_embed.forward(latents, grid.0, grid.1)?;
        let silu_temb = self.time_text_embed.forward(timestep, pooled).silu();
        Ok((
            hidden,
            silu_temb,
            self.context_embedder.forward(context),
            grid,
        ))
    }

    /// `latents [b, c, h, w]`, `timestep [b]` (sigma x 1000, float), `context [b, seq, joint]`
    /// (diffusers' `encoder_hidden_states`), `pooled [b, pooled_dim]` -> velocity
    /// `[b, c_out, h, w]`.
    pub fn forward(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        context: &Tensor,
        pooled: &Tensor,
    ) -> anyhow::Result<Tensor> {
        let b = latents.size()[0];
        let (mut hidden, silu_temb, mut context, (grid_h, grid_w)) =
            self.embed(latents, timestep, context, pooled)?;
        for block in &self.transformer_blocks {
            (hidden, context, _) = block.forward(&hidden, &context, &silu_temb, false);
        }
        let hidden = self
            .last_transformer_block
            .forward(&hidden, &context, &silu_temb);
        let hidden = self.norm_out.forward(&hidden, &silu_temb);
        let hidden = self.proj_out.forward(&hidden);
        // Unpatchify: [b, gh*gw, p*p*c] -> [b, c, gh*p, gw*p].
        let p = self.cfg.patch_size;
        let co = self.cfg.out_channels();
        Ok(hidden
            .view([b, grid_h, grid_w, p, p, co])
            .permute([0, 5, 1, 3, 2, 4])
            .reshape([b, co, grid_h * p, grid_w * p]))
    }

    /// The text attention map of every block, `transformer_blocks.0` to the last (each
    /// `[b, heads, n_image, n_text]`; `docs/r2fplus.md` §1.5, §3.2), from the same inputs as
    /// [`Mmdit::forward`]. Stops after the last block's map: nothing later feeds a map.
    /// Differentiable with respect to `latents`, for the R2F+ bbox guidance.
    pub fn text_attention_maps(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        context: &Tensor,
        pooled: &Tensor,
    ) -> anyhow::Result<Vec<Tensor>> {
        let (mut hidden, silu_temb, mut context, _) =
            self.embed(latents, timestep, context, pooled)?;
        let mut maps = Vec::with_capacity(self.cfg.num_layers as usize);
        for block in &self.transformer_blocks {
            let map;
            (hidden, context, map) = block.forward(&hidden, &context, &silu_temb, true);
            maps.extend(map);
        }
        maps.push(
            self.last_transformer_block
                .text_map(&hidden, &context, &silu_temb),
        );
        Ok(maps)
    }

    /// The gradient with respect to `latents` of `loss(reduced maps)`, where `reduce` first turns
    /// each block's text attention map (as [`Mmdit::text_attention_maps`]) into what the loss
    /// needs (e.g. the token means of a few objects). With `recompute`, only each block's inputs
    /// are kept: the forward runs without gradients, then the backward recomputes one block at a
    /// time (the activations of one block instead of all, for one extra forward) and chains the
    /// vector-Jacobian products block by block. Both ways give the same gradient.
    #[allow(clippy::too_many_arguments)]
    pub fn text_map_gradient(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        context: &Tensor,
        pooled: &Tensor,
        reduce: &dyn Fn(&Tensor) -> Tensor,
        loss: &dyn Fn(&[Tensor]) -> anyhow::Result<Tensor>,
        recompute: bool,
    ) -> anyhow::Result<Tensor> {
        let backward = |outputs: &Tensor, inputs: &[&Tensor]| -> Vec<Tensor> {
            Tensor::run_backward(&[outputs], inputs, false, false)
        };
        if !recompute {
            return tch::with_grad(|| {
                let x = latents.detach().set_requires_grad(true);
                let maps = self.text_attention_maps(&x, timestep, context, pooled)?;
                let reduced: Vec<Tensor> = maps.iter().map(reduce).collect();
                let objective = loss(&reduced)?;
                Ok(backward(&objective, &[&x]).remove(0))
            });
        }
        // 1. Forward without gradients, keeping every block's inputs and reduced map.
        let (hidden, silu_temb, context, (gh, gw)) =
            tch::no_grad(|| self.embed(latents, timestep, context, pooled))?;
        let last = self.transformer_blocks.len();
        let mut inputs = Vec::with_capacity(last + 1);
        let mut reduced = Vec::with_capacity(last + 1);
        tch::no_grad(|| {
            let (mut h, mut c) = (hidden, context);
            for block in &self.transformer_blocks {
                let (h_next, c_next, map) = block.forward(&h, &c, &silu_temb, true);
                reduced.extend(map.as_ref().map(reduce));
                inputs.push((h, c));
                (h, c) = (h_next, c_next);
            }
            reduced.push(reduce(
                &self.last_transformer_block.text_map(&h, &c, &silu_temb),
            ));
            inputs.push((h, c));
        });
        // 2. The loss's gradient with respect to each block's reduced map.
        let grad_reduced = tch::with_grad(|| -> anyhow::Result<Vec<Tensor>> {
            let leaves: Vec<Tensor> = reduced
                .iter()
                .map(|r| r.detach().set_requires_grad(true))
                .collect();
            let objective = loss(&leaves)?;
            Ok(backward(&objective, &leaves.iter().collect::<Vec<_>>()))
        })?;
        // 3. Back through the blocks, last first: each block recomputed from its inputs, the
        //    gradient of (its map's share + its outputs' share) taken with respect to them.
        let mut grad_out: Option<(Tensor, Tensor)> = None;
        for (b, (h_in, c_in)) in inputs.iter().enumerate().rev() {
            let grads = tch::with_grad(|| -> anyhow::Result<Vec<Tensor>> {
                let h = h_in.detach().set_requires_grad(true);
                let c = c_in.detach().set_requires_grad(true);
                let objective = match (&grad_out, self.transformer_blocks.get(b)) {
                    (Some((g_h, g_c)), Some(block)) => {
                        let (h_out, c_out, map) = block.forward(&h, &c, &silu_temb, true);
                        let map = map.ok_or_else(|| anyhow::anyhow!("block {b} gave no map"))?;
                        (reduce(&map) * &grad_reduced[b]).sum(None)
                            + (h_out * g_h).sum(None)
                            + (c_out * g_c).sum(None)
                    }
                    _ => (reduce(&self.last_transformer_block.text_map(&h, &c, &silu_temb))
                        * &grad_reduced[b])
                        .sum(None),
                };
                Ok(backward(&objective, &[&h, &c]))
            })?;
            let mut grads = grads.into_iter();
            match (grads.next(), grads.next()) {
                (Some(g_h), Some(g_c)) => grad_out = Some((g_h, g_c)),
                _ => anyhow::bail!("no gradient for the inputs of block {b}"),
            }
        }
        // 4. Through the patch embedding (the context does not depend on the latent).
        let (g_hidden, _) = grad_out.ok_or_else(|| anyhow::anyhow!("no transformer block"))?;
        tch::with_grad(|| {
            let x = latents.detach().set_requires_grad(true);
            let hidden = self.pos_embed.forward(&x, gh, gw)?;
            Ok(backward(&(hidden * g_hidden).sum(None), &[&x]).remove(0))
        })
    }

    /// The token grid `(rows, columns)` of a latent of `h x w`.
    pub fn token_grid(&self, h: i64, w: i64) -> (i64, i64) {
        (h / self.cfg.patch_size, w / self.cfg.patch_size)
    }
}
