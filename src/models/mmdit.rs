//! The SD3 MMDiT (diffusers' `SD3Transformer2DModel`): patch embedding with a centre-cropped
//! positional table, timestep + pooled-text conditioning, adaLN-zero joint blocks over
//! [image tokens, text tokens], a context-pre-only last block, and the final modulated layer.

use std::path::Path;

use serde::Deserialize;
use tch::Tensor;

use super::layers::{
    attention, merge_heads, split_heads, timestep_features, Conv2d, LayerNorm, Linear, RmsNorm,
};
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
    #[serde(default)]
    pub qk_norm: Option<String>,
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

/// Linear -> SiLU -> Linear (diffusers' `TimestepEmbedding` and `PixArtAlphaTextProjection`).
struct Mlp2 {
    l1: Linear,
    l2: Linear,
}

impl Mlp2 {
    fn new(vb: &Vb, i: i64, h: i64) -> anyhow::Result<Self> {
        Ok(Self {
            l1: Linear::new(&vb.pp("linear_1"), i, h, true)?,
            l2: Linear::new(&vb.pp("linear_2"), h, h, true)?,
        })
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        self.l2.forward(&self.l1.forward(x).silu())
    }
}

/// Linear(D, 4D) -> GELU(tanh) -> Linear(4D, D).
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(vb: &Vb, d: i64) -> anyhow::Result<Self> {
        Ok(Self {
            proj: Linear::new(&vb.pp("net.0.proj"), d, 4 * d, true)?,
            out: Linear::new(&vb.pp("net.2"), 4 * d, d, true)?,
        })
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        self.out.forward(&self.proj.forward(x).gelu("tanh"))
    }
}

/// `x * (1 + scale) + shift` with per-sample `[b, d]` modulation.
fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Tensor {
    x * (scale.unsqueeze(1) + 1.0) + shift.unsqueeze(1)
}

/// The per-stream half of a joint block.
struct Stream {
    /// adaLN modulation: 6 chunks (shift/scale/gate for attention and MLP), or 2 (scale, shift)
    /// for the context stream of the last block.
    ada: Linear,
    qkv: Linear,
    norm_q: Option<RmsNorm>,
    norm_k: Option<RmsNorm>,
    out: Option<Linear>,
    ff: Option<FeedForward>,
}

struct JointBlock {
    x: Stream,
    c: Stream,
    norm: LayerNorm,
    heads: i64,
    context_pre_only: bool,
}

impl JointBlock {
    fn new(vb: &Vb, cfg: &MmditConfig, context_pre_only: bool) -> anyhow::Result<Self> {
        let d = cfg.inner_dim();
        let hd = cfg.attention_head_dim;
        let attn = vb.pp("attn");
        let qk_norm = match cfg.qk_norm.as_deref() {
            None => false,
            Some("rms_norm") => true,
            Some(other) => anyhow::bail!("unsupported qk_norm `{other}`"),
        };
        let norm = |name: &str| -> anyhow::Result<Option<RmsNorm>> {
            Ok(if qk_norm {
                Some(RmsNorm::new(&attn.pp(name), hd, 1e-6)?)
            } else {
                None
            })
        };
        let lin = |name: &str| Linear::new(&attn.pp(name), d, d, true);
        let x = Stream {
            ada: Linear::new(&vb.pp("norm1.linear"), d, 6 * d, true)?,
            qkv: Linear::fuse(&[lin("to_q")?, lin("to_k")?, lin("to_v")?]),
            norm_q: norm("norm_q")?,
            norm_k: norm("norm_k")?,
            out: Some(lin("to_out.0")?),
            ff: Some(FeedForward::new(&vb.pp("ff"), d)?),
        };
        let c = Stream {
            ada: Linear::new(
                &vb.pp("norm1_context.linear"),
                d,
                if context_pre_only { 2 * d } else { 6 * d },
                true,
            )?,
            qkv: Linear::fuse(&[lin("add_q_proj")?, lin("add_k_proj")?, lin("add_v_proj")?]),
            norm_q: norm("norm_added_q")?,
            norm_k: norm("norm_added_k")?,
            out: if context_pre_only {
                None
            } else {
                Some(lin("to_add_out")?)
            },
            ff: if context_pre_only {
                None
            } else {
                Some(FeedForward::new(&vb.pp("ff_context"), d)?)
            },
        };
        Ok(Self {
            x,
            c,
            norm: LayerNorm::no_affine(d, 1e-6),
            heads: cfg.num_attention_heads,
            context_pre_only,
        })
    }

    fn qkv(&self, s: &Stream, h: &Tensor) -> (Tensor, Tensor, Tensor) {
        let parts = s.qkv.forward(h).chunk(3, -1);
        let mut q = split_heads(&parts[0], self.heads);
        let mut k = split_heads(&parts[1], self.heads);
        let v = split_heads(&parts[2], self.heads);
        if let Some(n) = &s.norm_q {
            q = n.forward(&q);
        }
        if let Some(n) = &s.norm_k {
            k = n.forward(&k);
        }
        (q, k, v)
    }

