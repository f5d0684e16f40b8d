//! R2F+ region geometry: the pure, model-free parts of the official R2F+ pipeline
//! (`R2Fplus_Diffusion_sd3.py` in krafton-ai/Rare-to-Frequent @ 834f459; `Lnnn` below are its
//! line numbers, `§x.y` are sections of `docs/r2fplus.md`).
//!
//! What lives here:
//! - Python's `round` ([`round_half_even`]), used for every grid and shift rounding (§5 Q5);
//! - the centred box of stage A ([`centered_bbox`], L1331–1336) and the shift back to the real box
//!   ([`center_shift`], L1374; [`latent_shift`], L1098);
//! - the detector-free object masks at **image (pixel) resolution** H×W ([`box_mask`],
//!   [`ellipse_mask`], [`RegionMask`]; §2.2). They stand in for `get_single_object_mask`
//!   (L1036–1078), which returns an H×W mask of the decoded object image;
//! - `refine_latents_and_mask` (L1080–1108, §1.8): bilinear resize of the mask to the latent grid
//!   h×w, `torch.roll` (with wrap) of the per-step latents, zero-filled shift of the mask
//!   ([`mask_to_latent`], [`roll_latent`], [`shift_mask`], [`refine_latents_and_mask`]);
//! - the stage-B fusion (L1233–1240, §1.9: [`fuse_latents`], [`fuse_step`]);
//! - the per-step phrase rule of R2F+ objects (L759–767, §1.4: [`frequent_phrase_index`],
//!   [`object_phrase`]) and the tokenizer-free half of the token-index computation
//!   ([`token_diff_span`], [`joint_token_indices`]).

use std::ops::Range;

use tch::{Kind, Tensor};

/// A box `[x_min, y_min, x_max, y_max]` in normalised image coordinates (`[0, 1]`).
pub type BBox = [f64; 4];

/// Python's `round(x)` on a float (and numpy's `rint`): to the nearest integer, ties to even.
///
/// The official code rounds with Python's built-in `round` in the bbox-loss grid mask (L833–835)
/// and in the latent shift (L1098); both round half to even (§5 Q5). `-0.5` rounds to `0`.
/// Values beyond the `i64` range saturate (Python would return a big integer; sizes here are
/// small).
pub fn round_half_even(x: f64) -> i64 {
    x.round_ties_even() as i64
}

/// The box moved to the image centre, as stage A of the official code computes it with
/// `use_centered_bbox=True` (L1331–1336, §1.3, §1.7):
///
/// `[(1 - x1 + x0)/2, (1 - y1 + y0)/2, (1 + x1 - x0)/2, (1 + y1 - y0)/2]`
///
/// evaluated left to right in f64 exactly as Python does (`((1 - x1) + x0) / 2`, …), so the result
/// is bit-identical to the official one. Width and height are kept; the centre is `(0.5, 0.5)`.
pub fn centered_bbox(bbox: &BBox) -> BBox {
    let [x0, y0, x1, y1] = *bbox;
    [
        (1.0 - x1 + x0) / 2.0,
        (1.0 - y1 + y0) / 2.0,
        (1.0 + x1 - x0) / 2.0,
        (1.0 + y1 - y0) / 2.0,
    ]
}

/// The offset `(dy, dx)` of the real box's centre from the image centre, in image fractions, as
/// the official code computes it (L1374, §1.3): `((y0 + y1 - 1) / 2, (x0 + x1 - 1) / 2)`,
/// evaluated left to right in f64. Positive means down / right.
pub fn center_shift(bbox: &BBox) -> (f64, f64) {
    let [x0, y0, x1, y1] = *bbox;
    ((y0 + y1 - 1.0) / 2.0, (x0 + x1 - 1.0) / 2.0)
}

/// The integer shift `(sy, sx)` on a latent grid of `h × w` cells (L1098, §1.8):
/// `(round(dy * h), round(dx * w))` with Python's `round` (ties to even). `h`, `w` are the latent
/// height and width (`H/8`, `W/8`: 128 at 1024²), not the image size.
pub fn latent_shift(shift: (f64, f64), h: i64, w: i64) -> (i64, i64) {
    (
        round_half_even(shift.0 * h as f64),
        round_half_even(shift.1 * w as f64),
    )
}

crate::named_enum! {
    /// The detector-free object mask that replaces GroundingDINO + SAM (§2.2); the default is
    /// `Ellipse` (the spec's proposed default).
    #[derive(Default)]
    pub enum RegionMask("region mask") {
        /// The ellipse inscribed in the box ([`ellipse_mask`]).
        #[default]
        Ellipse = "ellipse",
        /// The box itself, rasterised with ties-to-even edges ([`box_mask`]).
        Box = "box",
    }
}

