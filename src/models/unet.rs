//! The SDXL UNet (diffusers' `UNet2DConditionModel` with SDXL's configuration): timestep and
//! "text_time" additional embeddings (pooled CLIP-G text + six size/crop ids), down blocks with
//! ResNets and linear-projection spatial transformers (self-attention, cross-attention, GEGLU),
//! a cross-attention mid block, up blocks with skip connections, GroupNorm + SiLU + conv out.

use std::path::Path;

use serde_json::Value;
use tch::{Kind, Tensor};

use super::layers::{
    attention, merge_heads, split_heads, timestep_features, Conv2d, GroupNorm, LayerNorm, Linear,
};
use super::vae::ResnetBlock;
use super::weights::Vb;

#[derive(Debug, Clone)]
pub struct UnetConfig {
    pub sample_size: i64,
    pub in_channels: i64,
    pub out_channels: i64,
    pub block_out_channels: Vec<i64>,
    /// Per down block: whether it has cross-attention transformers.
    pub cross_attn: Vec<bool>,
    pub layers_per_block: Vec<i64>,
    /// Number of heads per block (diffusers' `attention_head_dim` field for SDXL).
    pub heads: Vec<i64>,
    pub transformer_layers: Vec<i64>,
    pub cross_attention_dim: i64,
    pub addition_time_embed_dim: i64,
    pub projection_class_embeddings_input_dim: i64,
    pub norm_num_groups: i64,
    pub norm_eps: f64,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
}

fn per_block(v: Option<&Value>, n: usize, default: i64) -> anyhow::Result<Vec<i64>> {
    match v {
        None | Some(Value::Null) => Ok(vec![default; n]),
        Some(Value::Number(x)) => Ok(vec![x.as_i64().unwrap_or(default); n]),
        Some(Value::Array(a)) if a.len() == n => a
            .iter()
            .map(|x| {
                x.as_i64()
                    .ok_or_else(|| anyhow::anyhow!("expected integers, got {x}"))
            })
            .collect(),
        Some(other) => anyhow::bail!("expected an integer or {n} integers, got {other}"),
    }
}

