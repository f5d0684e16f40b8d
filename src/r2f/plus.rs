//! R2F+ prompt side: for every run of an R2F+ generation (one per object, then the overall
//! image) and every step, the prompt that conditions the step and the rows of the joint text
//! sequence that hold each object's phrase (`get_current_prompt_and_object_indices`, L735–807 of
//! the official `R2Fplus_Diffusion_sd3.py`; `docs/r2fplus.md` §1.4).
//!
//! Model-free: the token ids come from a [`TokenIds`] implementation (the SD3 pipeline's
//! tokenizers, or the tokenizer folders alone for `r2f schedule`).

use std::sync::OnceLock;

use anyhow::{anyhow, bail};
use regex::Regex;
use serde::Serialize;

use super::regions::{joint_token_indices, object_phrase, token_diff_span, BBox};
use crate::plan::{RegionObject, RegionPlan};

/// Unpadded token ids of a prompt as the official code computes them for the index diff:
/// CLIP-L truncated to its 77 with BOS/EOS (`_get_clip_prompt_token_ids`), T5 truncated to the
/// pipeline's T5 length with `</s>` (`_get_t5_prompt_token_ids`; empty without a T5).
pub trait TokenIds {
    fn clip_ids(&self, prompt: &str) -> anyhow::Result<Vec<i64>>;
    fn t5_ids(&self, prompt: &str) -> anyhow::Result<Vec<i64>>;
    /// The number of CLIP rows in the joint text sequence (CLIP-L's `model_max_length`, 77):
    /// T5 rows are offset by it.
    fn clip_rows(&self) -> usize;
}

/// How placeholders are substituted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySubstitution {
    /// Python's `prompt.replace(key, phrase)`: every occurrence, so `#1` also hits `#10`–`#19`
    /// (quirk Q7, faithful mode).
    Replace,
    /// Only whole keys: `#1` is not a prefix of `#10` (clean mode).
    Exact,
}

/// One object's rows in the joint text sequence at one step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ObjectTokens {
    pub key: String,
    /// Rows of the `[77 CLIP + T5]` text sequence, in order.
    pub indices: Vec<i64>,
}

/// The conditioning of one step of one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepText {
    pub step: usize,
    /// The template with every key substituted.
    pub prompt: String,
    /// The keys in order of first appearance in the template, each with its rows (a key that
    /// appears twice keeps its first position and its last computed rows, as a Python `dict`).
    pub objects: Vec<ObjectTokens>,
}

impl StepText {
    /// The rows of `key`, if the template names it.
    pub fn indices(&self, key: &str) -> Option<&[i64]> {
        self.objects
            .iter()
            .find(|o| o.key == key)
            .map(|o| o.indices.as_slice())
    }
}

/// The phrase rule's parameters (§1.4): the level -> stop-step map `M` (already scaled to the
/// run's step count, or the official unscaled one) and `alt_step`.
#[derive(Debug, Clone)]
pub struct PhraseRule {
    pub stop_steps: Vec<usize>,
    pub alt_step: usize,
    pub substitution: KeySubstitution,
}

/// `re.findall(r'#\d+', prompt)`: the keys in order of appearance (`\d` is any Unicode decimal
/// digit, as in Python).
pub fn keys_in_order(prompt: &str) -> Vec<String> {
    static KEY: OnceLock<Regex> = OnceLock::new();
    let re = KEY.get_or_init(|| Regex::new(r"#\d+").expect("static regex"));
    re.find_iter(prompt)
        .map(|m| m.as_str().to_string())
        .collect()
}