impl RegionMask {
    /// The mask of `bbox` at image resolution `height × width` (float32 `[height, width]` on the
    /// CPU, 1 inside, 0 outside). In the faithful pipeline `bbox` is the **centred** box
    /// ([`centered_bbox`]) and `height × width` the image size: this is the stand-in for the
    /// official `get_single_object_mask(image, …)` (L1036–1078), whose output is an H×W mask of
    /// the object image (§2.2, §4).
    pub fn mask(&self, bbox: &BBox, height: i64, width: i64) -> Tensor {
        match self {
            Self::Ellipse => ellipse_mask(bbox, height, width),
            Self::Box => box_mask(bbox, height, width),
        }
    }
}

fn mask_tensor(values: Vec<f32>, height: i64, width: i64) -> Tensor {
    Tensor::from_slice(&values).view([height, width])
}

/// The `box` mask of §2.2: `m[r, c] = 1` iff `rhe(y0·H) ≤ r < rhe(y1·H)` and
/// `rhe(x0·W) ≤ c < rhe(x1·W)`, with `rhe` = [`round_half_even`]. Float32 `[height, width]` on
/// the CPU.
///
/// For a box inside `[0, 1]` this is exactly the official slice assignment
/// `mask[round(y0*H):round(y1*H), round(x0*W):round(x1*W)] = 1`; with `height = width = G` it is
/// also the bbox-loss mask on the G×G token grid (L833–838, §1.5). Coordinates outside `[0, 1]`
/// follow the inequality above (they clip), not Python's negative-index slicing.
pub fn box_mask(bbox: &BBox, height: i64, width: i64) -> Tensor {
    let [x0, y0, x1, y1] = *bbox;
    let (r0, r1) = (
        round_half_even(y0 * height as f64),
        round_half_even(y1 * height as f64),
    );
    let (c0, c1) = (
        round_half_even(x0 * width as f64),
        round_half_even(x1 * width as f64),
    );
    let mut values = Vec::with_capacity((height * width).max(0) as usize);
    for r in 0..height {
        let row_in = (r0..r1).contains(&r);
        for c in 0..width {
            values.push(if row_in && (c0..c1).contains(&c) {
                1.0
            } else {
                0.0
            });
        }
    }
    mask_tensor(values, height, width)
}

/// The `ellipse` mask of §2.2: the ellipse inscribed in the box. `m[r, c] = 1` iff
/// `dx·dx + dy·dy ≤ 1`, all in f64 and evaluated as written:
/// `dx = (c + 0.5 − cx)/rx`, `dy = (r + 0.5 − cy)/ry`, `cx = (x0 + x1)/2·W`, `cy = (y0 + y1)/2·H`,
/// `rx = (x1 − x0)/2·W`, `ry = (y1 − y0)/2·H`. Empty when `rx ≤ 0` or `ry ≤ 0` (or NaN). Float32
/// `[height, width]` on the CPU. Pixel centres exactly on the ellipse are inside.
pub fn ellipse_mask(bbox: &BBox, height: i64, width: i64) -> Tensor {
    let [x0, y0, x1, y1] = *bbox;
    let (hf, wf) = (height as f64, width as f64);
    let cx = (x0 + x1) / 2.0 * wf;
    let cy = (y0 + y1) / 2.0 * hf;
    let rx = (x1 - x0) / 2.0 * wf;
    let ry = (y1 - y0) / 2.0 * hf;
    let n = (height * width).max(0) as usize;
    if rx.is_nan() || ry.is_nan() || rx <= 0.0 || ry <= 0.0 {
        return mask_tensor(vec![0.0; n], height, width);
    }
    let mut values = Vec::with_capacity(n);
    for r in 0..height {
        let dy = (r as f64 + 0.5 - cy) / ry;
        for c in 0..width {
            let dx = (c as f64 + 0.5 - cx) / rx;
            values.push(if dx * dx + dy * dy <= 1.0 { 1.0 } else { 0.0 });
        }
    }
    mask_tensor(values, height, width)
}

