//! Unit tests of `regions.rs` (kept apart so that the module reads top to bottom).

use super::*;
use crate::r2f::{StopStepMap, ALT_STEP};
use tch::Device;

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).unwrap()
}

fn grid(rows: &[&str]) -> Vec<f32> {
    rows.iter()
        .flat_map(|r| r.chars().map(|c| if c == '#' { 1.0 } else { 0.0 }))
        .collect()
}

#[test]
fn round_half_even_ties_to_even() {
    assert_eq!(round_half_even(0.5), 0);
    assert_eq!(round_half_even(1.5), 2);
    assert_eq!(round_half_even(2.5), 2);
    assert_eq!(round_half_even(-0.5), 0);
    assert_eq!(round_half_even(-1.5), -2);
    assert_eq!(round_half_even(-2.5), -2);
    assert_eq!(round_half_even(3.5), 4);
    assert_eq!(round_half_even(0.49999999999999994), 0);
    assert_eq!(round_half_even(2.5000000000000004), 3);
    assert_eq!(round_half_even(-25.6), -26);
}

#[test]
fn centered_bbox_off_centre_matches_python_bits() {
    // Python: [(1 - .7 + .1)/2, (1 - .85 + .15)/2, (1 + .7 - .1)/2, (1 + .85 - .15)/2]
    //       = [0.2, 0.15000000000000002, 0.7999999999999999, 0.8500000000000001]
    let c = centered_bbox(&[0.1, 0.15, 0.7, 0.85]);
    assert_eq!(
        c,
        [
            0.2,
            0.15000000000000002,
            0.7999999999999999,
            0.8500000000000001
        ]
    );
    // Another evaluation order, ((1 + x0) - x1) / 2, gives 0.20000000000000007: not official.
    assert_ne!(c[0], ((1.0 + 0.1) - 0.7) / 2.0);
    // Size kept, centre at 0.5.
    let c = centered_bbox(&[0.5, 0.5, 1.0, 1.0]);
    assert_eq!(c, [0.25, 0.25, 0.75, 0.75]);
}

#[test]
fn centered_bbox_full_frame_is_the_full_frame() {
    assert_eq!(centered_bbox(&[0.0, 0.0, 1.0, 1.0]), [0.0, 0.0, 1.0, 1.0]);
    assert_eq!(center_shift(&[0.0, 0.0, 1.0, 1.0]), (0.0, 0.0));
    assert_eq!(latent_shift((0.0, 0.0), 128, 128), (0, 0));
}

#[test]
fn center_shift_and_latent_shift_round_half_even() {
    // Python: ((.15 + .85 - 1)/2, (.1 + .7 - 1)/2) = (0.0, -0.10000000000000003)
    let s = center_shift(&[0.1, 0.15, 0.7, 0.85]);
    assert_eq!(s, (0.0, -0.10000000000000003));
    assert_eq!(latent_shift(s, 128, 128), (0, -13)); // -12.8 -> -13
                                                     // Exact ties on an 8-cell grid: y0 + y1 = 1.125 -> 0.0625 * 8 = 0.5 -> 0;
                                                     // x0 + x1 = 1.375 -> 0.1875 * 8 = 1.5 -> 2.
    let s = center_shift(&[0.625, 0.5, 0.75, 0.625]);
    assert_eq!(s, (0.0625, 0.1875));
    assert_eq!(latent_shift(s, 8, 8), (0, 2));
    // 2.5 -> 2 and -0.5 -> 0.
    assert_eq!(latent_shift((0.3125, -0.0625), 8, 8), (2, 0));
}

#[test]
fn box_mask_half_pixel_edges_non_square() {
    // H=4, W=6: rows rhe(0.5)=0 .. rhe(3.5)=4, cols rhe(1.5)=2 .. rhe(4.5)=4.
    let m = box_mask(&[0.25, 0.125, 0.75, 0.875], 4, 6);
    assert_eq!(m.size(), vec![4, 6]);
    assert_eq!(m.kind(), Kind::Float);
    assert_eq!(m.device(), Device::Cpu);
    assert_eq!(values(&m), grid(&["..##..", "..##..", "..##..", "..##.."]));
    // H=4, W=6: rows rhe(1.5)=2 .. rhe(2.5)=2 -> empty.
    let m = box_mask(&[0.0, 0.375, 1.0, 0.625], 4, 6);
    assert!(values(&m).iter().all(|&v| v == 0.0));
    // H=2, W=5: rows rhe(1)=1 .. 2, cols rhe(0.5)=0 .. rhe(2.5)=2.
    let m = box_mask(&[0.1, 0.5, 0.5, 1.0], 2, 5);
    assert_eq!(values(&m), grid(&[".....", "##..."]));
}

