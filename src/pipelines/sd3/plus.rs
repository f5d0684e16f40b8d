//! R2F+ on SD3: region-guided R2F, as the official `R2Fplus_Diffusion_sd3.py`
//! (krafton-ai/Rare-to-Frequent @ 834f459; `docs/r2fplus.md` has the exact reading, cited by §).
//!
//! Per object, in plan order: an SD3 run of the object's own prompt (R2F phrase alternation), with
//! its box moved to the image centre and, during the first `bbox_guidance_steps` steps,
//! `bbox_guidance_iterations` gradient steps per step on the latent that pull the object's text
//! attention into the box (§1.5). The object's mask (a box or an ellipse, instead of the official
//! GroundingDINO + SAM) and its per-step latents are moved back to the real box (§1.8). Then the
//! overall run (base prompt, guidance on every real box) pastes the object latents in with the
//! masks after each of its first `latent_fusion_steps` steps (§1.9).

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use tch::{Device, Kind, Tensor};

use super::Sd3Pipeline;
use crate::device::synchronize;
use crate::models::tokenizer::PromptTokenizer;
use crate::pipelines::{
    apply_cfg_to_batch, seeded_draws, to_u8_image, Conditioning, Output, Stage, Timings,
};
use crate::plan::RegionPlan;
use crate::r2f::plus::{
    check_guided_rows, plan_text, KeySubstitution, PhraseRule, RunText, StepText, TokenIds,
};
use crate::r2f::regions::{
    box_mask, center_shift, centered_bbox, check_stop_steps, fuse_step, refine_latents_and_mask,
    RegionMask, ShiftedObject,
};
use crate::r2f::{PromptSchedule, StopStepMap, ALT_STEP, REFERENCE_STEPS};
use crate::schedulers::flow_match::FlowMatchSchedule;

/// The R2F+ knobs, defaulting to the official values (§1.2).
#[derive(Debug, Clone, PartialEq)]
pub struct RegionKnobs {
    /// The object mask that stands in for GroundingDINO + SAM (§2.2).
    pub mask: RegionMask,
    /// Steps with bbox guidance (`bbox_guidance_steps`, 10).
    pub guidance_steps: usize,
    /// Gradient steps per guided step (`bbox_guidance_iterations`, 5).
    pub guidance_iterations: usize,
    /// `bbox_loss_scale` (30).
    pub loss_scale: f64,
    /// Steps after which the object latents are pasted in (`latent_fusion_steps`, 20).
    pub fusion_steps: usize,
    /// `faithful`: the official loop and its quirks; `clean`: the fixes of §5 column C.
    pub schedule: PromptSchedule,
    /// The level -> stop-step map `M` (officially `[0, 5, 10, 20, 30, 40]`, not scaled).
    pub stop_steps: StopStepMap,
    /// Guidance keeps only each transformer block's inputs and recomputes one block at a time
    /// in the backward pass: the memory of one block's activations instead of all of them, for
    /// one more forward per iteration (large images on small GPUs). Same result.
    pub recompute_blocks: bool,
    /// Runs every object run to the last step, as the official code does for its detector.
    /// The masks here do not depend on the object image, so the steps after the fusion steps
    /// change nothing; this exists to show that (a test compares both).
    pub full_object_runs: bool,
}

impl Default for RegionKnobs {
    fn default() -> Self {
        Self {
            mask: RegionMask::Ellipse,
            guidance_steps: 10,
            guidance_iterations: 5,
            loss_scale: 30.0,
            fusion_steps: 20,
            schedule: PromptSchedule::Faithful,
            stop_steps: StopStepMap::SD3,
            recompute_blocks: false,
            full_object_runs: false,
        }
    }
}

/// One R2F+ generation.
#[derive(Debug, Clone)]
pub struct RegionRequest {
    pub plan: RegionPlan,
    pub negative_prompt: String,
    pub guidance: f64,
    pub seed: i64,
    pub width: i64,
    pub height: i64,
    pub steps: usize,
    pub knobs: RegionKnobs,
}

/// A request's step counts and rules, resolved for its mode.
#[derive(Debug, Clone)]
pub struct RegionSetup {
    pub rule: PhraseRule,
    pub guidance_steps: usize,
    pub fusion_steps: usize,
    /// Steps each object run takes (the fusion steps, or all with `full_object_runs`).
    pub object_steps: usize,
    /// Whether object runs happen at all (officially only when `latent_fusion_steps > 0`).
    pub object_runs: bool,
    pub faithful: bool,
}

