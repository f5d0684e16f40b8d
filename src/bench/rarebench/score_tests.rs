use super::*;

fn key(config: &str, category: Category, index: usize, seed: u64) -> SampleKey {
    SampleKey {
        config: config.into(),
        category,
        index,
        seed,
    }
}

/// A table from (config, category, index, seed, score) rows.
fn table_of(rows: &[(&str, Category, usize, u64, u8)]) -> ScoreTable {
    let keys: Vec<(SampleKey, u8)> = rows
        .iter()
        .map(|&(c, cat, i, s, v)| (key(c, cat, i, s), v))
        .collect();
    table(keys.iter().map(|(k, v)| (k, *v)))
}

#[test]
fn the_official_aggregate_to_the_last_bit() {
    // Hand-computed: scores 5 4 3 2 1 0 give points 4 3 2 1 0 0 = 10 over 6 images:
    // 10 / 6 / 4 * 100.
    assert_eq!(
        official_average(&[5, 4, 3, 2, 1, 0]),
        Some(41.66666666666667)
    );
    // Values of the official avg_scores file, from 40 images: 98 points -> 61.25000000000001,
    // 102 -> 63.74999999999999 (the same operations in the same order as Python).
    let forty = |points: u32| -> Vec<u8> {
        // `points` spread over 40 scores of at most 4 points each.
        (0..40u32)
            .map(|i| {
                let p = points.saturating_sub(4 * i).min(4);
                (p + 1) as u8
            })
            .collect()
    };
    assert_eq!(official_average(&forty(98)), Some(61.25000000000001));
    assert_eq!(official_average(&forty(102)), Some(63.74999999999999));
    assert_eq!(official_average(&forty(49)), Some(30.625000000000004));
    assert_eq!(official_average(&[5; 40]), Some(100.0));
    assert_eq!(official_average(&[0, 1, 1]), Some(0.0));
    assert_eq!(official_average(&[]), None);
    assert_eq!(points(0), 0.0);
    assert_eq!(points(1), 0.0);
    assert_eq!(points(3), 50.0);
    assert_eq!(points(5), 100.0);
}

#[test]
fn scores_group_by_configuration_and_category() {
    let c = Category::Single2Shape;
    let t = table_of(&[
        ("plain", c, 1, 0, 5),
        ("plain", c, 0, 0, 3),
        ("plain", c, 0, 1, 1),
        ("r2f", c, 0, 0, 4),
        ("r2f", Category::Multi1And, 0, 0, 2),
    ]);
    assert_eq!(t[&("plain".into(), c)], [(0, 0, 3), (0, 1, 1), (1, 0, 5)]);
    let s = category_scores(&t);
    assert_eq!(s.len(), 3);
    let plain = s.iter().find(|x| x.config == "plain").unwrap();
    assert_eq!((plain.images, plain.prompts), (3, 2));
    // (2 + 0 + 4) / 3 / 4 * 100
    assert_eq!(plain.score, 6.0 / 3.0 / 4.0 * 100.0);
}

#[test]
fn splitmix64_is_the_published_generator() {
    let mut r = SplitMix64::new(0);
    assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
    assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
    assert_eq!(r.next_u64(), 0x06c4_5d18_8009_454f);
    let mut r = SplitMix64::new(7);
    let mut seen = [0usize; 3];
    for _ in 0..3000 {
        seen[r.below(3) as usize] += 1;
    }
    assert!(seen.iter().all(|&n| (900..1100).contains(&n)), "{seen:?}");
    assert_eq!(SplitMix64::new(1).below(1), 0);
}

#[test]
fn quantiles_interpolate_as_numpy() {
    assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.025), 1.075);
    assert_eq!(quantile(&[0.0, 10.0, 30.0], 0.975), 29.0);
    assert_eq!(quantile(&[5.0], 0.3), 5.0);
    assert_eq!(quantile(&[1.0, 2.0], 1.0), 2.0);
}

/// A and B over 20 prompts and 2 seeds: B scores one point more on every other prompt.
fn ab_table(category: Category) -> ScoreTable {
    let mut rows = Vec::new();
    for i in 0..20 {
        for seed in [0, 1] {
            let a = (i % 5) as u8;
            rows.push(("a", category, i, seed, a));
            rows.push(("b", category, i, seed, if i % 2 == 0 { a + 1 } else { a }));
        }
    }
    table_of(&rows)
}