#[test]
fn box_mask_of_the_centred_box_is_the_token_grid_mask() {
    // Centred [0.25, 0.25, 0.75, 0.75] on a 4x4 grid: rows/cols 1..3.
    let m = box_mask(&centered_bbox(&[0.5, 0.5, 1.0, 1.0]), 4, 4);
    assert_eq!(values(&m), grid(&["....", ".##.", ".##.", "...."]));
    // Full frame covers everything.
    let m = box_mask(&[0.0, 0.0, 1.0, 1.0], 3, 5);
    assert!(values(&m).iter().all(|&v| v == 1.0));
}

#[test]
fn ellipse_mask_hand_computed_non_square() {
    // H=4, W=6, full frame: cx=3, cy=2, rx=3, ry=2.
    // dx^2 per col: .694 .25 .028 .028 .25 .694; dy^2 per row: .5625 .0625 .0625 .5625.
    let m = ellipse_mask(&[0.0, 0.0, 1.0, 1.0], 4, 6);
    assert_eq!(m.size(), vec![4, 6]);
    assert_eq!(m.kind(), Kind::Float);
    assert_eq!(values(&m), grid(&[".####.", "######", "######", ".####."]));
}

#[test]
fn ellipse_mask_boundary_is_inside() {
    // H=1, W=4, x in [0.125, 0.375]: cx = 1, rx = 0.5; cy = ry = 0.5.
    // c=0: dx=-1, c=1: dx=1 (exactly on the ellipse -> inside), c=2: dx=3.
    let m = ellipse_mask(&[0.125, 0.0, 0.375, 1.0], 1, 4);
    assert_eq!(values(&m), vec![1.0, 1.0, 0.0, 0.0]);
}

#[test]
fn ellipse_mask_degenerate_is_empty() {
    let m = ellipse_mask(&[0.5, 0.2, 0.5, 0.8], 4, 6);
    assert_eq!(m.size(), vec![4, 6]);
    assert!(values(&m).iter().all(|&v| v == 0.0));
    let m = ellipse_mask(&[0.2, 0.5, 0.8, 0.5], 4, 6);
    assert!(values(&m).iter().all(|&v| v == 0.0));
    // x1 < x0: rx < 0.
    let m = ellipse_mask(&[0.8, 0.2, 0.2, 0.8], 4, 6);
    assert!(values(&m).iter().all(|&v| v == 0.0));
}

#[test]
fn region_mask_names_parse_and_serde() {
    assert_eq!(RegionMask::default(), RegionMask::Ellipse);
    for m in [RegionMask::Ellipse, RegionMask::Box] {
        assert_eq!(RegionMask::parse(m.name()), Ok(m));
        assert_eq!(m.to_string().parse::<RegionMask>(), Ok(m));
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, format!("\"{}\"", m.name()));
        assert_eq!(serde_json::from_str::<RegionMask>(&json).unwrap(), m);
    }
    assert!(RegionMask::parse("Ellipse").is_err());
    assert!(RegionMask::parse("sam").is_err());
    let b = [0.0, 0.0, 1.0, 1.0];
    assert_eq!(
        values(&RegionMask::Box.mask(&b, 4, 6)),
        values(&box_mask(&b, 4, 6))
    );
    assert_eq!(
        values(&RegionMask::Ellipse.mask(&b, 4, 6)),
        values(&ellipse_mask(&b, 4, 6))
    );
}