/// `x * steps / 50`, rounded: a step count written for 50 steps, at `steps` (clean mode).
fn scaled(x: usize, steps: usize) -> usize {
    if steps == REFERENCE_STEPS {
        x
    } else {
        ((x * steps) as f64 / REFERENCE_STEPS as f64).round() as usize
    }
}

impl RegionRequest {
    /// Every run's per-step prompts and token rows under `setup` (this request's
    /// [`RegionRequest::setup`]), with `tok`'s token ids.
    pub fn text(&self, setup: &RegionSetup, tok: &dyn TokenIds) -> anyhow::Result<Vec<RunText>> {
        plan_text(
            &self.plan,
            self.steps,
            setup.object_steps,
            setup.object_runs,
            &setup.rule,
            tok,
        )
    }

    /// Checks the request against what the mode can run and resolves its step counts. Faithful
    /// mode refuses what crashes or turns NaN in the official code (§5: non-square images Q8,
    /// guidance ≤ 1 Q9, fewer steps than the stop-step map needs Q15).
    pub fn setup(&self) -> anyhow::Result<RegionSetup> {
        let k = &self.knobs;
        let faithful = k.schedule == PromptSchedule::Faithful;
        if self.plan.objects.is_empty() {
            bail!("an R2F+ plan needs at least one object");
        }
        if self.steps == 0 {
            bail!("at least one denoising step is needed");
        }
        let (stop_steps, guidance_steps, fusion_steps) = if faithful {
            if self.width != self.height {
                bail!(
                    "R2F+ in faithful mode needs a square image (got {}x{}): the official bbox \
                     loss assumes a square token grid; use schedule clean for other sizes",
                    self.width,
                    self.height
                );
            }
            if self.guidance <= 1.0 {
                bail!(
                    "R2F+ in faithful mode needs guidance above 1 (got {}): the official bbox \
                     guidance reads the conditional half of the CFG batch; use schedule clean",
                    self.guidance
                );
            }
            let m = k.stop_steps.0.to_vec();
            check_stop_steps(&m, self.steps).map_err(|e| {
                anyhow!("R2F+ in faithful mode: {e}; use 41 steps or more, or schedule clean")
            })?;
            (m, k.guidance_steps, k.fusion_steps)
        } else {
            let m = (0..6u8)
                .map(|l| k.stop_steps.stop_step(l, self.steps))
                .collect();
            (
                m,
                scaled(k.guidance_steps, self.steps),
                scaled(k.fusion_steps, self.steps),
            )
        };
        let guidance_steps = guidance_steps.min(self.steps);
        let fusion_steps = fusion_steps.min(self.steps);
        if k.guidance_steps > 0 && k.guidance_iterations > 0 && !k.loss_scale.is_finite() {
            bail!("bbox loss scale must be a finite number");
        }
        Ok(RegionSetup {
            rule: PhraseRule {
                stop_steps,
                alt_step: ALT_STEP,
                substitution: if faithful {
                    KeySubstitution::Replace
                } else {
                    KeySubstitution::Exact
                },
            },
            guidance_steps,
            fusion_steps,
            object_steps: if k.full_object_runs {
                self.steps
            } else {
                fusion_steps
            },
            object_runs: fusion_steps > 0,
            faithful,
        })
    }
}

/// The unpadded token ids the official code diffs (§1.4): CLIP-L at its length, T5 at the
/// pipeline's T5 length (`max_sequence_length` for both the embedding and the indices, Q14).
/// Memoised: a run asks for the same few strings at every step.
pub struct RegionTokenizer<'a> {
    clip: &'a PromptTokenizer,
    t5: Option<PromptTokenizer>,
    memo: RefCell<HashMap<(bool, String), Vec<i64>>>,
}

impl<'a> RegionTokenizer<'a> {
    pub fn new(
        clip: &'a PromptTokenizer,
        t5: Option<&PromptTokenizer>,
        t5_tokens: usize,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            clip,
            t5: t5.map(|t| t.with_length(t5_tokens)).transpose()?,
            memo: RefCell::new(HashMap::new()),
        })
    }

    fn ids(&self, t5: bool, prompt: &str) -> anyhow::Result<Vec<i64>> {
        let key = (t5, prompt.to_string());
        if let Some(v) = self.memo.borrow().get(&key) {
            return Ok(v.clone());
        }
        let ids = match (t5, &self.t5) {
            (false, _) => self.clip.encode_unpadded(prompt)?,
            (true, Some(t)) => t.encode_unpadded(prompt)?,
            (true, None) => Vec::new(),
        };
        self.memo.borrow_mut().insert(key, ids.clone());
        Ok(ids)
    }
}