/// Substitutes `key` in `prompt` by `phrase`.
pub fn substitute(prompt: &str, key: &str, phrase: &str, how: KeySubstitution) -> String {
    match how {
        KeySubstitution::Replace => prompt.replace(key, phrase),
        KeySubstitution::Exact => {
            let mut out = String::with_capacity(prompt.len() + phrase.len());
            let mut rest = prompt;
            while let Some(pos) = rest.find(key) {
                let after = &rest[pos + key.len()..];
                out.push_str(&rest[..pos]);
                if after.chars().next().is_some_and(|c| c.is_numeric()) {
                    out.push_str(key);
                } else {
                    out.push_str(phrase);
                }
                rest = after;
            }
            out.push_str(rest);
            out
        }
    }
}

/// The prompt and object rows of one step of a run whose template is `template` and whose
/// objects are `objects` (stage A: the object's own prompt and that object; stage B: the base
/// prompt and every object).
pub fn step_text(
    template: &str,
    objects: &[(&str, &RegionObject)],
    step: usize,
    rule: &PhraseRule,
    tok: &dyn TokenIds,
) -> anyhow::Result<StepText> {
    let mut prompt = template.to_string();
    let mut clip = tok.clip_ids(&prompt)?;
    let mut t5 = tok.t5_ids(&prompt)?;
    let mut out: Vec<ObjectTokens> = Vec::new();
    for key in keys_in_order(template) {
        let (_, obj) = objects.iter().find(|(k, _)| *k == key).ok_or_else(|| {
            anyhow!("the prompt `{template}` names {key}, which is not an object of the plan")
        })?;
        let phrase = object_phrase(
            &obj.object,
            &obj.r2f,
            &obj.visual_detail_levels,
            step,
            &rule.stop_steps,
            rule.alt_step,
        );
        let next = substitute(&prompt, &key, phrase, rule.substitution);
        let next_clip = tok.clip_ids(&next)?;
        let next_t5 = tok.t5_ids(&next)?;
        let indices = joint_token_indices_at(
            token_diff_span(&clip, &next_clip),
            token_diff_span(&t5, &next_t5),
            tok.clip_rows(),
        )
        .map_err(|e| anyhow!("{key} at step {step}: {e}"))?;
        match out.iter_mut().find(|o| o.key == key) {
            Some(o) => o.indices = indices,
            None => out.push(ObjectTokens { key, indices }),
        }
        (prompt, clip, t5) = (next, next_clip, next_t5);
    }
    Ok(StepText {
        step,
        prompt,
        objects: out,
    })
}

/// [`joint_token_indices`] with the T5 rows offset by `clip_rows` instead of the fixed 77.
fn joint_token_indices_at(
    clip: std::ops::Range<usize>,
    t5: std::ops::Range<usize>,
    clip_rows: usize,
) -> Result<Vec<i64>, String> {
    let offset = clip_rows as i64 - super::regions::CLIP_TOKEN_OFFSET as i64;
    Ok(joint_token_indices(clip.clone(), t5)?
        .into_iter()
        .enumerate()
        .map(|(n, i)| if n < clip.len() { i } else { i + offset })
        .collect())
}

/// One run of an R2F+ generation: what it draws, where its guidance pulls, and its per-step
/// conditioning.
#[derive(Debug, Clone, Serialize)]
pub struct RunText {
    /// `#k` for an object run, `overall` for the final image.
    pub run: String,
    /// The boxes the bbox guidance pulls each object's attention into, in loss order: the
    /// centred box for an object run, the real boxes for the overall run.
    pub boxes: Vec<(String, BBox)>,
    pub steps: Vec<StepText>,
}

