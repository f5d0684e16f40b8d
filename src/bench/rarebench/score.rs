//! The numbers of a run: the official aggregate per configuration and category, paired
//! differences between two configurations with bootstrap confidence intervals, and the compare
//! gate.
//!
//! The official aggregate (the R2F repository's `eval_get_avg_scores.py`) of a category's
//! judge scores `s_1..s_n` (0–5) is `sum(max(s_i - 1, 0)) / n / 4 * 100`, computed in that order
//! so that the floating-point result is the official file's to the last bit (e.g. 98 points
//! over 40 images give `61.25000000000001`). With several seeds, every (prompt, seed) image is
//! one term.
//!
//! Paired differences compare configurations B and A on the images both have, same prompt and
//! same seed: `d = points(B) - points(A)` with `points(s) = max(s - 1, 0) / 4 * 100`. The
//! confidence interval is a percentile bootstrap that resamples prompts (with all their seeds,
//! as images of one prompt are not independent), from a seeded SplitMix64 generator: the same
//! inputs and seed give the same interval on any machine and any version of `rand`.

use std::collections::BTreeMap;

use serde::Serialize;

use super::spec::{Category, SampleKey};

/// The points of one score on the official 0–100 scale.
pub fn points(score: u8) -> f64 {
    f64::from(score.saturating_sub(1)) / 4.0 * 100.0
}

/// The official aggregate of judge scores (None for no scores).
pub fn official_average(scores: &[u8]) -> Option<f64> {
    if scores.is_empty() {
        return None;
    }
    let sum: u64 = scores.iter().map(|&s| u64::from(s.saturating_sub(1))).sum();
    Some(sum as f64 / scores.len() as f64 / 4.0 * 100.0)
}

/// One judged image: prompt index, seed, score.
pub type Scored = (usize, u64, u8);

/// Scores grouped by configuration and category (sorted by prompt index, then seed).
pub type ScoreTable = BTreeMap<(String, Category), Vec<Scored>>;

/// Groups scores by configuration and category.
pub fn table<'a>(scores: impl IntoIterator<Item = (&'a SampleKey, u8)>) -> ScoreTable {
    let mut t = ScoreTable::new();
    for (k, s) in scores {
        t.entry((k.config.clone(), k.category))
            .or_default()
            .push((k.index, k.seed, s));
    }
    for v in t.values_mut() {
        v.sort_unstable();
    }
    t
}

/// The official aggregate of one configuration and category.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CategoryScore {
    pub config: String,
    pub category: Category,
    /// Images judged.
    pub images: usize,
    /// Distinct prompts among them.
    pub prompts: usize,
    /// 0–100.
    pub score: f64,
}

/// The aggregate of every configuration and category of a table.
pub fn category_scores(t: &ScoreTable) -> Vec<CategoryScore> {
    t.iter()
        .filter_map(|((config, category), v)| {
            let scores: Vec<u8> = v.iter().map(|x| x.2).collect();
            let mut prompts: Vec<usize> = v.iter().map(|x| x.0).collect();
            prompts.dedup();
            Some(CategoryScore {
                config: config.clone(),
                category: *category,
                images: v.len(),
                prompts: prompts.len(),
                score: official_average(&scores)?,
            })
        })
        .collect()
}

/// SplitMix64 (Steele, Lea and Flood 2014): small, fast, and fixed forever.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`), without modulo bias (Lemire's method).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = u128::from(self.next_u64()) * u128::from(n);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }
}

/// The `q`-quantile (0..=1) of sorted values, interpolated linearly (numpy's default).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    assert!(!sorted.is_empty(), "quantile of nothing");
    let h = (sorted.len() - 1) as f64 * q.clamp(0.0, 1.0);
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
}

/// How the bootstrap is run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Bootstrap {
    pub resamples: usize,
    /// E.g. 0.95.
    pub confidence: f64,
    pub seed: u64,
}

impl Default for Bootstrap {
    fn default() -> Self {
        Self {
            resamples: 10_000,
            confidence: 0.95,
            seed: 0,
        }
    }
}

/// B against A in one category, on the images both have.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Paired {
    pub category: Category,
    pub a: String,
    pub b: String,
    /// Images paired (same prompt and seed).
    pub pairs: usize,
    pub prompts: usize,
    /// The official aggregate of each on the paired images.
    pub score_a: f64,
    pub score_b: f64,
    /// `score_b - score_a`, in points.
    pub diff: f64,
    /// The bootstrap interval of `diff`.
    pub ci_low: f64,
    pub ci_high: f64,
    pub confidence: f64,
}