    /// `silu_temb`: SiLU of the conditioning embedding (shared by every block).
    fn forward(&self, x: &Tensor, c: &Tensor, silu_temb: &Tensor) -> (Tensor, Option<Tensor>) {
        let xm = self.x.ada.forward(silu_temb).chunk(6, 1);
        let x_norm = modulate(&self.norm.forward(x), &xm[0], &xm[1]);
        let cm = self.c.ada.forward(silu_temb);
        let (c_norm, cm) = if self.context_pre_only {
            // AdaLayerNormContinuous: (scale, shift).
            let m = cm.chunk(2, 1);
            (modulate(&self.norm.forward(c), &m[1], &m[0]), None)
        } else {
            let m = cm.chunk(6, 1);
            (modulate(&self.norm.forward(c), &m[0], &m[1]), Some(m))
        };

        let n_img = x.size()[1];
        let (xq, xk, xv) = self.qkv(&self.x, &x_norm);
        let (cq, ck, cv) = self.qkv(&self.c, &c_norm);
        // Image tokens first, then text, as diffusers' JointAttnProcessor2_0.
        let q = Tensor::cat(&[xq, cq], 2);
        let k = Tensor::cat(&[xk, ck], 2);
        let v = Tensor::cat(&[xv, cv], 2);
        let a = merge_heads(&attention(&q, &k, &v, false));
        let x_attn = a.narrow(1, 0, n_img);
        let c_attn = a.narrow(1, n_img, a.size()[1] - n_img);

        let x_attn = self
            .x
            .out
            .as_ref()
            .expect("image stream has out")
            .forward(&x_attn);
        let x = x + xm[2].unsqueeze(1) * x_attn;
        let x_ff = self
            .x
            .ff
            .as_ref()
            .expect("image stream has ff")
            .forward(&modulate(&self.norm.forward(&x), &xm[3], &xm[4]));
        let x = &x + xm[5].unsqueeze(1) * x_ff;

        let c = cm.map(|cm| {
            let c_attn = self.c.out.as_ref().expect("context out").forward(&c_attn);
            let c = c + cm[2].unsqueeze(1) * c_attn;
            let c_ff = self.c.ff.as_ref().expect("context ff").forward(&modulate(
                &self.norm.forward(&c),
                &cm[3],
                &cm[4],
            ));
            &c + cm[5].unsqueeze(1) * c_ff
        });
        (x, c)
    }
}

pub struct Mmdit {
    cfg: MmditConfig,
    patch: Conv2d,
    pos_embed: Tensor,
    t_embed: Mlp2,
    pooled_embed: Mlp2,
    context_embed: Linear,
    blocks: Vec<JointBlock>,
    norm_out_ada: Linear,
    norm_out: LayerNorm,
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
        let p = cfg.patch_size;
        let max = cfg
            .pos_embed_max_size
            .ok_or_else(|| anyhow::anyhow!("transformer config has no pos_embed_max_size"))?;
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                JointBlock::new(
                    &vb.pp("transformer_blocks").pp(i),
                    cfg,
                    i == cfg.num_layers - 1,
                )
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            patch: Conv2d::new(&vb.pp("pos_embed.proj"), cfg.in_channels, d, p, p, 0)?,
            pos_embed: vb.pp("pos_embed").get("pos_embed", &[1, max * max, d])?,
            t_embed: Mlp2::new(&vb.pp("time_text_embed.timestep_embedder"), 256, d)?,
            pooled_embed: Mlp2::new(
                &vb.pp("time_text_embed.text_embedder"),
                cfg.pooled_projection_dim,
                d,
            )?,
            context_embed: Linear::new(
                &vb.pp("context_embedder"),
                cfg.joint_attention_dim,
                cfg.caption_projection_dim,
                true,
            )?,
            blocks,
            norm_out_ada: Linear::new(&vb.pp("norm_out.linear"), d, 2 * d, true)?,
            norm_out: LayerNorm::no_affine(d, 1e-6),
            proj_out: Linear::new(&vb.pp("proj_out"), d, p * p * cfg.out_channels(), true)?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &MmditConfig {
        &self.cfg
    }

    /// The positional table centre-cropped to an `h x w` patch grid.
    fn cropped_pos_embed(&self, h: i64, w: i64) -> anyhow::Result<Tensor> {
        let max = self.cfg.pos_embed_max_size.unwrap_or(0);
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

    /// Checks that a latent of `h x w` fits the positional table and the patch size.
    pub fn check_latent_size(&self, h: i64, w: i64) -> anyhow::Result<()> {
        let p = self.cfg.patch_size;
        if h % p != 0 || w % p != 0 {
            anyhow::bail!("latent size {h}x{w} is not a multiple of the patch size {p}");
        }
        self.cropped_pos_embed(h / p, w / p).map(|_| ())
    }

    /// `latents [b, c, h, w]`, `timestep [b]` (sigma x 1000, float), `context [b, seq, joint]`,
    /// `pooled [b, pooled_dim]` -> velocity `[b, c_out, h, w]`.
    pub fn forward(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        context: &Tensor,
        pooled: &Tensor,
    ) -> anyhow::Result<Tensor> {
        let (b, _c, h, w) = latents.size4()?;
        let p = self.cfg.patch_size;
        let (gh, gw) = (h / p, w / p);
        let x = self.patch.forward(latents).flatten(2, -1).transpose(1, 2);
        let x = (x + self.cropped_pos_embed(gh, gw)?).to_kind(latents.kind());

        let t = timestep_features(timestep, 256, true, 0.0).to_kind(pooled.kind());
        let temb = self.t_embed.forward(&t) + self.pooled_embed.forward(pooled);
        let silu_temb = temb.silu();
        let mut c = self.context_embed.forward(context);
        let mut x = x;
        for block in &self.blocks {
            let (nx, nc) = block.forward(&x, &c, &silu_temb);
            x = nx;
            if let Some(nc) = nc {
                c = nc;
            }
        }
        let m = self.norm_out_ada.forward(&silu_temb).chunk(2, 1);
        let x = modulate(&self.norm_out.forward(&x), &m[1], &m[0]);
        let x = self.proj_out.forward(&x);
        let co = self.cfg.out_channels();
        Ok(x.view([b, gh, gw, p, p, co])
            .permute([0, 5, 1, 3, 2, 4])
            .reshape([b, co, gh * p, gw * p]))
    }
}
