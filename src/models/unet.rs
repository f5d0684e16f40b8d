//! The SDXL UNet (diffusers' `UNet2DConditionModel` with SDXL's configuration): timestep and
//! "text_time" additional embeddings (pooled CLIP-G text + six size/crop ids), down blocks with
//! ResNets and linear-projection spatial transformers (self-attention, cross-attention, GEGLU),
//! a cross-attention mid block, up blocks with skip connections, GroupNorm + SiLU + conv out.
//!
//! Struct fields are named as the checkpoint keys (`down_blocks.1.attentions.0.proj_in` is
//! `down_blocks[1]`'s `attentions[0].proj_in`), and the block types as diffusers' classes, which
//! are also the config's `down_block_types` / `up_block_types` values.
//!
//! One file, not one per block: the file follows diffusers' module tree from the checkpoint's
//! root to its leaves, so that it reads side by side with `unet_2d_condition.py` and the weight
//! keys; split by block, a key path would run across files.

use std::path::Path;

use serde::Deserialize;
use tch::{Kind, Tensor};

use super::embeddings::{TimestepEmbedding, Timesteps};
use super::layers::{attention, merge_heads, split_heads, Conv2d, GroupNorm, LayerNorm, Linear};
use super::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};
use super::weights::Vb;

/// The UNet configuration r2f runs, resolved from `unet/config.json` (per-block values expanded
/// to one per block).
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "UnetConfigFile")]
pub struct UnetConfig {
    pub sample_size: i64,
    pub in_channels: i64,
    pub out_channels: i64,
    pub block_out_channels: Vec<i64>,
    pub down_block_types: Vec<DownBlockType>,
    pub up_block_types: Vec<UpBlockType>,
    /// Resnets per down block (an up block has one more).
    pub layers_per_block: Vec<i64>,
    /// Attention heads per down block: diffusers' `num_attention_heads`, or `attention_head_dim`
    /// when that is null (diffusers' naming quirk: SDXL configs keep head counts there).
    pub heads: Vec<i64>,
    /// Transformer blocks per attention, per down block (`transformer_layers_per_block`).
    pub transformer_layers: Vec<i64>,
    pub cross_attention_dim: i64,
    pub addition_time_embed_dim: i64,
    pub projection_class_embeddings_input_dim: i64,
    pub norm_num_groups: i64,
    pub norm_eps: f64,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
}

/// `down_block_types` entries r2f implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum DownBlockType {
    DownBlock2D,
    CrossAttnDownBlock2D,
}

impl TryFrom<String> for DownBlockType {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        super::choice(
            "down_block_types entry",
            &value,
            &[
                ("DownBlock2D", Self::DownBlock2D),
                ("CrossAttnDownBlock2D", Self::CrossAttnDownBlock2D),
            ],
        )
    }
}

/// `up_block_types` entries r2f implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum UpBlockType {
    UpBlock2D,
    CrossAttnUpBlock2D,
}

impl TryFrom<String> for UpBlockType {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        super::choice(
            "up_block_types entry",
            &value,
            &[
                ("UpBlock2D", Self::UpBlock2D),
                ("CrossAttnUpBlock2D", Self::CrossAttnUpBlock2D),
            ],
        )
    }
}

/// `mid_block_type` values r2f implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum MidBlockType {
    UNetMidBlock2DCrossAttn,
}

impl TryFrom<String> for MidBlockType {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        super::choice(
            "mid_block_type",
            &value,
            &[("UNetMidBlock2DCrossAttn", Self::UNetMidBlock2DCrossAttn)],
        )
    }
}

/// `addition_embed_type` values r2f implements: SDXL's pooled text + size/crop ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum AdditionEmbedType {
    TextTime,
}

impl TryFrom<String> for AdditionEmbedType {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        super::choice(
            "addition_embed_type",
            &value,
            &[("text_time", Self::TextTime)],
        )
    }
}

/// A per-block config value: one for every block, or a list with one per block.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    expecting = "an integer, or a list of integers with one per block"
)]
enum PerBlock {
    All(i64),
    Each(Vec<i64>),
}

