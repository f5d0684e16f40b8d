//! The Rare-to-Frequent method, model-agnostic: which prompt conditions each denoising step
//! (the *prompt schedule*; the noise schedule is [`crate::schedulers`]' business).
//!
//! A plan holds prompts `p0 ... pK` from frequent to rare (`pK` is the rare prompt) and one
//! visual-detail level per concept. A level maps to a stop step through a per-model table; before
//! its stop step a concept's frequent prompt conditions the even steps and the rare prompt the odd
//! ones; after it the rare prompt alone finishes the image.

pub mod plus;
pub mod regions;

use serde::{Deserialize, Serialize};

/// Steps between frequent-prompt steps (`alt_step` in the official code).
pub const ALT_STEP: usize = 2;
/// The step count the official stop-step maps are written for.
pub const REFERENCE_STEPS: usize = 50;

/// Level (0..=5) -> stop step at 50 steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopStepMap(pub [usize; 6]);

impl StopStepMap {
    /// SD3, and the paper-era map for every backbone.
    pub const SD3: StopStepMap = StopStepMap([0, 5, 10, 20, 30, 40]);
    /// SDXL at the official repository's HEAD.
    pub const SDXL: StopStepMap = StopStepMap([0, 3, 5, 10, 20, 30]);

    /// The stop step of `level` for a run of `steps` steps: the map's value scaled by
    /// `steps / 50` and rounded to the nearest step (exact at 50 steps).
    pub fn stop_step(&self, level: u8, steps: usize) -> usize {
        let at_50 = self.0[(level as usize).min(5)];
        if steps == REFERENCE_STEPS {
            at_50
        } else {
            ((at_50 * steps) as f64 / REFERENCE_STEPS as f64).round() as usize
        }
    }
}

crate::named_enum! {
    /// The named stop-step maps, as `--stop-step-map` and the job parameter `stop_step_map`
    /// spell them: `paper` (the paper-era map, used for every backbone then) or `head` (SDXL's
    /// map at the official repository's HEAD); `sd3` and `sdxl` name the per-model defaults.
    pub enum StopStepMapName("stop-step map") {
        Paper = "paper" | "sd3",
        Head = "head" | "sdxl",
    }
}

impl StopStepMapName {
    /// The map this name stands for.
    pub fn map(self) -> StopStepMap {
        match self {
            StopStepMapName::Paper => StopStepMap::SD3,
            StopStepMapName::Head => StopStepMap::SDXL,
        }
    }
}

crate::named_enum! {
    /// How the per-step prompt choice is made (`--schedule` and the job parameter `schedule`).
    #[derive(Default)]
    pub enum PromptSchedule("schedule") {
        /// The official loop, quirks included (levels in LLM order, a non-monotone stop list
        /// freezes the advance, a leading 0 freezes it at p0, a single prompt is a plain run).
        #[default]
        Faithful = "faithful",
        /// Each concept keeps its own stop step: concepts ordered by stop step, at an even step
        /// `i` the prompt is `p_j` with `j` the number of concepts whose stop step is `<= i`.
        Clean = "clean",
    }
}

/// The index (into `prompts`) of the prompt conditioning each of `steps` steps.
///
/// `num_prompts` is K + 1; `levels` has one entry per concept (normally K).
pub fn step_prompts(
    num_prompts: usize,
    levels: &[u8],
    steps: usize,
    map: &StopStepMap,
    schedule: PromptSchedule,
) -> Vec<usize> {
    let rare = num_prompts.saturating_sub(1);
    if num_prompts <= 1 {
        // A single prompt is a plain run (SD3's length-1 guard; the SDXL crash is not kept).
        return vec![0; steps];
    }
    match schedule {
        PromptSchedule::Faithful => {
            // Official loop: T = [M[l] for l in levels] + [N]; advance while i == T[mode] != 0.
            let mut stops: Vec<usize> = levels.iter().map(|&l| map.stop_step(l, steps)).collect();
            stops.push(steps);
            let mut mode = 0usize;
            (0..steps)
                .map(|i| {
                    while mode < stops.len() && i == stops[mode] && stops[mode] != 0 {
                        mode += 1;
                    }
                    let current = mode.min(rare);
                    if i % ALT_STEP == 0 {
                        current
                    } else {
                        rare
                    }
                })
                .collect()
        }
        PromptSchedule::Clean => {
            let mut stops: Vec<usize> = levels.iter().map(|&l| map.stop_step(l, steps)).collect();
            stops.sort_unstable();
            (0..steps)
                .map(|i| {
                    if i % ALT_STEP != 0 {
                        return rare;
                    }
                    let passed = stops.iter().filter(|&&s| s <= i).count();
                    passed.min(rare)
                })
                .collect()
        }
    }
}