#[test]
fn mask_to_latent_is_the_mean_of_the_2x2_centre_pixels() {
    // H=16, W=24 -> h=2, w=3: an irregular pattern, compared per block with the mean of
    // pixels (8i+3|8i+4) x (8j+3|8j+4).
    let (hh, ww) = (16i64, 24i64);
    let px: Vec<f32> = (0..hh * ww)
        .map(|k| {
            let (r, c) = (k / ww, k % ww);
            if (r * 7 + c * 3) % 5 == 0 || (r + c) % 4 == 1 {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_slice(&px).view([hh, ww]).to_kind(Kind::Bool);
    let lat = mask_to_latent(&mask, 2, 3, Kind::Float);
    assert_eq!(lat.size(), vec![1, 1, 2, 3]);
    assert_eq!(lat.kind(), Kind::Float);
    let got = values(&lat);
    for i in 0..2 {
        for j in 0..3 {
            let at = |r: i64, c: i64| px[(r * ww + c) as usize];
            let want = (at(8 * i + 3, 8 * j + 3)
                + at(8 * i + 3, 8 * j + 4)
                + at(8 * i + 4, 8 * j + 3)
                + at(8 * i + 4, 8 * j + 4))
                / 4.0;
            assert_eq!(got[(i * 3 + j) as usize], want, "cell {i},{j}");
        }
    }
    // Only the centre pixels matter: a block with every other pixel set reads 0.
    let mut ring = vec![1.0f32; 64];
    for (r, c) in [(3, 3), (3, 4), (4, 3), (4, 4)] {
        ring[r * 8 + c] = 0.0;
    }
    ring[3 * 8 + 4] = 1.0;
    let lat = mask_to_latent(&Tensor::from_slice(&ring).view([8, 8]), 1, 1, Kind::Half);
    assert_eq!(lat.kind(), Kind::Half);
    assert_eq!(values(&lat), vec![0.25]);
}

#[test]
fn roll_latent_wraps_with_known_pattern() {
    // [1, 2, 3, 4] latent with value 100*ch + 10*r + c.
    let z = Tensor::from_slice(
        &(0..24)
            .map(|k| (100 * (k / 12) + 10 * ((k / 4) % 3) + k % 4) as f32)
            .collect::<Vec<_>>(),
    )
    .view([1, 2, 3, 4]);
    let out = values(&roll_latent(&z, (1, -1)));
    for ch in 0..2i64 {
        for r in 0..3i64 {
            for c in 0..4i64 {
                let (sr, sc) = ((r - 1).rem_euclid(3), (c + 1).rem_euclid(4));
                let want = (100 * ch + 10 * sr + sc) as f32;
                assert_eq!(out[(ch * 12 + r * 4 + c) as usize], want);
            }
        }
    }
}

#[test]
fn shift_mask_zero_fills_where_roll_wraps() {
    // 1 at the bottom-right corner of a 4x4 mask, shifted by (1, 1).
    let mut px = vec![0.0f32; 16];
    px[15] = 1.0;
    let m = Tensor::from_slice(&px).view([1, 1, 4, 4]);
    let shifted = shift_mask(&m, (1, 1));
    let rolled = roll_latent(&m, (1, 1));
    assert!(values(&shifted).iter().all(|&v| v == 0.0));
    assert_eq!(values(&rolled)[0], 1.0);
    // Negative shift of a top-left block: moves up/left, zero fill at the bottom/right.
    let m = Tensor::from_slice(&grid(&["##..", "##..", "....", "...."])).view([1, 1, 4, 4]);
    assert_eq!(
        values(&shift_mask(&m, (-1, -1))),
        grid(&["#...", "....", "....", "...."])
    );
    assert_eq!(
        values(&roll_latent(&m, (-1, -1))),
        grid(&["#..#", "....", "....", "#..#"])
    );
    // Half in, float out; shape and interior values kept.
    let out = shift_mask(&m.to_kind(Kind::Half), (1, 2));
    assert_eq!(out.kind(), Kind::Float);
    assert_eq!(out.size(), vec![1, 1, 4, 4]);
    assert_eq!(values(&out), grid(&["....", "..##", "..##", "...."]));
}

#[test]
fn refine_moves_the_centred_object_to_its_box() {
    // Image 32x32 -> latent 4x4; real box [0.5, 0.5, 1, 1] (bottom-right quarter).
    let real = [0.5, 0.5, 1.0, 1.0];
    let centred = centered_bbox(&real); // [.25, .25, .75, .75]
    let mask = RegionMask::Box.mask(&centred, 32, 32); // pixels 8..24
    let z: Vec<Tensor> = (0..3)
        .map(|s| {
            Tensor::from_slice(&(0..32).map(|k| (k + 100 * s) as f32).collect::<Vec<_>>())
                .view([1, 2, 4, 4])
        })
        .collect();
    let shift = center_shift(&real); // (0.25, 0.25) -> (1, 1) cells
    let out = refine_latents_and_mask(&z, &mask, Some(shift), Kind::Float).unwrap();
    assert_eq!(out.mask.size(), vec![1, 1, 4, 4]);
    assert_eq!(out.mask.kind(), Kind::Float);
    assert_eq!(values(&out.mask), grid(&["....", "....", "..##", "..##"]));
    assert_eq!(out.latents_by_step.len(), 3);
    for (a, b) in z.iter().zip(&out.latents_by_step) {
        assert_eq!(values(b), values(&a.roll([1, 1], [-2, -1])));
    }
    // No shift (use_centered_bbox=False): latents untouched, mask stays in the model kind.
    let out = refine_latents_and_mask(&z, &mask, None, Kind::Half).unwrap();
    assert_eq!(out.mask.kind(), Kind::Half);
    assert_eq!(values(&out.mask), grid(&["....", ".##.", ".##.", "...."]));
    assert_eq!(values(&out.latents_by_step[2]), values(&z[2]));
    // A zero shift still goes through the float32 pad/roll/crop.
    let out = refine_latents_and_mask(&z, &mask, Some((0.0, 0.0)), Kind::Half).unwrap();
    assert_eq!(out.mask.kind(), Kind::Float);
    assert!(refine_latents_and_mask(&[], &mask, None, Kind::Float).is_err());
}

#[test]
fn fusion_later_objects_overwrite_earlier_ones() {
    let x0 = Tensor::zeros([1, 1, 1, 3], (Kind::Float, Device::Cpu));
    let za = Tensor::ones([1, 1, 1, 3], (Kind::Float, Device::Cpu));
    let zb = Tensor::full([1, 1, 1, 3], 2.0, (Kind::Float, Device::Cpu));
    let ma = Tensor::from_slice(&[1.0f32, 1.0, 0.5]).view([1, 1, 1, 3]);
    let mb = Tensor::from_slice(&[0.0f32, 1.0, 1.0]).view([1, 1, 1, 3]);
    let mut x = x0.copy();
    fuse_latents(&mut x, &[(&za, &ma), (&zb, &mb)]);
    assert_eq!(values(&x), vec![1.0, 2.0, 2.0]);
    let mut y = x0.copy();
    fuse_latents(&mut y, &[(&zb, &mb), (&za, &ma)]);
    assert_eq!(values(&y), vec![1.0, 1.0, 1.5]);
    // In place: a shallow clone sees the fused values.
    let mut w = x0.copy();
    let alias = w.shallow_clone();
    fuse_latents(&mut w, &[(&za, &ma)]);
    assert_eq!(values(&alias), vec![1.0, 1.0, 0.5]);
}

#[test]
fn fusion_uses_the_two_op_form() {
    let (x, z, m) = (0.1f32, 4.0f32 / 7.0, 0.75f32);
    let want = x * (1.0 - m) + z * m;
    assert_ne!(
        want,
        x + (z - x) * m,
        "the test values must tell the forms apart"
    );
    let mut lat = Tensor::from_slice(&[x]).view([1, 1, 1, 1]);
    let zt = Tensor::from_slice(&[z]).view([1, 1, 1, 1]);
    let mt = Tensor::from_slice(&[m]).view([1, 1, 1, 1]);
    fuse_latents(&mut lat, &[(&zt, &mt)]);
    assert_eq!(values(&lat), vec![want]);
    // fp16 latents stay fp16 with an fp32 mask.
    let mut half = Tensor::from_slice(&[x])
        .view([1, 1, 1, 1])
        .to_kind(Kind::Half);
    fuse_latents(&mut half, &[(&zt.to_kind(Kind::Half), &mt)]);
    assert_eq!(half.kind(), Kind::Half);
}

#[test]
fn fuse_step_picks_each_objects_step_in_plan_order() {
    let mk = |v: f32| Tensor::full([1, 1, 1, 2], v as f64, (Kind::Float, Device::Cpu));
    let objs = vec![
        ShiftedObject {
            latents_by_step: vec![mk(1.0), mk(3.0)],
            mask: Tensor::from_slice(&[1.0f32, 1.0]).view([1, 1, 1, 2]),
        },
        ShiftedObject {
            latents_by_step: vec![mk(5.0), mk(7.0)],
            mask: Tensor::from_slice(&[0.0f32, 1.0]).view([1, 1, 1, 2]),
        },
    ];
    let mut x = mk(0.0);
    fuse_step(&mut x, &objs, 1).unwrap();
    assert_eq!(values(&x), vec![3.0, 7.0]);
    let mut y = mk(0.0);
    assert!(fuse_step(&mut y, &objs, 2).is_err());
    assert_eq!(values(&y), vec![0.0, 0.0]);
}

#[test]
fn phrase_rule_two_levels() {
    // Levels [1, 2] with M = [0, 5, 10, 20, 30, 40]: r2f[0] on 0, 2, 4; r2f[1] on 6, 8;
    // rare on odd steps and on every step >= 10.
    let m = &StopStepMap::SD3.0;
    let r2f = ["a furry animal", "a hairy fish"];
    let phrase = |i| object_phrase("a hairy shark", &r2f, &[1, 2], i, m, ALT_STEP);
    for i in 0..50 {
        let want = match i {
            0 | 2 | 4 => "a furry animal",
            6 | 8 => "a hairy fish",
            _ => "a hairy shark",
        };
        assert_eq!(phrase(i), want, "step {i}");
    }
    let idx: Vec<_> = (0..11)
        .map(|i| frequent_phrase_index(2, &[1, 2], i, m, ALT_STEP))
        .collect();
    assert_eq!(
        idx,
        vec![
            Some(0),
            None,
            Some(0),
            None,
            Some(0),
            None,
            Some(1),
            None,
            Some(1),
            None,
            None
        ]
    );
}

#[test]
fn phrase_rule_empty_r2f_is_always_rare() {
    let m = &StopStepMap::SD3.0;
    let r2f: [&str; 0] = [];
    for i in 0..50 {
        assert_eq!(
            object_phrase("a spotted clam", &r2f, &[], i, m, ALT_STEP),
            "a spotted clam"
        );
    }
}

#[test]
fn phrase_rule_level_zero_is_skipped_and_counts_match_the_spec() {
    let m = &StopStepMap::SD3.0;
    // [0, 3]: the level-0 phrase is never used; r2f[1] on even steps < 20.
    for i in 0..50 {
        let want = (i < 20 && i % 2 == 0).then_some(1);
        assert_eq!(
            frequent_phrase_index(2, &[0, 3], i, m, ALT_STEP),
            want,
            "step {i}"
        );
    }
    // One level L: 3 / 5 / 10 / 15 / 20 frequent steps for L = 1..5 (§1.4); none for L = 0.
    for (level, want) in [(0u8, 0usize), (1, 3), (2, 5), (3, 10), (4, 15), (5, 20)] {
        let n = (0..50)
            .filter(|&i| frequent_phrase_index(1, &[level], i, m, ALT_STEP).is_some())
            .count();
        assert_eq!(n, want, "level {level}");
    }
}

#[test]
fn stop_steps_checked_like_check_inputs() {
    let m = &StopStepMap::SD3.0;
    assert!(check_stop_steps(m, 50).is_ok());
    assert!(check_stop_steps(m, 41).is_ok());
    assert!(check_stop_steps(m, 40).is_err());
    assert!(check_stop_steps(&[0, 5, 5, 20, 30, 40], 50).is_err());
    assert!(check_stop_steps(&[], 50).is_err());
}

#[test]
fn token_diff_span_cases() {
    // "a #1 ." -> "a hairy shark ." (made-up ids, BOS 1 / EOS 2).
    let old = [1, 10, 20, 21, 30, 2];
    let new = [1, 10, 40, 41, 42, 30, 2];
    assert_eq!(token_diff_span(&old, &new), 2..5);
    // Empty phrase: prefix and suffix meet, the span is empty.
    let old = [1, 10, 20, 21, 30, 2];
    let new = [1, 10, 30, 2];
    let s = token_diff_span(&old, &new);
    assert_eq!(s, 2..2);
    assert_eq!(s.len(), 0);
    // Overlapping prefix/suffix: [B x x E] -> [B x E] gives start 2, end 1 (reversed).
    let s = token_diff_span(&[1, 5, 5, 2], &[1, 5, 2]);
    assert_eq!((s.start, s.end), (2, 1));
    // Joint rows: CLIP as is, T5 + 77; empty spans add nothing, reversed ones are errors
    // (torch.arange(2, 1) raises officially).
    assert_eq!(joint_token_indices(2..4, 1..3), Ok(vec![2, 3, 78, 79]));
    assert_eq!(joint_token_indices(2..2, 0..0), Ok(vec![]));
    assert!(joint_token_indices(s.clone(), 0..0).is_err());
    assert!(joint_token_indices(0..1, s).is_err());
}