/// The first half of `refine_latents_and_mask` (L1086–1094, §1.8): the image-resolution mask
/// (`[H, W]`, any kind; the official one is bool) to the latent grid `h × w`.
///
/// Exactly `F.interpolate(mask.float()[None, None], size=(h, w), mode='bilinear',
/// align_corners=False)` (no antialias, no scale factors; the same ATen kernel), then
/// `.to(model_kind)` as the official `.to(dtype=self.text_encoder.dtype)` does (a no-op for
/// float32 runs; for `Half` it rounds through fp16). Returns `[1, 1, h, w]` of `model_kind`.
///
/// With `H = 8h` each output cell samples source coordinate `8i + 3.5`, i.e. it is the mean of
/// the 2×2 centre pixels of its 8×8 block (values in {0, .25, .5, .75, 1}; §5 Q6).
pub fn mask_to_latent(mask: &Tensor, h: i64, w: i64, model_kind: Kind) -> Tensor {
    let size = mask.size();
    let (mh, mw) = (size[size.len() - 2], size[size.len() - 1]);
    mask.to_kind(Kind::Float)
        .reshape([1, 1, mh, mw])
        .upsample_bilinear2d([h, w], false, None, None)
        .to_kind(model_kind)
}

/// `torch.roll(latent, shifts=(sy, sx), dims=(-2, -1))` (L1099–1101, §1.8): the per-step object
/// latents are moved **with wrap-around**: `out[.., r, c] = z[.., (r − sy) mod h, (c − sx) mod w]`.
pub fn roll_latent(latent: &Tensor, shift: (i64, i64)) -> Tensor {
    latent.roll([shift.0, shift.1], [-2, -1])
}

/// The official mask shift (L1103–1106, §1.8): pad the mask with zeros to `2h × 2w`
/// (bottom, then right), `torch.roll` by `(sy, sx)` over the last two dims, crop back to
/// `[.., :h, :w]`. For `|sy| ≤ h` and `|sx| ≤ w` (always: `|shift| ≤ 0.5`) this is a shift
/// **without wrap**: `out[r, c] = m[r − sy, c − sx]` when in range, else 0.
///
/// The zeros are float32 (`torch.zeros(shape)` takes the default dtype), so `torch.cat` promotes
/// and the result is **float32** whatever the mask's kind; it stays on the mask's device.
pub fn shift_mask(mask: &Tensor, shift: (i64, i64)) -> Tensor {
    let size = mask.size();
    let nd = size.len();
    let (h, w) = (size[nd - 2], size[nd - 1]);
    let device = mask.device();
    // fp16 -> fp32 is exact, so converting first equals cat's type promotion.
    let m = mask.to_kind(Kind::Float);
    let zeros_h = Tensor::zeros(m.size(), (Kind::Float, device));
    let padded = Tensor::cat(&[&m, &zeros_h], -2);
    let zeros_w = Tensor::zeros(padded.size(), (Kind::Float, device));
    let padded = Tensor::cat(&[&padded, &zeros_w], -1);
    padded
        .roll([shift.0, shift.1], [-2, -1])
        .narrow(-2, 0, h)
        .narrow(-1, 0, w)
}

/// One object's stage-A output moved to its real box: what the official code stores in
/// `object_latents_dict_by_step[i][key]` and `object_mask_dict[key]` (L1376–1384).
#[derive(Debug)]
pub struct ShiftedObject {
    /// The rolled latent after each object-run step `i` (`[1, C, h, w]`), step order.
    pub latents_by_step: Vec<Tensor>,
    /// The soft mask on the latent grid, `[1, 1, h, w]`.
    pub mask: Tensor,
}

/// `refine_latents_and_mask(latents_by_step, object_mask, shifts)` (L1080–1108, §1.8).
///
/// - `latents_by_step`: the object run's latent after each step (`[1, C, h, w]`); the latent
///   grid `h × w` is read from the last one, as officially.
/// - `mask`: the image-resolution mask (`[H, W]`, any kind; e.g. [`RegionMask::mask`] of the
///   centred box).
/// - `shift`: [`center_shift`] of the real box, or `None` for `use_centered_bbox=False`.
/// - `model_kind`: the pipeline dtype (`text_encoder.dtype`), through which the resized mask is
///   rounded.
///
/// Steps: [`mask_to_latent`]; then, when `shift` is `Some`, `(sy, sx) =` [`latent_shift`],
/// every latent [`roll_latent`]-ed (with wrap) and the mask [`shift_mask`]-ed (zero fill,
/// float32). The official `if shifts:` is true for any 2-tuple, `(0.0, 0.0)` included, so
/// `Some((0.0, 0.0))` still converts the mask to float32; with `None` the mask stays in
/// `model_kind` and the latents are returned unchanged (shallow copies).
pub fn refine_latents_and_mask(
    latents_by_step: &[Tensor],
    mask: &Tensor,
    shift: Option<(f64, f64)>,
    model_kind: Kind,
) -> Result<ShiftedObject, String> {
    let last = latents_by_step
        .last()
        .ok_or_else(|| "refine_latents_and_mask: no latents".to_string())?;
    let size = last.size();
    if size.len() < 2 || mask.dim() != 2 {
        return Err(format!(
            "refine_latents_and_mask: expected [.., h, w] latents and an [H, W] mask, got {:?} and {:?}",
            size,
            mask.size()
        ));
    }
    let (h, w) = (size[size.len() - 2], size[size.len() - 1]);
    let resized = mask_to_latent(mask, h, w, model_kind);
    Ok(match shift {
        Some(s) => {
            let s = latent_shift(s, h, w);
            ShiftedObject {
                latents_by_step: latents_by_step.iter().map(|z| roll_latent(z, s)).collect(),
                mask: shift_mask(&resized, s),
            }
        }
        None => ShiftedObject {
            latents_by_step: latents_by_step.iter().map(|z| z.shallow_clone()).collect(),
            mask: resized,
        },
    })
}