/// Number of steps conditioned by a prompt other than the rare one, of a per-step prompt list.
pub fn frequent_steps(step_prompt: &[usize], rare: usize) -> usize {
    step_prompt.iter().filter(|&&p| p != rare).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn freq_steps(levels: &[u8], map: &StopStepMap, kind: PromptSchedule) -> usize {
        let s = step_prompts(levels.len() + 1, levels, 50, map, kind);
        frequent_steps(&s, levels.len())
    }

    #[test]
    fn frequent_steps_per_level_match_the_method_tables() {
        // docs/method.md §2: SD3 map 3/5/10/15/20, SDXL map 2/3/5/10/15 for levels 1..5.
        for (map, want) in [
            (StopStepMap::SD3, [3, 5, 10, 15, 20]),
            (StopStepMap::SDXL, [2, 3, 5, 10, 15]),
        ] {
            for level in 1..=5u8 {
                for kind in [PromptSchedule::Faithful, PromptSchedule::Clean] {
                    assert_eq!(
                        freq_steps(&[level], &map, kind),
                        want[level as usize - 1],
                        "{map:?} level {level} {kind:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn one_concept_alternates_until_its_stop_step() {
        let s = step_prompts(2, &[2], 50, &StopStepMap::SD3, PromptSchedule::Faithful);
        // Level 2 stops at 10: even steps 0..8 frequent, odd rare, then rare.
        assert_eq!(&s[..11], &[0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 1]);
        assert!(s[10..].iter().all(|&p| p == 1));
    }

    #[test]
    fn unsorted_levels_freeze_the_advance_in_faithful_mode() {
        // Levels ["5","3"] -> T = [40, 20, 50]: mode goes 0 -> 1 at step 40 and never reaches 2,
        // so steps 40..49 keep alternating p1 (even) and p2 (odd).
        let s = step_prompts(3, &[5, 3], 50, &StopStepMap::SD3, PromptSchedule::Faithful);
        assert!((0..40).all(|i| s[i] == if i % 2 == 0 { 0 } else { 2 }));
        assert!((40..50).all(|i| s[i] == if i % 2 == 0 { 1 } else { 2 }));
        // Clean: sorted stops [20, 40]: p0 on even steps < 20, p1 on even steps 20..38, then rare.
        let c = step_prompts(3, &[5, 3], 50, &StopStepMap::SD3, PromptSchedule::Clean);
        assert!((0..20).all(|i| c[i] == if i % 2 == 0 { 0 } else { 2 }));
        assert!((20..40).all(|i| c[i] == if i % 2 == 0 { 1 } else { 2 }));
        assert!((40..50).all(|i| c[i] == 2));
    }

    #[test]
    fn sorted_levels_advance_through_every_prompt() {
        let s = step_prompts(3, &[3, 5], 50, &StopStepMap::SD3, PromptSchedule::Faithful);
        assert!((0..20).all(|i| s[i] == if i % 2 == 0 { 0 } else { 2 }));
        assert!((20..40).all(|i| s[i] == if i % 2 == 0 { 1 } else { 2 }));
        assert!((40..50).all(|i| s[i] == 2));
    }

    #[test]
    fn leading_level_zero_freezes_at_the_first_prompt_in_faithful_mode() {
        // T = [0, 20, 50]: the advance test needs T[mode] != 0, so mode stays 0 for all steps.
        let s = step_prompts(3, &[0, 3], 50, &StopStepMap::SD3, PromptSchedule::Faithful);
        assert!((0..50).all(|i| s[i] == if i % 2 == 0 { 0 } else { 2 }));
        // Clean: the level-0 concept is never frequent.
        let c = step_prompts(3, &[0, 3], 50, &StopStepMap::SD3, PromptSchedule::Clean);
        assert!((0..20).all(|i| c[i] == if i % 2 == 0 { 1 } else { 2 }));
        assert!((20..50).all(|i| c[i] == 2));
    }

    #[test]
    fn single_prompt_is_a_plain_run_even_with_a_level() {
        for kind in [PromptSchedule::Faithful, PromptSchedule::Clean] {
            assert_eq!(
                step_prompts(1, &[1], 50, &StopStepMap::SDXL, kind),
                vec![0; 50]
            );
            assert_eq!(
                step_prompts(1, &[], 28, &StopStepMap::SD3, kind),
                vec![0; 28]
            );
        }
    }

    #[test]
    fn stop_steps_scale_with_the_step_count() {
        let m = StopStepMap::SD3;
        assert_eq!(m.stop_step(5, 50), 40);
        assert_eq!(m.stop_step(5, 25), 20);
        assert_eq!(m.stop_step(1, 28), 3); // 5 * 28 / 50 = 2.8 -> 3
        assert_eq!(m.stop_step(3, 28), 11); // 20 * 28 / 50 = 11.2 -> 11
        let s = step_prompts(2, &[3], 28, &m, PromptSchedule::Faithful);
        assert_eq!(frequent_steps(&s, 1), 6); // even steps 0..10
    }
}