impl PerBlock {
    fn resolve(&self, field: &str, blocks: usize) -> Result<Vec<i64>, String> {
        match self {
            Self::All(v) => Ok(vec![*v; blocks]),
            Self::Each(v) if v.len() == blocks => Ok(v.clone()),
            Self::Each(v) => Err(format!(
                "{field}: {} value(s) for {blocks} blocks (block_out_channels)",
                v.len()
            )),
        }
    }
}

/// `unet/config.json` as diffusers writes it: the fields r2f reads, a missing one taking
/// diffusers' `UNet2DConditionModel` default.
#[derive(Deserialize)]
#[serde(default)]
struct UnetConfigFile {
    sample_size: i64,
    in_channels: i64,
    out_channels: i64,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    down_block_types: Vec<DownBlockType>,
    mid_block_type: MidBlockType,
    up_block_types: Vec<UpBlockType>,
    block_out_channels: Vec<i64>,
    layers_per_block: PerBlock,
    norm_num_groups: i64,
    norm_eps: f64,
    cross_attention_dim: i64,
    transformer_layers_per_block: PerBlock,
    attention_head_dim: PerBlock,
    num_attention_heads: Option<PerBlock>,
    use_linear_projection: bool,
    addition_embed_type: Option<AdditionEmbedType>,
    addition_time_embed_dim: Option<i64>,
    projection_class_embeddings_input_dim: Option<i64>,
}

impl Default for UnetConfigFile {
    fn default() -> Self {
        use DownBlockType::*;
        use UpBlockType::*;
        Self {
            // diffusers has no default (None); its SDXL pipeline then uses 128.
            sample_size: 128,
            in_channels: 4,
            out_channels: 4,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: vec![
                CrossAttnDownBlock2D,
                CrossAttnDownBlock2D,
                CrossAttnDownBlock2D,
                DownBlock2D,
            ],
            mid_block_type: MidBlockType::UNetMidBlock2DCrossAttn,
            up_block_types: vec![
                UpBlock2D,
                CrossAttnUpBlock2D,
                CrossAttnUpBlock2D,
                CrossAttnUpBlock2D,
            ],
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::All(2),
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: 1280,
            transformer_layers_per_block: PerBlock::All(1),
            attention_head_dim: PerBlock::All(8),
            num_attention_heads: None,
            use_linear_projection: false,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            projection_class_embeddings_input_dim: None,
        }
    }
}

impl TryFrom<UnetConfigFile> for UnetConfig {
    type Error = String;
    fn try_from(f: UnetConfigFile) -> Result<Self, String> {
        if f.addition_embed_type != Some(AdditionEmbedType::TextTime) {
            return Err(
                "addition_embed_type is null: only \"text_time\" (SDXL) is supported".into(),
            );
        }
        if !f.use_linear_projection {
            return Err("only use_linear_projection = true (SDXL) is supported".into());
        }
        let required = |v: Option<i64>, field: &str| {
            v.ok_or_else(|| format!("{field} is required with addition_embed_type \"text_time\""))
        };
        let n = f.block_out_channels.len();
        let heads = f
            .num_attention_heads
            .as_ref()
            .unwrap_or(&f.attention_head_dim);
        let cfg = Self {
            sample_size: f.sample_size,
            in_channels: f.in_channels,
            out_channels: f.out_channels,
            layers_per_block: f.layers_per_block.resolve("layers_per_block", n)?,
            heads: heads.resolve("attention_head_dim / num_attention_heads", n)?,
            transformer_layers: f
                .transformer_layers_per_block
                .resolve("transformer_layers_per_block", n)?,
            block_out_channels: f.block_out_channels,
            down_block_types: f.down_block_types,
            up_block_types: f.up_block_types,
            cross_attention_dim: f.cross_attention_dim,
            addition_time_embed_dim: required(
                f.addition_time_embed_dim,
                "addition_time_embed_dim",
            )?,
            projection_class_embeddings_input_dim: required(
                f.projection_class_embeddings_input_dim,
                "projection_class_embeddings_input_dim",
            )?,
            norm_num_groups: f.norm_num_groups,
            norm_eps: f.norm_eps,
            flip_sin_to_cos: f.flip_sin_to_cos,
            freq_shift: f.freq_shift,
        };
        cfg.check()?;
        Ok(cfg)
    }
}