/// The stage-B fusion of one step (L1235–1240, §1.9), **in place** on `latents`, for the objects
/// `(object_latent, mask)` in **plan order**:
///
/// ```text
/// for each object: latents *= 1 - mask; latents += object_latent * mask
/// ```
///
/// i.e. `x ← x·(1 − m_k) + z_k·m_k`, as two in-place ops (not `x + (z − x)·m`: the rounding
/// differs). Later objects overwrite earlier ones where masks overlap, in proportion to their
/// mask value. Object latents and masks are moved to `latents`' device first (the official
/// `.to(device)`); the arithmetic follows ATen's type promotion, so an fp16 `latents` with an
/// fp32 mask is computed in fp32 and stored in fp16, as officially. The official code applies
/// this after the Euler step of each step `i < latent_fusion_steps` (20), with `object_latent`
/// the object's rolled latent after ITS step `i`.
///
/// In place like the official `*=`/`+=`: any shallow clone of `latents` sees the change.
pub fn fuse_latents(latents: &mut Tensor, objects: &[(&Tensor, &Tensor)]) {
    let device = latents.device();
    for (object_latent, mask) in objects {
        let mask = mask.to_device(device);
        let object_latent = object_latent.to_device(device);
        let _ = latents.g_mul_(&mask.rsub_scalar(1.0));
        let _ = latents.g_add_(&(&object_latent * &mask));
    }
}

/// [`fuse_latents`] with every object's latent after step `step`, objects in plan order.
/// Errors (before touching `latents`) when an object has no latent for that step.
pub fn fuse_step(
    latents: &mut Tensor,
    objects: &[ShiftedObject],
    step: usize,
) -> Result<(), String> {
    let mut pairs = Vec::with_capacity(objects.len());
    for (k, o) in objects.iter().enumerate() {
        let z = o.latents_by_step.get(step).ok_or_else(|| {
            format!(
                "fuse_step: object {k} has {} stored steps, step {step} requested",
                o.latents_by_step.len()
            )
        })?;
        pairs.push((z, &o.mask));
    }
    fuse_latents(latents, &pairs);
    Ok(())
}

/// The R2F+ per-object phrase rule (L759–767, §1.4), as an index into the object's `r2f` list:
/// `Some(j)` = the frequent phrase `r2f[j]`, `None` = the rare phrase `object`.
///
/// ```text
/// j = 0; while j < len(r2f) and step >= M[levels[j]]: j += 1
/// frequent r2f[j] if j < len(r2f) and step % alt_step == 0, else rare
/// ```
///
/// - `stop_steps` is `M` (`visual_detail_level_to_transition_step`), indexed by level. Faithful
///   mode passes the **unscaled** `[0, 5, 10, 20, 30, 40]` (`StopStepMap::SD3.0`) and absolute
///   steps (§5 Q15); see [`check_stop_steps`]. `alt_step` is 2 (`super::ALT_STEP`).
/// - A level of 0 is skipped at once (`M[0] = 0`); an empty `r2f` always gives the rare phrase.
/// - Deviations only for plans the validator rejects (the official code raises): levels past the
///   end of `stop_steps` use its last entry, as `StopStepMap::stop_step` does; `levels` shorter
///   than `r2f_len` counts only the levels given; `alt_step == 0` never picks a frequent phrase.
pub fn frequent_phrase_index(
    r2f_len: usize,
    levels: &[u8],
    step: usize,
    stop_steps: &[usize],
    alt_step: usize,
) -> Option<usize> {
    let stop = |level: u8| -> usize {
        let l = (level as usize).min(stop_steps.len().saturating_sub(1));
        stop_steps.get(l).copied().unwrap_or(0)
    };
    let n = r2f_len.min(levels.len());
    let mut j = 0;
    while j < n && step >= stop(levels[j]) {
        j += 1;
    }
    let frequent_step = alt_step != 0 && step.is_multiple_of(alt_step);
    (j < n && frequent_step).then_some(j)
}