impl TokenIds for RegionTokenizer<'_> {
    fn clip_ids(&self, prompt: &str) -> anyhow::Result<Vec<i64>> {
        self.ids(false, prompt)
    }
    fn t5_ids(&self, prompt: &str) -> anyhow::Result<Vec<i64>> {
        self.ids(true, prompt)
    }
    fn clip_rows(&self) -> usize {
        self.clip.length()
    }
}

/// The bbox-loss term of one object (`bbox_loss`, L824–844): its text rows and its box
/// rasterised on the token grid, flattened row-major (the patch order).
struct LossTerm {
    rows: Tensor,
    outside: Tensor,
}

/// One block's text attention map `[1, heads, n_image, n_text]` reduced to what the loss needs:
/// per object, the mean over its text rows, `[objects, heads, n_image]` (the official
/// `mean(-1)` on the indexed maps, taken block by block).
fn token_means(map: &Tensor, terms: &[LossTerm]) -> Tensor {
    let per_object: Vec<Tensor> = terms
        .iter()
        .map(|t| {
            map.get(0)
                .index_select(-1, &t.rows)
                .mean_dim(-1, false, None)
        })
        .collect();
    Tensor::stack(&per_object, 0)
}

/// `Σ_k loss_k / divisor` over the objects' terms (L824–870), from every block's
/// [`token_means`]: each `((Σ (1 − mask)·a) / (1 + Σ a))² · scale` with `a` the block mean, then
/// the head mean of object `k`'s token means.
fn bbox_loss(
    token_means: &[Tensor],
    terms: &[LossTerm],
    divisor: usize,
    scale: f64,
) -> anyhow::Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for (k, term) in terms.iter().enumerate() {
        let per_block: Vec<Tensor> = token_means.iter().map(|m| m.get(k as i64)).collect();
        let a = Tensor::stack(&per_block, 0)
            .mean_dim(0, false, None)
            .mean_dim(0, false, None);
        let outside = (&term.outside * &a).sum_dim_intlist(-1, false, None);
        let all = a.sum_dim_intlist(-1, false, None) + 1.0;
        let loss = (outside / all).pow_tensor_scalar(2).mean(None) * scale;
        total = Some(match total {
            Some(t) => t + loss,
            None => loss,
        });
    }
    Ok(total.ok_or_else(|| anyhow!("no bbox loss term"))? / divisor as f64)
}

/// The encodings of a generation, by prompt (each distinct string encoded once).
struct Encodings<'a> {
    pipe: &'a Sd3Pipeline,
    negative: Option<Conditioning>,
    /// prompt -> (positive alone, the CFG batch `[negative, positive]`).
    by_prompt: HashMap<String, (Conditioning, Conditioning)>,
}

impl<'a> Encodings<'a> {
    fn new(pipe: &'a Sd3Pipeline, negative_prompt: &str, cfg: bool) -> anyhow::Result<Self> {
        Ok(Self {
            pipe,
            negative: if cfg {
                Some(pipe.encode(negative_prompt)?)
            } else {
                None
            },
            by_prompt: HashMap::new(),
        })
    }

    fn get(&mut self, prompt: &str) -> anyhow::Result<&(Conditioning, Conditioning)> {
        if !self.by_prompt.contains_key(prompt) {
            let cond = self.pipe.encode(prompt)?;
            let batch = Conditioning {
                context: cond.context.shallow_clone(),
                pooled: cond.pooled.shallow_clone(),
            }
            .with_negative(self.negative.as_ref());
            self.by_prompt.insert(prompt.to_string(), (cond, batch));
        }
        Ok(&self.by_prompt[prompt])
    }
}

/// What the runs of one generation share.
struct RunContext<'a> {
    req: &'a RegionRequest,
    setup: &'a RegionSetup,
    schedule: FlowMatchSchedule,
    timesteps: Tensor,
    /// The token grid (rows, columns) of the latent.
    grid: (i64, i64),
    done: usize,
    total: usize,
    guidance_time: Duration,
    encode_time: Duration,
}

/// Per-generation record of the runs, for debugging and tests.
pub struct RegionOutput {
    pub output: Output,
    /// Each run's per-step conditioning (object runs in plan order, then `overall`).
    pub runs: Vec<RunText>,
    /// Each object's mask on the latent grid after the shift (`[1, 1, h, w]`, CPU float32).
    pub masks: Vec<Tensor>,
}