impl UnetConfig {
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("config.json");
        let v = super::read_json(&path)?;
        Self::from_value(&v).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    fn from_value(v: &Value) -> anyhow::Result<Self> {
        let int = |k: &str, d: i64| v.get(k).and_then(|x| x.as_i64()).unwrap_or(d);
        let blocks: Vec<i64> = v
            .get("block_out_channels")
            .and_then(|x| x.as_array())
            .ok_or_else(|| anyhow::anyhow!("no block_out_channels"))?
            .iter()
            .filter_map(|x| x.as_i64())
            .collect();
        let n = blocks.len();
        let down: Vec<String> = v
            .get("down_block_types")
            .and_then(|x| x.as_array())
            .ok_or_else(|| anyhow::anyhow!("no down_block_types"))?
            .iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect();
        if down.len() != n {
            anyhow::bail!("{} down blocks for {n} block_out_channels", down.len());
        }
        let cross_attn = down
            .iter()
            .map(|t| match t.as_str() {
                "DownBlock2D" => Ok(false),
                "CrossAttnDownBlock2D" => Ok(true),
                other => Err(anyhow::anyhow!("unsupported down block `{other}`")),
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        if v.get("addition_embed_type").and_then(|x| x.as_str()) != Some("text_time") {
            anyhow::bail!("only addition_embed_type \"text_time\" (SDXL) is supported");
        }
        if !v
            .get("use_linear_projection")
            .and_then(|x| x.as_bool())
            .unwrap_or(false)
        {
            anyhow::bail!("only use_linear_projection = true (SDXL) is supported");
        }
        let heads_v = v
            .get("num_attention_heads")
            .filter(|x| !x.is_null())
            .or_else(|| v.get("attention_head_dim"));
        Ok(Self {
            sample_size: int("sample_size", 128),
            in_channels: int("in_channels", 4),
            out_channels: int("out_channels", 4),
            cross_attn,
            layers_per_block: per_block(v.get("layers_per_block"), n, 2)?,
            heads: per_block(heads_v, n, 8)?,
            transformer_layers: per_block(v.get("transformer_layers_per_block"), n, 1)?,
            cross_attention_dim: int("cross_attention_dim", 2048),
            addition_time_embed_dim: int("addition_time_embed_dim", 256),
            projection_class_embeddings_input_dim: int(
                "projection_class_embeddings_input_dim",
                2816,
            ),
            norm_num_groups: int("norm_num_groups", 32),
            norm_eps: v.get("norm_eps").and_then(|x| x.as_f64()).unwrap_or(1e-5),
            flip_sin_to_cos: v
                .get("flip_sin_to_cos")
                .and_then(|x| x.as_bool())
                .unwrap_or(true),
            freq_shift: v.get("freq_shift").and_then(|x| x.as_f64()).unwrap_or(0.0),
            block_out_channels: blocks,
        })
    }

    /// stable-diffusion-xl-base-1.0 `unet/config.json`.
    pub fn sdxl_base() -> Self {
        Self {
            sample_size: 128,
            in_channels: 4,
            out_channels: 4,
            block_out_channels: vec![320, 640, 1280],
            cross_attn: vec![false, true, true],
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
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: i64,
}

impl Attention {
    fn new(vb: &Vb, dim: i64, context_dim: i64, heads: i64) -> anyhow::Result<Self> {
        Ok(Self {
            q: Linear::new(&vb.pp("to_q"), dim, dim, false)?,
            k: Linear::new(&vb.pp("to_k"), context_dim, dim, false)?,
            v: Linear::new(&vb.pp("to_v"), context_dim, dim, false)?,
            out: Linear::new(&vb.pp("to_out.0"), dim, dim, true)?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Tensor {
        let q = split_heads(&self.q.forward(x), self.heads);
        let k = split_heads(&self.k.forward(context), self.heads);
        let v = split_heads(&self.v.forward(context), self.heads);
        self.out
            .forward(&merge_heads(&attention(&q, &k, &v, false)))
    }
}

/// diffusers' `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward, each
/// behind a LayerNorm with a residual.
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff_proj: Linear,
    ff_out: Linear,
}

impl TransformerBlock {
    fn new(vb: &Vb, dim: i64, context_dim: i64, heads: i64) -> anyhow::Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(&vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::new(&vb.pp("attn1"), dim, dim, heads)?,
            norm2: LayerNorm::new(&vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::new(&vb.pp("attn2"), dim, context_dim, heads)?,
            norm3: LayerNorm::new(&vb.pp("norm3"), dim, 1e-5)?,
            ff_proj: Linear::new(&vb.pp("ff.net.0.proj"), dim, 8 * dim, true)?,
            ff_out: Linear::new(&vb.pp("ff.net.2"), 4 * dim, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Tensor {
        let h = self.norm1.forward(x);
        let x = self.attn1.forward(&h, &h) + x;
        let x = self.attn2.forward(&self.norm2.forward(&x), context) + x;
        let parts = self.ff_proj.forward(&self.norm3.forward(&x)).chunk(2, -1);
        let ff = self.ff_out.forward(&(&parts[0] * parts[1].gelu("none")));
        ff + x
    }
}

/// diffusers' `Transformer2DModel` with linear projections.
struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<TransformerBlock>,
    proj_out: Linear,
}

impl SpatialTransformer {
    fn new(vb: &Vb, ch: i64, layers: i64, heads: i64, cfg: &UnetConfig) -> anyhow::Result<Self> {
        Ok(Self {
            norm: GroupNorm::new(&vb.pp("norm"), cfg.norm_num_groups, ch, 1e-6)?,
            proj_in: Linear::new(&vb.pp("proj_in"), ch, ch, true)?,
            blocks: (0..layers)
                .map(|i| {
                    TransformerBlock::new(
                        &vb.pp("transformer_blocks").pp(i),
                        ch,
                        cfg.cross_attention_dim,
                        heads,
                    )
                })
                .collect::<anyhow::Result<Vec<_>>>()?,
            proj_out: Linear::new(&vb.pp("proj_out"), ch, ch, true)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().expect("4-d feature map");
        let t = self
            .norm
            .forward(x)
            .permute([0, 2, 3, 1])
            .reshape([b, h * w, c]);
        let mut t = self.proj_in.forward(&t);
        for block in &self.blocks {
            t = block.forward(&t, context);
        }
        let t = self
            .proj_out
            .forward(&t)
            .reshape([b, h, w, c])
            .permute([0, 3, 1, 2])
            .contiguous();
        t + x
    }
}

struct Level {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    /// Downsampler (stride-2 conv) or upsampler (nearest x2 then conv).
    resample: Option<Conv2d>,
}

pub struct Unet {
    cfg: UnetConfig,
    conv_in: Conv2d,
    time_l1: Linear,
    time_l2: Linear,
    add_l1: Linear,
    add_l2: Linear,
    down: Vec<Level>,
    mid_res1: ResnetBlock,
    mid_attn: SpatialTransformer,
    mid_res2: ResnetBlock,
    up: Vec<Level>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Unet {
    pub fn new(vb: &Vb, cfg: &UnetConfig) -> anyhow::Result<Self> {
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let temb = ch[0] * 4;
        let (g, eps) = (cfg.norm_num_groups, cfg.norm_eps);
        let res = |vb: &Vb, cin: i64, cout: i64| {
            ResnetBlock::with_time(vb, cin, cout, g, eps, Some(temb))
        };

        let mut down = Vec::new();
        let mut out_ch = ch[0];
        for (i, &level_ch) in ch.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = level_ch;
            let b = vb.pp("down_blocks").pp(i);
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..cfg.layers_per_block[i] {
                let cin = if j == 0 { in_ch } else { out_ch };
                resnets.push(res(&b.pp("resnets").pp(j), cin, out_ch)?);
                if cfg.cross_attn[i] {
                    attentions.push(SpatialTransformer::new(
                        &b.pp("attentions").pp(j),
                        out_ch,
                        cfg.transformer_layers[i],
                        cfg.heads[i],
                        cfg,
                    )?);
                }
            }
            let resample = if i + 1 < n {
                Some(Conv2d::new(
                    &b.pp("downsamplers.0.conv"),
                    out_ch,
                    out_ch,
                    3,
                    2,
                    1,
                )?)
            } else {
                None
            };
            down.push(Level {
                resnets,
                attentions,
                resample,
            });
        }

        let top = ch[n - 1];
        let mid = vb.pp("mid_block");
        let mid_res1 = res(&mid.pp("resnets.0"), top, top)?;
        let mid_attn = SpatialTransformer::new(
            &mid.pp("attentions.0"),
            top,
            cfg.transformer_layers[n - 1],
            cfg.heads[n - 1],
            cfg,
        )?;
        let mid_res2 = res(&mid.pp("resnets.1"), top, top)?;

        let rev_ch: Vec<i64> = ch.iter().rev().cloned().collect();
        let mut up = Vec::new();
        let mut out_ch = rev_ch[0];
        for i in 0..n {
            let prev = out_ch;
            out_ch = rev_ch[i];
            let in_ch = rev_ch[(i + 1).min(n - 1)];
            let rev_i = n - 1 - i;
            let layers = cfg.layers_per_block[rev_i] + 1;
            let b = vb.pp("up_blocks").pp(i);
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers {
                let skip = if j == layers - 1 { in_ch } else { out_ch };
                let cin = if j == 0 { prev } else { out_ch };
                resnets.push(res(&b.pp("resnets").pp(j), cin + skip, out_ch)?);
                if cfg.cross_attn[rev_i] {
                    attentions.push(SpatialTransformer::new(
                        &b.pp("attentions").pp(j),
                        out_ch,
                        cfg.transformer_layers[rev_i],
                        cfg.heads[rev_i],
                        cfg,
                    )?);
                }
            }
            let resample = if i + 1 < n {
                Some(Conv2d::new(
                    &b.pp("upsamplers.0.conv"),
                    out_ch,
                    out_ch,
                    3,
                    1,
                    1,
                )?)
            } else {
                None
            };
            up.push(Level {
                resnets,
                attentions,
                resample,
            });
        }

        Ok(Self {
            conv_in: Conv2d::new(&vb.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?,
            time_l1: Linear::new(&vb.pp("time_embedding.linear_1"), ch[0], temb, true)?,
            time_l2: Linear::new(&vb.pp("time_embedding.linear_2"), temb, temb, true)?,
            add_l1: Linear::new(
                &vb.pp("add_embedding.linear_1"),
                cfg.projection_class_embeddings_input_dim,
                temb,
                true,
            )?,
            add_l2: Linear::new(&vb.pp("add_embedding.linear_2"), temb, temb, true)?,
            down,
            mid_res1,
            mid_attn,
            mid_res2,
            up,
            norm_out: GroupNorm::new(&vb.pp("conv_norm_out"), g, ch[0], eps)?,
            conv_out: Conv2d::new(&vb.pp("conv_out"), ch[0], cfg.out_channels, 3, 1, 1)?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &UnetConfig {
        &self.cfg
    }

    /// `sample [b, 4, h, w]`, `timestep [b]`, `context [b, 77, cross_dim]`, `text_embeds [b, pooled]`,
    /// `time_ids [b, 6]` -> predicted noise `[b, 4, h, w]`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        context: &Tensor,
        text_embeds: &Tensor,
        time_ids: &Tensor,
    ) -> Tensor {
        let kind = sample.kind();
        let c = &self.cfg;
        let t = timestep_features(
            timestep,
            c.block_out_channels[0],
            c.flip_sin_to_cos,
            c.freq_shift,
        )
        .to_kind(kind);
        let emb = self.time_l2.forward(&self.time_l1.forward(&t).silu());
        let b = text_embeds.size()[0];
        let tid = timestep_features(
            &time_ids.flatten(0, -1),
            c.addition_time_embed_dim,
            c.flip_sin_to_cos,
            c.freq_shift,
        )
        .reshape([b, -1]);
        let add = Tensor::cat(&[text_embeds.to_kind(Kind::Float), tid], -1).to_kind(emb.kind());
        let emb = emb + self.add_l2.forward(&self.add_l1.forward(&add).silu());
        let semb = emb.silu();

        let mut x = self.conv_in.forward(sample);
        let mut skips = vec![x.shallow_clone()];
        for level in &self.down {
            for (j, r) in level.resnets.iter().enumerate() {
                x = r.forward_t(&x, Some(&semb));
                if let Some(a) = level.attentions.get(j) {
                    x = a.forward(&x, context);
                }
                skips.push(x.shallow_clone());
            }
            if let Some(conv) = &level.resample {
                x = conv.forward(&x);
                skips.push(x.shallow_clone());
            }
        }
        x = self.mid_res1.forward_t(&x, Some(&semb));
        x = self.mid_attn.forward(&x, context);
        x = self.mid_res2.forward_t(&x, Some(&semb));
        for level in &self.up {
            for (j, r) in level.resnets.iter().enumerate() {
                let skip = skips.pop().expect("a skip connection per up resnet");
                x = r.forward_t(&Tensor::cat(&[&x, &skip], 1), Some(&semb));
                if let Some(a) = level.attentions.get(j) {
                    x = a.forward(&x, context);
                }
            }
            if let Some(conv) = &level.resample {
                // Upsample to the size of the next skip connection (x2 when sizes divide).
                let (h, w) = match skips.last() {
                    Some(s) => (s.size()[2], s.size()[3]),
                    None => (x.size()[2] * 2, x.size()[3] * 2),
                };
                x = conv.forward(&x.upsample_nearest2d([h, w], None, None));
            }
        }
        self.conv_out.forward(&self.norm_out.forward(&x).silu())
    }
}