/// The per-step conditioning of every run of an R2F+ generation of `steps` steps: the object
/// runs in plan order (skipped when `object_runs` is false: no fusion), then the overall run.
/// `object_steps` bounds the object runs (they only need the fusion steps when the masks do not
/// depend on the object image).
pub fn plan_text(
    plan: &RegionPlan,
    steps: usize,
    object_steps: usize,
    object_runs: bool,
    rule: &PhraseRule,
    tok: &dyn TokenIds,
) -> anyhow::Result<Vec<RunText>> {
    let all: Vec<(&str, &RegionObject)> =
        plan.objects.iter().map(|(k, o)| (k.as_str(), o)).collect();
    let mut runs = Vec::new();
    if object_runs {
        for &(key, obj) in &all {
            let steps = (0..object_steps)
                .map(|i| step_text(&obj.prompt, &[(key, obj)], i, rule, tok))
                .collect::<anyhow::Result<Vec<_>>>()?;
            runs.push(RunText {
                run: key.to_string(),
                boxes: vec![(key.to_string(), super::regions::centered_bbox(&obj.bbox))],
                steps,
            });
        }
    }
    let overall = (0..steps)
        .map(|i| step_text(&plan.base_prompt, &all, i, rule, tok))
        .collect::<anyhow::Result<Vec<_>>>()?;
    runs.push(RunText {
        run: "overall".into(),
        boxes: all.iter().map(|(k, o)| (k.to_string(), o.bbox)).collect(),
        steps: overall,
    });
    Ok(runs)
}