#[test]
fn the_paired_bootstrap_is_deterministic_and_brackets_the_difference() {
    let c = Category::Single3Texture;
    let t = ab_table(c);
    let boot = Bootstrap {
        resamples: 2000,
        confidence: 0.95,
        seed: 11,
    };
    let p = paired(&t, c, "a", "b", &boot).unwrap();
    assert_eq!((p.pairs, p.prompts), (40, 20));
    // Hand-computed: B scores one more on the 10 even prompts, which is 25 points except where
    // A scores 0 (prompts 0 and 10: `points(1) - points(0) = 0`). So 8 prompts x 2 seeds x 25
    // = 400 points over 40 images = 10.
    assert_eq!(p.diff, 10.0);
    assert_eq!(p.score_b - p.score_a, p.diff);
    assert!(p.ci_low < p.diff && p.diff < p.ci_high, "{p:?}");
    assert!(p.ci_low >= 0.0 && p.ci_high <= 25.0, "{p:?}");
    // Same inputs, same seed: the same interval, bit for bit (pinned: the generator and the
    // resampling are ours, so no dependency update may move it).
    assert_eq!((p.ci_low, p.ci_high), (5.0, 15.0));
    assert_eq!(paired(&t, c, "a", "b", &boot).unwrap(), p);
    // Swapped: the mirror image.
    let swapped = paired(&t, c, "b", "a", &boot).unwrap();
    assert_eq!(swapped.diff, -10.0);
    // A configuration against itself: no difference, a point interval.
    let same = paired(&t, c, "a", "a", &boot).unwrap();
    assert_eq!((same.diff, same.ci_low, same.ci_high), (0.0, 0.0, 0.0));
    // Nothing to pair.
    assert_eq!(paired(&t, Category::Multi1And, "a", "b", &boot), None);
    assert_eq!(paired(&t, c, "a", "nope", &boot), None);
}

#[test]
fn only_images_of_the_same_prompt_and_seed_pair_up() {
    let c = Category::Single1Property;
    let t = table_of(&[
        ("a", c, 0, 0, 5),
        ("a", c, 1, 0, 1),
        ("a", c, 2, 5, 3),
        ("b", c, 0, 0, 3),
        ("b", c, 1, 1, 5), // another seed: unpaired
        ("b", c, 2, 5, 3),
    ]);
    let p = paired(&t, c, "a", "b", &Bootstrap::default()).unwrap();
    assert_eq!((p.pairs, p.prompts), (2, 2));
    // A: 100, 50 -> 75; B: 50, 50 -> 50.
    assert_eq!((p.score_a, p.score_b, p.diff), (75.0, 50.0, -25.0));
}

#[test]
fn the_gate_fails_a_clear_regression_and_missing_data() {
    let c = Category::Single4Action;
    let mut rows = Vec::new();
    for i in 0..30 {
        rows.push(("base", c, i, 0, 5));
        rows.push(("worse", c, i, 0, 3)); // 50 points less everywhere
        rows.push(("noisy", c, i, 0, if i % 2 == 0 { 4 } else { 5 }));
    }
    let t = table_of(&rows);
    let boot = Bootstrap {
        resamples: 1000,
        ..Bootstrap::default()
    };
    let g = gate(&t, &[c], "base", "worse", 5.0, &boot);
    assert!(!g.passed);
    assert_eq!(g.rows[0].verdict, Verdict::Fail);
    let p = g.rows[0].paired.as_ref().unwrap();
    assert_eq!((p.diff, p.ci_low, p.ci_high), (-50.0, -50.0, -50.0));
    // Within a 60-point threshold it passes.
    assert!(gate(&t, &[c], "base", "worse", 60.0, &boot).passed);
    // 12.5 points worse on average, but the interval reaches above -20: pass at 20, fail at 5.
    let g = gate(&t, &[c], "base", "noisy", 20.0, &boot);
    assert!(g.passed, "{g:?}");
    let p = g.rows[0].paired.as_ref().unwrap();
    assert_eq!(p.diff, -12.5);
    assert!(p.ci_high > -20.0 && p.ci_low < -5.0, "{p:?}");
    assert!(!gate(&t, &[c], "base", "noisy", 5.0, &boot).passed);
    // Better is never a failure.
    assert!(gate(&t, &[c], "worse", "base", 0.0, &boot).passed);
    // A category where nothing pairs fails as no data.
    let g = gate(
        &t,
        &[c, Category::Multi2Relation],
        "base",
        "worse",
        60.0,
        &boot,
    );
    assert_eq!(g.rows[1].verdict, Verdict::NoData);
    assert!(!g.passed);
    let v = serde_json::to_value(&g).unwrap();
    assert_eq!(v["rows"][1]["verdict"], "no_data");
    assert_eq!(v["rows"][0]["category"], "single_4action");
}