/// The phrase that replaces the object's `#N` key at `step` (L764–767, §1.4): `r2f[j]` for
/// `Some(j) =` [`frequent_phrase_index`], else `rare` (the object's `object` field). Identical in
/// stage A (object template) and stage B (base prompt).
pub fn object_phrase<'a, S: AsRef<str>>(
    rare: &'a str,
    r2f: &'a [S],
    levels: &[u8],
    step: usize,
    stop_steps: &[usize],
    alt_step: usize,
) -> &'a str {
    match frequent_phrase_index(r2f.len(), levels, step, stop_steps, alt_step) {
        Some(j) => r2f[j].as_ref(),
        None => rare,
    }
}

/// `check_inputs` on the stop-step map (L587–592, §1.2): `M` strictly increasing and
/// `M[-1] < steps` (so the faithful map needs at least 41 steps).
pub fn check_stop_steps(stop_steps: &[usize], steps: usize) -> Result<(), String> {
    let Some(&last) = stop_steps.last() else {
        return Err("the stop-step map is empty".into());
    };
    if stop_steps.windows(2).any(|p| p[0] >= p[1]) {
        return Err(format!(
            "the stop-step map {stop_steps:?} must be strictly increasing"
        ));
    }
    if last >= steps {
        return Err(format!(
            "the stop-step map {stop_steps:?} needs more than {last} steps (got {steps})"
        ));
    }
    Ok(())
}

/// CLIP-L's `model_max_length`: T5 token positions are offset by it in the 333-row joint text
/// sequence (`self.tokenizer_max_length`, L799).
pub const CLIP_TOKEN_OFFSET: usize = 77;

/// The span of tokens that differ between the token ids of a prompt before (`old`) and after
/// (`new`) one key's substitution (L773–797, §1.4), as positions in `new`:
///
/// - `start` = the first `i < len(new)` with `old[i] != new[i]`;
/// - `s` = the number of equal tokens counted from the back (`old[-1-j] == new[-1-j]`) while
///   `j < len(new)`; `end = len(new) − s`.
///
/// The prefix and suffix may overlap. The raw `start..end` is returned as is: `end == start` is
/// an empty set (an empty phrase; Q11: the official loss then averages over nothing and turns
/// NaN), and `end < start` is a reversed range, on which the official `torch.arange(start, end)`
/// raises ("upper bound and lower bound inconsistent with step sign"); [`joint_token_indices`]
/// reports that as an error. The ids must be the
/// **unpadded** ids (BOS/EOS or `</s>` included), so the special tokens fall in the common
/// prefix/suffix. Where `old` is shorter than the comparison reaches, the official code raises
/// IndexError; this stops there instead (never the case for framed, i.e. BOS/EOS-delimited, ids).
pub fn token_diff_span<T: PartialEq>(old: &[T], new: &[T]) -> Range<usize> {
    let mut start = 0;
    while start < new.len() && start < old.len() && old[start] == new[start] {
        start += 1;
    }
    let mut s = 0;
    while s < new.len() && s < old.len() && old[old.len() - 1 - s] == new[new.len() - 1 - s] {
        s += 1;
    }
    start..new.len() - s
}

/// `torch.cat([arange(clip), arange(t5) + 77])` (L784–801): the object's rows in the joint
/// 333-row text sequence (CLIP rows 0–76, T5 rows from 77). An empty span (`end == start`)
/// contributes nothing; a reversed span (`end < start`) is an error, as `torch.arange` raises
/// on it officially.
pub fn joint_token_indices(clip: Range<usize>, t5: Range<usize>) -> Result<Vec<i64>, String> {
    for (name, r) in [("CLIP", &clip), ("T5", &t5)] {
        if r.end < r.start {
            return Err(format!(
                "{name} token span {}..{} is reversed (the substitution's prefix and suffix overlap)",
                r.start, r.end
            ));
        }
    }
    Ok(clip
        .map(|i| i as i64)
        .chain(t5.map(|i| (i + CLIP_TOKEN_OFFSET) as i64))
        .collect())
}

// The tokenizer-dependent rest of `get_current_prompt_and_object_indices` (keys in order of
// appearance, the substitution, the unpadded ids) is `super::plus::step_text`.

#[cfg(test)]
#[path = "regions_tests.rs"]
mod tests;