/// Faithful mode's check of the guided steps (quirk Q11): an object whose rows are empty at a
/// guided step makes the official loss average over nothing (NaN latents). Names the first one.
pub fn check_guided_rows(runs: &[RunText], guidance_steps: usize) -> anyhow::Result<()> {
    for run in runs {
        for st in run.steps.iter().take(guidance_steps) {
            for (key, _) in &run.boxes {
                match st.indices(key) {
                    Some(rows) if !rows.is_empty() => {}
                    Some(_) => bail!(
                        "object {key} has no tokens in the text sequence at step {} of the {} run \
                         (its phrase is empty or truncated away); the official R2F+ loss would be NaN",
                        st.step,
                        run.run
                    ),
                    None => bail!(
                        "the {} run's prompt does not name {key} at step {}",
                        run.run,
                        st.step
                    ),
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Word-level "tokenizer": BOS, one id per whitespace word (an FNV-1a hash of it), EOS; T5
    /// the same with `</s>` only.
    struct Words;

    fn word_ids(prompt: &str) -> Vec<i64> {
        let hash = |w: &str| {
            w.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
            }) as i64
        };
        prompt.split_whitespace().map(hash).collect()
    }

    impl TokenIds for Words {
        fn clip_ids(&self, prompt: &str) -> anyhow::Result<Vec<i64>> {
            let mut v = vec![1];
            v.extend(word_ids(prompt));
            v.push(2);
            Ok(v)
        }
        fn t5_ids(&self, prompt: &str) -> anyhow::Result<Vec<i64>> {
            let mut v = word_ids(prompt);
            v.push(1);
            Ok(v)
        }
        fn clip_rows(&self) -> usize {
            77
        }
    }

    fn obj(prompt: &str, object: &str, r2f: &[&str], levels: &[u8]) -> RegionObject {
        RegionObject {
            prompt: prompt.into(),
            object: object.into(),
            r2f: r2f.iter().map(|s| s.to_string()).collect(),
            visual_detail_levels: levels.to_vec(),
            bbox: [0.1, 0.2, 0.5, 0.6],
        }
    }

    fn rule(substitution: KeySubstitution) -> PhraseRule {
        PhraseRule {
            stop_steps: vec![0, 5, 10, 20, 30, 40],
            alt_step: 2,
            substitution,
        }
    }

    #[test]
    fn keys_are_found_in_order_of_appearance_with_unicode_digits() {
        assert_eq!(keys_in_order("#2 and #1 and #10"), ["#2", "#1", "#10"]);
        assert_eq!(keys_in_order("a #٣ b # c"), ["#٣"]);
    }

    #[test]
    fn replace_hits_every_occurrence_and_exact_only_whole_keys() {
        let p = "#1 near #10 and #1";
        assert_eq!(
            substitute(p, "#1", "frog", KeySubstitution::Replace),
            "frog near frog0 and frog"
        );
        assert_eq!(
            substitute(p, "#1", "frog", KeySubstitution::Exact),
            "frog near #10 and frog"
        );
    }

    #[test]
    fn indices_cover_the_substituted_phrase_in_both_encoders() {
        let a = obj("a #1 swims", "hairy shark", &["hairy fish"], &[1]);
        let b = obj("a #2 sits", "furry frog", &[], &[]);
        let objects = [("#1", &a), ("#2", &b)];
        let r = rule(KeySubstitution::Replace);
        // Step 0: #1 takes its frequent phrase (level 1 stops at 5), #2 has none.
        let st = step_text("a #1 and a #2 on a beach", &objects, 0, &r, &Words).unwrap();
        assert_eq!(st.prompt, "a hairy fish and a furry frog on a beach");
        // CLIP: BOS, a, hairy, fish, and, a, furry, frog, ... -> rows 2..4 and 6..8.
        assert_eq!(st.indices("#1").unwrap(), &[2, 3, 77 + 1, 77 + 2]);
        assert_eq!(st.indices("#2").unwrap(), &[6, 7, 77 + 5, 77 + 6]);
        // Step 1 (odd): the rare phrase.
        let st = step_text("a #1 and a #2 on a beach", &objects, 1, &r, &Words).unwrap();
        assert_eq!(st.prompt, "a hairy shark and a furry frog on a beach");
        assert_eq!(st.indices("#1").unwrap(), &[2, 3, 78, 79]);
    }

    #[test]
    fn an_unknown_key_and_an_empty_phrase_are_reported() {
        let a = obj("a #1", "", &[], &[]);
        let objects = [("#1", &a)];
        let r = rule(KeySubstitution::Replace);
        let err = step_text("a #1 and #2", &objects, 0, &r, &Words).unwrap_err();
        assert!(err.to_string().contains("#2"), "{err}");
        let runs = vec![RunText {
            run: "#1".into(),
            boxes: vec![("#1".into(), [0.0, 0.0, 1.0, 1.0])],
            steps: vec![step_text("a #1", &objects, 0, &r, &Words).unwrap()],
        }];
        let err = check_guided_rows(&runs, 10).unwrap_err().to_string();
        assert!(err.contains("no tokens"), "{err}");
        assert!(check_guided_rows(&runs, 0).is_ok());
    }

    #[test]
    fn plan_text_runs_objects_in_plan_order_then_the_overall_image() {
        let mut objects = indexmap::IndexMap::new();
        objects.insert("#2".to_string(), obj("a #2", "furry frog", &[], &[]));
        objects.insert(
            "#1".to_string(),
            obj("a #1", "hairy shark", &["fish"], &[2]),
        );
        let plan = RegionPlan {
            original_prompt: "x".into(),
            base_prompt: "#1 and #2".into(),
            objects,
        };
        let runs = plan_text(&plan, 50, 20, true, &rule(KeySubstitution::Replace), &Words).unwrap();
        let names: Vec<_> = runs.iter().map(|r| r.run.as_str()).collect();
        assert_eq!(names, ["#2", "#1", "overall"]);
        assert_eq!(runs[0].steps.len(), 20);
        assert_eq!(runs[2].steps.len(), 50);
        // The overall run's boxes are the real ones in plan order; object runs use the centred box.
        assert_eq!(runs[2].boxes[0].0, "#2");
        assert_eq!(
            runs[1].boxes[0].1,
            crate::r2f::regions::centered_bbox(&[0.1, 0.2, 0.5, 0.6])
        );
        // Level 2 stops at step 10: "fish" on even steps before it.
        assert_eq!(runs[1].steps[8].prompt, "a fish");
        assert_eq!(runs[1].steps[10].prompt, "a hairy shark");
        let no_objects = plan_text(
            &plan,
            50,
            20,
            false,
            &rule(KeySubstitution::Replace),
            &Words,
        )
        .unwrap();
        assert_eq!(no_objects.len(), 1);
    }
}