impl UnetConfig {
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        super::read_config(&dir.join("config.json"), "UNet")
    }

    /// stable-diffusion-xl-base-1.0 `unet/config.json`.
    pub fn sdxl_base() -> Self {
        use DownBlockType::*;
        use UpBlockType::*;
        Self {
            sample_size: 128,
            in_channels: 4,
            out_channels: 4,
            block_out_channels: vec![320, 640, 1280],
            down_block_types: vec![DownBlock2D, CrossAttnDownBlock2D, CrossAttnDownBlock2D],
            up_block_types: vec![CrossAttnUpBlock2D, CrossAttnUpBlock2D, UpBlock2D],
            layers_per_block: vec![2, 2, 2],
            heads: vec![5, 10, 20],
            transformer_layers: vec![1, 2, 10],
            cross_attention_dim: 2048,
            addition_time_embed_dim: 256,
            projection_class_embeddings_input_dim: 2816,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
        }
    }

    /// Every per-block list has one entry per `block_out_channels` entry.
    fn check(&self) -> Result<(), String> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err("block_out_channels is empty".into());
        }
        for (field, len) in [
            ("down_block_types", self.down_block_types.len()),
            ("up_block_types", self.up_block_types.len()),
            ("layers_per_block", self.layers_per_block.len()),
            ("attention_head_dim / num_attention_heads", self.heads.len()),
            (
                "transformer_layers_per_block",
                self.transformer_layers.len(),
            ),
        ] {
            if len != n {
                return Err(format!(
                    "{field}: {len} value(s) for {n} blocks (block_out_channels)"
                ));
            }
        }
        Ok(())
    }

    /// The time embedding width: 4x the first block's channels.
    fn time_embed_dim(&self) -> i64 {
        self.block_out_channels.first().map_or(0, |c| 4 * c)
    }
}

/// The UNet's resnets: with the time embedding, the config's GroupNorm.
fn resnet(vb: &Vb, cfg: &UnetConfig, cin: i64, cout: i64) -> anyhow::Result<ResnetBlock2D> {
    Ok(ResnetBlock2D::new(
        vb,
        cin,
        cout,
        Some(cfg.time_embed_dim()),
        cfg.norm_num_groups,
        cfg.norm_eps,
    )?)
}

/// diffusers' `Attention` in the UNet's transformer blocks: multi-head, q/k/v without bias;
/// keys and values from `context` (itself for self-attention).
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    /// `to_out.0`.
    to_out: Linear,
    heads: i64,
}