impl Sd3Pipeline {
    /// Runs an R2F+ request. `on_step(done, total)` counts the steps of every run.
    pub fn generate_regions(
        &self,
        req: &RegionRequest,
        on_step: &mut dyn FnMut(usize, usize) -> anyhow::Result<()>,
    ) -> anyhow::Result<RegionOutput> {
        let _guard = tch::no_grad_guard();
        let setup = req.setup()?;
        let f = self.vae_scale_factor();
        if req.height % f != 0 || req.width % f != 0 {
            bail!(
                "image size {}x{} is not a multiple of {f}",
                req.width,
                req.height
            );
        }
        let (lh, lw) = (req.height / f, req.width / f);
        self.transformer.check_latent_size(lh, lw)?;
        let tok = RegionTokenizer::new(&self.tok_l, self.tok_t5.as_ref(), self.t5_tokens)?;
        let runs = req.text(&setup, &tok)?;
        if setup.faithful && req.knobs.guidance_iterations > 0 {
            check_guided_rows(&runs, setup.guidance_steps)?;
        }

        // One draw per run, consecutively from one seeding: objects in plan order, then the
        // overall image (§1.10).
        let shape = [1, self.latent_channels(), lh, lw];
        let noise = seeded_draws(req.seed, &vec![&shape[..]; runs.len()]);

        let t0 = Stage::encode();
        let mut enc = Encodings::new(self, &req.negative_prompt, req.guidance > 1.0)?;
        let schedule = FlowMatchSchedule::new(self.scheduler_config(), req.steps);
        let timesteps = Tensor::from_slice(&schedule.timesteps).to_device(self.device());
        let mut ctx = RunContext {
            req,
            setup: &setup,
            schedule,
            timesteps,
            grid: self.transformer.token_grid(lh, lw),
            done: 0,
            total: runs.iter().map(|r| r.steps.len()).sum(),
            guidance_time: Duration::ZERO,
            encode_time: t0.elapsed(),
        };

        let t0 = Stage::denoise();
        // Prompts met first during the runs are encoded then: that time is encode, not denoise.
        let encoded_before = ctx.encode_time;
        let (object_runs, overall) = runs.split_at(runs.len() - 1);
        let objects = self.object_runs(req, object_runs, &noise, &mut enc, &mut ctx, on_step)?;
        let fusion_steps = setup.fusion_steps;
        let latents = self.region_run(
            &overall[0],
            &noise[noise.len() - 1],
            &mut enc,
            &mut ctx,
            on_step,
            &mut |i, z| {
                if i < fusion_steps {
                    fuse_step(z, &objects, i).map_err(anyhow::Error::msg)?;
                }
                Ok(())
            },
        )?;
        synchronize(self.device());
        let denoise = t0.elapsed();

        let t0 = Stage::decode();
        let decoded = self.vae.decode_latents(&latents);
        let image = to_u8_image(&decoded);
        let timings = Timings {
            encode: ctx.encode_time,
            denoise: denoise
                .saturating_sub(ctx.guidance_time)
                .saturating_sub(ctx.encode_time.saturating_sub(encoded_before)),
            guidance: ctx.guidance_time,
            decode: t0.elapsed(),
        };
        Ok(RegionOutput {
            output: Output {
                latents: latents.to_device(Device::Cpu).to_kind(Kind::Float),
                image,
                timings,
            },
            masks: objects
                .iter()
                .map(|o| o.mask.to_device(Device::Cpu).to_kind(Kind::Float))
                .collect(),
            runs,
        })
    }

    /// Stage A (§1.7, §1.8): each object's run with its centred box, in plan order, and its
    /// per-step latents and mask moved back to the real box.
    fn object_runs(
        &self,
        req: &RegionRequest,
        runs: &[RunText],
        noise: &[Tensor],
        enc: &mut Encodings,
        ctx: &mut RunContext,
        on_step: &mut dyn FnMut(usize, usize) -> anyhow::Result<()>,
    ) -> anyhow::Result<Vec<ShiftedObject>> {
        let mut objects = Vec::with_capacity(runs.len());
        for ((run, noise), (_, obj)) in runs.iter().zip(noise).zip(&req.plan.objects) {
            let mut by_step = Vec::with_capacity(run.steps.len());
            // The object's per-step latents are what it contributes; its last latent is not used.
            let _ = self.region_run(run, noise, enc, ctx, on_step, &mut |_, z| {
                by_step.push(z.shallow_clone());
                Ok(())
            })?;
            let mask = req
                .knobs
                .mask
                .mask(&centered_bbox(&obj.bbox), req.height, req.width);
            let shift = Some(center_shift(&obj.bbox));
            objects.push(
                refine_latents_and_mask(&by_step, &mask, shift, self.dtype())
                    .map_err(anyhow::Error::msg)?,
            );
        }
        Ok(objects)
    }