/// The paired difference of B against A in `category` (None when no image pairs up). The
/// generator is seeded with `boot.seed` plus the category's position, so categories draw
/// independent streams and each is reproducible alone.
pub fn paired(
    t: &ScoreTable,
    category: Category,
    a: &str,
    b: &str,
    boot: &Bootstrap,
) -> Option<Paired> {
    let get = |c: &str| t.get(&(c.to_string(), category));
    let (va, vb) = (get(a)?, get(b)?);
    let bmap: BTreeMap<(usize, u64), u8> = vb.iter().map(|&(i, s, v)| ((i, s), v)).collect();
    // Per prompt: the sum of differences and the images.
    let mut per_prompt: BTreeMap<usize, (f64, usize)> = BTreeMap::new();
    let (mut sa, mut sb) = (Vec::new(), Vec::new());
    for &(i, seed, score_a) in va {
        if let Some(&score_b) = bmap.get(&(i, seed)) {
            let e = per_prompt.entry(i).or_default();
            e.0 += points(score_b) - points(score_a);
            e.1 += 1;
            sa.push(score_a);
            sb.push(score_b);
        }
    }
    if sa.is_empty() {
        return None;
    }
    let (score_a, score_b) = (official_average(&sa)?, official_average(&sb)?);
    let clusters: Vec<(f64, usize)> = per_prompt.into_values().collect();
    let position = Category::ALL
        .iter()
        .position(|&c| c == category)
        .unwrap_or(0) as u64;
    let mut rng = SplitMix64::new(boot.seed.wrapping_add(position));
    let n = clusters.len() as u64;
    let mut means: Vec<f64> = (0..boot.resamples.max(1))
        .map(|_| {
            let (mut sum, mut count) = (0.0, 0usize);
            for _ in 0..n {
                let (s, c) = clusters[rng.below(n) as usize];
                sum += s;
                count += c;
            }
            sum / count as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    let alpha = 1.0 - boot.confidence.clamp(0.0, 1.0);
    Some(Paired {
        category,
        a: a.to_string(),
        b: b.to_string(),
        pairs: sa.len(),
        prompts: clusters.len(),
        score_a,
        score_b,
        diff: score_b - score_a,
        ci_low: quantile(&means, alpha / 2.0),
        ci_high: quantile(&means, 1.0 - alpha / 2.0),
        confidence: boot.confidence,
    })
}

/// A category's verdict in the compare gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    /// B is worse than A by more than the threshold at the confidence asked.
    Fail,
    /// No image pairs up: nothing shows B is not worse.
    NoData,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GateRow {
    pub category: Category,
    pub verdict: Verdict,
    pub paired: Option<Paired>,
}

/// `--compare A B`: B may not be worse than A by more than `threshold` points in any category.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gate {
    pub a: String,
    pub b: String,
    pub threshold: f64,
    pub bootstrap: Bootstrap,
    pub rows: Vec<GateRow>,
    pub passed: bool,
}

/// Runs the gate over `categories`: a category fails when the upper bound of the interval of
/// `B - A` is below `-threshold` (B is worse by more than the threshold at the confidence
/// asked), and when no image pairs up; the gate passes when no category fails.
pub fn gate(
    t: &ScoreTable,
    categories: &[Category],
    a: &str,
    b: &str,
    threshold: f64,
    boot: &Bootstrap,
) -> Gate {
    let rows: Vec<GateRow> = categories
        .iter()
        .map(|&category| {
            let p = paired(t, category, a, b, boot);
            let verdict = match &p {
                None => Verdict::NoData,
                Some(p) if p.ci_high < -threshold => Verdict::Fail,
                Some(_) => Verdict::Pass,
            };
            GateRow {
                category,
                verdict,
                paired: p,
            }
        })
        .collect();
    let passed = rows.iter().all(|r| r.verdict == Verdict::Pass);
    Gate {
        a: a.to_string(),
        b: b.to_string(),
        threshold,
        bootstrap: *boot,
        rows,
        passed,
    }
}

#[cfg(test)]
#[path = "score_tests.rs"]
mod tests;