impl Attention {
    fn new(vb: &Vb, dim: i64, context_dim: i64, heads: i64) -> anyhow::Result<Self> {
        Ok(Self {
            to_q: Linear::new(&vb.pp("to_q"), dim, dim, false)?,
            to_k: Linear::new(&vb.pp("to_k"), context_dim, dim, false)?,
            to_v: Linear::new(&vb.pp("to_v"), context_dim, dim, false)?,
            to_out: Linear::new(&vb.pp("to_out.0"), dim, dim, true)?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Tensor {
        let q = split_heads(&self.to_q.forward(x), self.heads);
        let k = split_heads(&self.to_k.forward(context), self.heads);
        let v = split_heads(&self.to_v.forward(context), self.heads);
        self.to_out
            .forward(&merge_heads(&attention(&q, &k, &v, false)))
    }
}

/// diffusers' `FeedForward` with GEGLU (`ff`): `net.0` projects to a value and a gate,
/// `value * gelu(gate)`; `net.1` is a dropout; `net.2` projects back.
struct FeedForward {
    /// `net.0.proj`: D -> 2 x 4D (value, gate).
    net_0_proj: Linear,
    /// `net.2`: 4D -> D.
    net_2: Linear,
}

impl FeedForward {
    fn new(vb: &Vb, dim: i64) -> anyhow::Result<Self> {
        Ok(Self {
            net_0_proj: Linear::new(&vb.pp("net.0.proj"), dim, 8 * dim, true)?,
            net_2: Linear::new(&vb.pp("net.2"), 4 * dim, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let value_gate = self.net_0_proj.forward(x).chunk(2, -1);
        let (value, gate) = (&value_gate[0], &value_gate[1]);
        self.net_2.forward(&(value * gate.gelu("none")))
    }
}

/// diffusers' `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward, each
/// behind a LayerNorm with a residual.
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(vb: &Vb, dim: i64, context_dim: i64, heads: i64) -> anyhow::Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(&vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::new(&vb.pp("attn1"), dim, dim, heads)?,
            norm2: LayerNorm::new(&vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::new(&vb.pp("attn2"), dim, context_dim, heads)?,
            norm3: LayerNorm::new(&vb.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::new(&vb.pp("ff"), dim)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Tensor {
        let h = self.norm1.forward(x);
        let x = self.attn1.forward(&h, &h) + x;
        let x = self.attn2.forward(&self.norm2.forward(&x), context) + x;
        self.ff.forward(&self.norm3.forward(&x)) + x
    }
}

/// diffusers' `Transformer2DModel` with linear projections (`attentions.N`): the feature map as
/// tokens through `transformer_blocks`, with a residual.
struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Linear,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Linear,
}

impl Transformer2DModel {
    fn new(
        vb: &Vb,
        cfg: &UnetConfig,
        channels: i64,
        layers: i64,
        heads: i64,
    ) -> anyhow::Result<Self> {
        let ch = channels;
        Ok(Self {
            norm: GroupNorm::new(&vb.pp("norm"), cfg.norm_num_groups, ch, 1e-6)?,
            proj_in: Linear::new(&vb.pp("proj_in"), ch, ch, true)?,
            transformer_blocks: (0..layers)
                .map(|i| {
                    let block = vb.pp("transformer_blocks").pp(i);
                    BasicTransformerBlock::new(&block, ch, cfg.cross_attention_dim, heads)
                })
                .collect::<anyhow::Result<Vec<_>>>()?,
            proj_out: Linear::new(&vb.pp("proj_out"), ch, ch, true)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Tensor {
        let size = x.size();
        // [b, c, h, w] -> [b, h*w, c] tokens and back.
        let tokens = self.norm.forward(x).permute([0, 2, 3, 1]).flatten(1, 2);
        let mut t = self.proj_in.forward(&tokens);
        for block in &self.transformer_blocks {
            t = block.forward(&t, context);
        }
        let t = self
            .proj_out
            .forward(&t)
            .reshape([size[0], size[2], size[3], size[1]])
            .permute([0, 3, 1, 2])
            .contiguous();
        t + x
    }
}

/// The attentions of a cross-attention block at level `level` (down-block numbering).
fn attentions(
    vb: &Vb,
    cfg: &UnetConfig,
    level: usize,
    count: i64,
    channels: i64,
) -> anyhow::Result<Vec<Transformer2DModel>> {
    (0..count)
        .map(|j| {
            let (layers, heads) = (cfg.transformer_layers[level], cfg.heads[level]);
            Transformer2DModel::new(&vb.pp("attentions").pp(j), cfg, channels, layers, heads)
        })
        .collect()
}

/// diffusers' `DownBlock2D`: resnets, then a downsampler except in the last block.
struct DownBlock2D {
    resnets: Vec<ResnetBlock2D>,
    /// `downsamplers.0`.
    downsamplers: Option<Downsample2D>,
}

/// diffusers' `CrossAttnDownBlock2D`: (resnet, attention) pairs, then a downsampler except in
/// the last block.
struct CrossAttnDownBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    /// `downsamplers.0`.
    downsamplers: Option<Downsample2D>,
}

/// `down_blocks.N`, of its `down_block_types` entry.
enum DownBlock {
    DownBlock2D(DownBlock2D),
    CrossAttnDownBlock2D(CrossAttnDownBlock2D),
}

impl DownBlock {
    /// Down block `i`: from the previous block's channels (conv_in's for the first) to
    /// `block_out_channels[i]`.
    fn new(vb: &Vb, cfg: &UnetConfig, i: usize) -> anyhow::Result<Self> {
        let in_channels = cfg.block_out_channels[i.saturating_sub(1)];
        let out = cfg.block_out_channels[i];
        let layers = cfg.layers_per_block[i];
        let resnets = (0..layers)
            .map(|j| {
                let cin = if j == 0 { in_channels } else { out };
                resnet(&vb.pp("resnets").pp(j), cfg, cin, out)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let downsamplers = if i + 1 < cfg.block_out_channels.len() {
            Some(Downsample2D::new(&vb.pp("downsamplers.0"), out)?)
        } else {
            None
        };
        Ok(match cfg.down_block_types[i] {
            DownBlockType::DownBlock2D => Self::DownBlock2D(DownBlock2D {
                resnets,
                downsamplers,
            }),
            DownBlockType::CrossAttnDownBlock2D => {
                Self::CrossAttnDownBlock2D(CrossAttnDownBlock2D {
                    resnets,
                    attentions: attentions(vb, cfg, i, layers, out)?,
                    downsamplers,
                })
            }
        })
    }

    /// The block's output, and the skip connections it leaves for the up blocks: the output of
    /// every resnet (after its attention) and of the downsampler.
    fn forward(&self, x: &Tensor, silu_temb: &Tensor, context: &Tensor) -> (Tensor, Vec<Tensor>) {
        let mut x = x.shallow_clone();
        let mut skips = Vec::new();
        let downsamplers = match self {
            Self::DownBlock2D(b) => {
                for resnet in &b.resnets {
                    x = resnet.forward(&x, Some(silu_temb));
                    skips.push(x.shallow_clone());
                }
                &b.downsamplers
            }
            Self::CrossAttnDownBlock2D(b) => {
                for (resnet, attention) in b.resnets.iter().zip(&b.attentions) {
                    x = resnet.forward(&x, Some(silu_temb));
                    x = attention.forward(&x, context);
                    skips.push(x.shallow_clone());
                }
                &b.downsamplers
            }
        };
        if let Some(downsampler) = downsamplers {
            x = downsampler.forward(&x);
            skips.push(x.shallow_clone());
        }
        (x, skips)
    }
}

/// diffusers' `UNetMidBlock2DCrossAttn` (`mid_block`): resnet, attention, resnet.
struct UNetMidBlock2DCrossAttn {
    /// `attentions.0`.
    attentions: Transformer2DModel,
    /// `resnets.0`, `resnets.1`.
    resnets: [ResnetBlock2D; 2],
}

impl UNetMidBlock2DCrossAttn {
    fn new(vb: &Vb, cfg: &UnetConfig) -> anyhow::Result<Self> {
        let last = cfg.block_out_channels.len() - 1;
        let ch = cfg.block_out_channels[last];
        let (layers, heads) = (cfg.transformer_layers[last], cfg.heads[last]);
        Ok(Self {
            attentions: Transformer2DModel::new(&vb.pp("attentions.0"), cfg, ch, layers, heads)?,
            resnets: [
                resnet(&vb.pp("resnets.0"), cfg, ch, ch)?,
                resnet(&vb.pp("resnets.1"), cfg, ch, ch)?,
            ],
        })
    }

    fn forward(&self, x: &Tensor, silu_temb: &Tensor, context: &Tensor) -> Tensor {
        let [first, second] = &self.resnets;
        let x = first.forward(x, Some(silu_temb));
        let x = self.attentions.forward(&x, context);
        second.forward(&x, Some(silu_temb))
    }
}

/// diffusers' `UpBlock2D`: resnets over [x, skip connection], then an upsampler except in the
/// last block.
struct UpBlock2D {
    resnets: Vec<ResnetBlock2D>,
    /// `upsamplers.0`.
    upsamplers: Option<Upsample2D>,
}

/// diffusers' `CrossAttnUpBlock2D`: (resnet over [x, skip connection], attention) pairs, then an
/// upsampler except in the last block.
struct CrossAttnUpBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    /// `upsamplers.0`.
    upsamplers: Option<Upsample2D>,
}

/// `up_blocks.N`, of its `up_block_types` entry.
enum UpBlock {
    UpBlock2D(UpBlock2D),
    CrossAttnUpBlock2D(CrossAttnUpBlock2D),
}

impl UpBlock {
    /// Up block `i`: the mirror of down block `level = n - 1 - i`, with one resnet more. It
    /// takes the output of the block below (the mid block's for the first) and the skip
    /// connections of its level.
    fn new(vb: &Vb, cfg: &UnetConfig, i: usize) -> anyhow::Result<Self> {
        let n = cfg.block_out_channels.len();
        let level = n - 1 - i;
        let prev_channels = cfg.block_out_channels[(level + 1).min(n - 1)];
        let out = cfg.block_out_channels[level];
        // The channels of the last skip connection: those of the level below (conv_in's output
        // for the last up block).
        let skip_in = cfg.block_out_channels[level.saturating_sub(1)];
        let layers = cfg.layers_per_block[level] + 1;
        let resnets = (0..layers)
            .map(|j| {
                let skip = if j == layers - 1 { skip_in } else { out };
                let cin = if j == 0 { prev_channels } else { out };
                resnet(&vb.pp("resnets").pp(j), cfg, cin + skip, out)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let upsamplers = if i + 1 < n {
            Some(Upsample2D::new(&vb.pp("upsamplers.0"), out)?)
        } else {
            None
        };
        Ok(match cfg.up_block_types[i] {
            UpBlockType::UpBlock2D => Self::UpBlock2D(UpBlock2D {
                resnets,
                upsamplers,
            }),
            UpBlockType::CrossAttnUpBlock2D => Self::CrossAttnUpBlock2D(CrossAttnUpBlock2D {
                resnets,
                attentions: attentions(vb, cfg, level, layers, out)?,
                upsamplers,
            }),
        })
    }

    fn resnets(&self) -> usize {
        match self {
            Self::UpBlock2D(b) => b.resnets.len(),
            Self::CrossAttnUpBlock2D(b) => b.resnets.len(),
        }
    }

    /// `skips`: this block's skip connections, one per resnet, in the order the down blocks
    /// left them (the first resnet takes the last). `upsample_size`: the upsampler's output size.
    fn forward(
        &self,
        x: &Tensor,
        skips: &[Tensor],
        upsample_size: Option<[i64; 2]>,
        silu_temb: &Tensor,
        context: &Tensor,
    ) -> Tensor {
        let mut x = x.shallow_clone();
        let with_skip = |x: &Tensor, skip: &Tensor| Tensor::cat(&[x, skip], 1);
        let upsamplers = match self {
            Self::UpBlock2D(b) => {
                for (resnet, skip) in b.resnets.iter().zip(skips.iter().rev()) {
                    x = resnet.forward(&with_skip(&x, skip), Some(silu_temb));
                }
                &b.upsamplers
            }
            Self::CrossAttnUpBlock2D(b) => {
                let layers = b.resnets.iter().zip(&b.attentions);
                for ((resnet, attention), skip) in layers.zip(skips.iter().rev()) {
                    x = resnet.forward(&with_skip(&x, skip), Some(silu_temb));
                    x = attention.forward(&x, context);
                }
                &b.upsamplers
            }
        };
        match upsamplers {
            Some(upsampler) => upsampler.forward(&x, upsample_size),
            None => x,
        }
    }
}

pub struct Unet {
    cfg: UnetConfig,
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    add_time_proj: Timesteps,
    add_embedding: TimestepEmbedding,
    down_blocks: Vec<DownBlock>,
    mid_block: UNetMidBlock2DCrossAttn,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Unet {
    pub fn new(vb: &Vb, cfg: &UnetConfig) -> anyhow::Result<Self> {
        cfg.check()
            .map_err(|e| anyhow::anyhow!("invalid UNet config: {e}"))?;
        let ch = &cfg.block_out_channels;
        let (first, n) = (ch[0], ch.len());
        let temb = cfg.time_embed_dim();
        let timesteps = |num_channels| Timesteps {
            num_channels,
            flip_sin_to_cos: cfg.flip_sin_to_cos,
            downscale_freq_shift: cfg.freq_shift,
        };
        let down_blocks = (0..n)
            .map(|i| DownBlock::new(&vb.pp("down_blocks").pp(i), cfg, i))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let up_blocks = (0..n)
            .map(|i| UpBlock::new(&vb.pp("up_blocks").pp(i), cfg, i))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            conv_in: Conv2d::new(&vb.pp("conv_in"), cfg.in_channels, first, 3, 1, 1)?,
            time_proj: timesteps(first),
            time_embedding: TimestepEmbedding::new(&vb.pp("time_embedding"), first, temb)?,
            add_time_proj: timesteps(cfg.addition_time_embed_dim),
            add_embedding: TimestepEmbedding::new(
                &vb.pp("add_embedding"),
                cfg.projection_class_embeddings_input_dim,
                temb,
            )?,
            down_blocks,
            mid_block: UNetMidBlock2DCrossAttn::new(&vb.pp("mid_block"), cfg)?,
            up_blocks,
            conv_norm_out: GroupNorm::new(
                &vb.pp("conv_norm_out"),
                cfg.norm_num_groups,
                first,
                cfg.norm_eps,
            )?,
            conv_out: Conv2d::new(&vb.pp("conv_out"), first, cfg.out_channels, 3, 1, 1)?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &UnetConfig {
        &self.cfg
    }

    /// The time embedding plus SDXL's "text_time" additional embedding: the pooled text and
    /// the sinusoidal features of the six size/crop ids.
    fn time_and_added_embedding(
        &self,
        timestep: &Tensor,
        text_embeds: &Tensor,
        time_ids: &Tensor,
        kind: Kind,
    ) -> Tensor {
        let t = self.time_proj.forward(timestep).to_kind(kind);
        let emb = self.time_embedding.forward(&t);
        let batch = text_embeds.size()[0];
        let time_embeds = self
            .add_time_proj
            .forward(&time_ids.flatten(0, -1))
            .reshape([batch, -1]);
        let add_embeds =
            Tensor::cat(&[text_embeds.to_kind(Kind::Float), time_embeds], -1).to_kind(emb.kind());
        emb + self.add_embedding.forward(&add_embeds)
    }

    /// `sample [b, 4, h, w]`, `timestep [b]`, `context [b, 77, cross_dim]` (diffusers'
    /// `encoder_hidden_states`), `text_embeds [b, pooled]`, `time_ids [b, 6]` -> predicted noise
    /// `[b, 4, h, w]`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        context: &Tensor,
        text_embeds: &Tensor,
        time_ids: &Tensor,
    ) -> Tensor {
        let emb = self.time_and_added_embedding(timestep, text_embeds, time_ids, sample.kind());
        let silu_temb = emb.silu();

        let mut x = self.conv_in.forward(sample);
        // Skip connections: conv_in's output, then what every down block leaves.
        let mut skips = vec![x.shallow_clone()];
        for block in &self.down_blocks {
            let (out, block_skips) = block.forward(&x, &silu_temb, context);
            x = out;
            skips.extend(block_skips);
        }
        x = self.mid_block.forward(&x, &silu_temb, context);
        for block in &self.up_blocks {
            // Each up block takes one skip per resnet from the end; by construction the down
            // blocks leave exactly as many as the up blocks take.
            let block_skips = skips.split_off(skips.len().saturating_sub(block.resnets()));
            // Upsample to the size of the next skip connection (x2 when sizes divide).
            let upsample_size = skips.last().map(|s| {
                let size = s.size();
                [size[2], size[3]]
            });
            x = block.forward(&x, &block_skips, upsample_size, &silu_temb, context);
        }
        self.conv_out
            .forward(&self.conv_norm_out.forward(&x).silu())
    }
}