    /// One run (an object's or the overall image's): per step, the conditioning of `run`, the
    /// bbox guidance on the guided steps, the CFG velocity and the Euler step; `after_step(i,
    /// latents)` sees (and may change) the latent after step `i`. Returns the last latent.
    #[allow(clippy::too_many_arguments)]
    fn region_run(
        &self,
        run: &RunText,
        noise: &Tensor,
        enc: &mut Encodings,
        ctx: &mut RunContext,
        on_step: &mut dyn FnMut(usize, usize) -> anyhow::Result<()>,
        after_step: &mut dyn FnMut(usize, &mut Tensor) -> anyhow::Result<()>,
    ) -> anyhow::Result<Tensor> {
        let cfg = ctx.req.guidance > 1.0;
        let mut latents = noise.to_device(self.device()).to_kind(self.dtype());
        for (i, st) in run.steps.iter().enumerate() {
            let t_enc = Instant::now();
            let (cond, batch) = enc.get(&st.prompt)?;
            ctx.encode_time += t_enc.elapsed();
            let t = ctx.timesteps.narrow(0, i as i64, 1);
            let doubled = |z: &Tensor| {
                if cfg {
                    Tensor::cat(&[z, z], 0)
                } else {
                    z.shallow_clone()
                }
            };
            // Faithful (Q1): the velocity is taken at the latent from before the guidance.
            let mut input = doubled(&latents);
            if i < ctx.setup.guidance_steps && ctx.req.knobs.guidance_iterations > 0 {
                let t_guide = Instant::now();
                latents = self.guide(&latents, i, &t, cond, st, run, ctx)?;
                ctx.guidance_time += t_guide.elapsed();
                if !ctx.setup.faithful {
                    input = doubled(&latents);
                }
            }
            let batch_t = t.expand([input.size()[0]], false);
            let v = self
                .transformer
                .forward(&input, &batch_t, &batch.context, &batch.pooled)?;
            let v = if cfg {
                apply_cfg_to_batch(&v, ctx.req.guidance)
            } else {
                v
            };
            latents = ctx.schedule.step(i, &latents, &v);
            after_step(i, &mut latents)?;
            ctx.done += 1;
            on_step(ctx.done, ctx.total)?;
        }
        Ok(latents)
    }

    /// `guide_latents_with_bboxes` (L809–894, §1.5): `iterations` plain gradient steps of size
    /// σ_i² on the latent against the bbox loss of `run`'s boxes, the maps taken from a batch-1
    /// forward with the conditional embeddings alone (what the official broadcast computes for
    /// its conditional half). Gradients flow to the latent only: the weights hold none.
    #[allow(clippy::too_many_arguments)]
    fn guide(
        &self,
        latents: &Tensor,
        i: usize,
        t: &Tensor,
        cond: &Conditioning,
        st: &StepText,
        run: &RunText,
        ctx: &RunContext,
    ) -> anyhow::Result<Tensor> {
        let (gh, gw) = ctx.grid;
        let mut terms = Vec::with_capacity(run.boxes.len());
        for (key, bbox) in &run.boxes {
            let rows = st
                .indices(key)
                .ok_or_else(|| anyhow!("the {} run's prompt does not name {key}", run.run))?;
            if rows.is_empty() {
                // Clean mode drops the term (faithful mode refused the request up front).
                continue;
            }
            let inside = box_mask(bbox, gh, gw).view([-1]);
            terms.push(LossTerm {
                rows: Tensor::from_slice(rows).to_device(self.device()),
                outside: (inside.ones_like() - inside).to_device(self.device()),
            });
        }
        if terms.is_empty() {
            return Ok(latents.shallow_clone());
        }
        let sigma = ctx.schedule.sigmas[i];
        let step_size = (sigma * sigma) as f64;
        let divisor = st.objects.len();
        let scale = ctx.req.knobs.loss_scale;
        let mut latents = latents.detach();
        let reduce = |map: &Tensor| token_means(map, &terms);
        let loss = |means: &[Tensor]| bbox_loss(means, &terms, divisor, scale);
        for _ in 0..ctx.req.knobs.guidance_iterations {
            let grad = self.transformer.text_map_gradient(
                &latents,
                t,
                &cond.context,
                &cond.pooled,
                &reduce,
                &loss,
                ctx.req.knobs.recompute_blocks,
            )?;
            // Not in place: the caller still holds the latent this one was detached from.
            latents = latents.g_sub(&(grad * step_size));
        }
        Ok(latents)
    }
}
