//! Turning LLM answers into plans.
//!
//! R2F answers follow the grammar of our template (the official one): the
//! `### Visual Detail Level:` line gives one level per concept (joined by AND) and the
//! `### Final Prompt Sequence:` line gives `<frequent span> BREAK <rare span>` per concept
//! (joined by AND). The parser tolerates extra prose, casing, spacing, bold markers and code
//! fences, and says why an answer is unusable.
//!
//! Plans are built as full prompts the way the paper-era parser did (the shape of the official
//! precomputed files): start from the prompt with every rare span replaced by its frequent span,
//! then restore the concepts one by one from the highest level to the lowest; the last prompt is
//! the original. Levels stay in the LLM's order (the faithful schedule depends on that order).

use super::{R2fPlan, RegionPlan};

/// Lines of the answer with markdown decoration removed.
fn clean_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.replace("**", "").replace('`', "").trim().to_string())
        .collect()
}

/// The value after a `### <label>:` header (case-insensitive, spaces optional), if present.
fn header_value(lines: &[String], label: &str) -> Option<String> {
    let label = label.to_ascii_lowercase();
    lines.iter().find_map(|l| {
        let lower = l.to_ascii_lowercase();
        let rest = lower.strip_prefix('#')?;
        let rest = rest.trim_start_matches('#').trim_start();
        if rest.starts_with(&label) {
            let after = &l[l.len() - rest.len() + label.len()..];
            let after = after.trim_start();
            let after = after.strip_prefix(':').unwrap_or(after);
            Some(after.trim().to_string())
        } else {
            None
        }
    })
}

/// Splits on the uppercase delimiter word (`AND`, `BREAK`) surrounded by whitespace; lowercase
/// "and" inside prompts is left alone.
fn split_word(s: &str, word: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut rest = s;
    loop {
        let mut found = None;
        let mut search_from = 0;
        while let Some(pos) = rest[search_from..].find(word) {
            let at = search_from + pos;
            let before_ok = at == 0 || rest[..at].ends_with(char::is_whitespace);
            let end = at + word.len();
            let after_ok = end == rest.len() || rest[end..].starts_with(char::is_whitespace);
            if before_ok && after_ok {
                found = Some(at);
                break;
            }
            search_from = end;
        }
        match found {
            Some(at) => {
                parts.push(rest[..at].trim().to_string());
                rest = &rest[at + word.len()..];
            }
            None => {
                parts.push(rest.trim().to_string());
                break;
            }
        }
    }
    parts
}

/// Case-insensitive replacement of the first occurrence of `from` in `text`.
fn replace_ci(text: &str, from: &str, to: &str) -> Option<String> {
    let lt = text.to_lowercase();
    let lf = from.to_lowercase();
    // Lowercasing can change byte lengths outside ASCII; only map positions when it does not.
    if lt.len() != text.len() || lf.len() != from.len() {
        return text
            .find(from)
            .map(|i| format!("{}{}{}", &text[..i], to, &text[i + from.len()..]));
    }
    let i = lt.find(&lf)?;
    Some(format!("{}{}{}", &text[..i], to, &text[i + from.len()..]))
}

fn trim_span(s: &str) -> String {
    s.trim()
        .trim_matches(|c: char| c == '"' || c == '\'' || c == '.' || c == ',')
        .trim()
        .to_string()
}

/// Parses an R2F answer for `prompt` into a plan.
pub fn parse_r2f_answer(answer: &str, prompt: &str) -> Result<R2fPlan, String> {
    let lines = clean_lines(answer);
    let seq = header_value(&lines, "Final Prompt Sequence")
        .ok_or("the answer has no `### Final Prompt Sequence:` line")?;
    let levels_text = header_value(&lines, "Visual Detail Level")
        .ok_or("the answer has no `### Visual Detail Level:` line")?;
    let levels = split_word(&levels_text, "AND")
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| {
            let digits: String = s.chars().filter(|c| c.is_ascii_digit()).collect();
            match digits.parse::<u8>() {
                Ok(l) if l <= 5 => Ok(l),
                _ => Err(format!(
                    "visual detail level `{s}` is not a number from 0 to 5"
                )),
            }
        })
        .collect::<Result<Vec<u8>, String>>()?;
    if levels.is_empty() {
        return Err("the visual detail level line is empty".into());
    }
    let concepts: Vec<(String, String)> = split_word(&seq, "AND")
        .iter()
        .filter_map(|part| {
            let pair = split_word(part, "BREAK");
            (pair.len() == 2).then(|| (trim_span(&pair[0]), trim_span(&pair[1])))
        })
        .filter(|(f, r)| !f.is_empty() && !r.is_empty())
        .collect();
    // No rare concept: the prompt alone.
    if concepts.is_empty() {
        if levels.iter().all(|&l| l == 0) {
            return Ok(R2fPlan::plain(prompt));
        }
        return Err(format!(
            "the final prompt sequence `{seq}` has no `<frequent> BREAK <rare>` pair for levels {levels:?}"
        ));
    }
    if concepts.len() != levels.len() {
        return Err(format!(
            "{} concepts in the final prompt sequence but {} visual detail levels",
            concepts.len(),
            levels.len()
        ));
    }
    if levels.contains(&0) {
        return Err("a rare concept has visual detail level 0".into());
    }
    // All-frequent prompt; a concept whose rare span is not in the prompt cannot be swapped in
    // place, so a single such concept yields its frequent span as the whole frequent prompt.
    let mut frequent = prompt.to_string();
    let mut placed = vec![true; concepts.len()];
    for (i, (f, r)) in concepts.iter().enumerate() {
        match replace_ci(&frequent, r, f) {
            Some(t) => frequent = t,
            None => placed[i] = false,
        }
    }
    if placed.iter().any(|p| !p) {
        if concepts.len() == 1 {
            return Ok(R2fPlan {
                prompts: vec![concepts[0].0.clone(), prompt.to_string()],
                levels,
            });
        }
        let missing: Vec<&str> = concepts
            .iter()
            .zip(&placed)
            .filter(|(_, p)| !**p)
            .map(|((_, r), _)| r.as_str())
            .collect();
        return Err(format!("rare spans not found in the prompt: {missing:?}"));
    }
    // Restore concepts from the highest level down (stable for ties).
    let mut order: Vec<usize> = (0..concepts.len()).collect();
    order.sort_by(|&a, &b| levels[b].cmp(&levels[a]));
    let mut prompts = Vec::with_capacity(concepts.len() + 1);
    let mut current = frequent;
    for &i in order.iter().take(concepts.len() - 1) {
        prompts.push(current.clone());
        let (f, r) = &concepts[i];
        current = replace_ci(&current, f, r).unwrap_or(current);
    }
    prompts.push(current);
    prompts.push(prompt.to_string());
    Ok(R2fPlan { prompts, levels })
}

/// Parses an R2F+ answer: the first JSON object in the text, validated.
pub fn parse_r2fplus_answer(answer: &str) -> Result<RegionPlan, String> {
    let start = answer.find('{').ok_or("the answer holds no JSON object")?;
    let end = answer
        .rfind('}')
        .ok_or("the answer holds no complete JSON object")?;
    if end < start {
        return Err("the answer holds no complete JSON object".into());
    }
    let plan: RegionPlan = serde_json::from_str(&answer[start..=end])
        .map_err(|e| format!("the JSON object is not an R2F+ plan: {e}"))?;
    plan.validate()?;
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: &str = "### Num Rare Concepts: 1
a. Rare concept: A hairy frog
b. Frogs have smooth skin. Main noun subject: frog, Context: hairy, Replaced frequent subject: animal
c. A hairy animal BREAK A hairy frog
d. Hair is a fine texture over the body. Visual Detail Level: 5
### Visual Detail Level: 5
### Final Prompt Sequence: A hairy animal BREAK A hairy frog";

    #[test]
    fn one_concept() {
        let p = parse_r2f_answer(ONE, "A hairy frog").unwrap();
        assert_eq!(p.prompts, vec!["A hairy animal", "A hairy frog"]);
        assert_eq!(p.levels, vec![5]);
    }

    #[test]
    fn no_concept_is_the_prompt_alone() {
        let a = "### Num Rare Concepts: 0\nNo rare concept was found in the given input text.\n### Visual Detail Level: 0\n### Final Prompt Sequence: a dog running in a park";
        let p = parse_r2f_answer(a, "a dog running in a park").unwrap();
        assert_eq!(p.prompts, vec!["a dog running in a park"]);
        assert_eq!(p.levels, vec![0]);
    }

    #[test]
    fn several_concepts_restore_highest_level_first_and_keep_llm_level_order() {
        let a = "Sure! Here is the analysis.\n\n### Num Rare Concepts: 2\na. Rare concept: a horned lion\nb. ... Replaced frequent subject: animal\nc. a horned animal BREAK a horned lion\nd. Horns are local. Visual Detail Level: 3\nAND\na. Rare concept: a hairy frog\nb. ...\nc. a hairy animal BREAK a hairy frog\nd. Hair everywhere. Visual Detail Level: 5\n### Visual Detail Level: 3 AND 5\n### Final Prompt Sequence: a horned animal BREAK a horned lion AND a hairy animal BREAK a hairy frog\n\nHope this helps.";
        let prompt = "a horned lion and a hairy frog";
        let p = parse_r2f_answer(a, prompt).unwrap();
        assert_eq!(p.levels, vec![3, 5]);
        assert_eq!(
            p.prompts,
            vec![
                "a horned animal and a hairy animal",
                "a horned animal and a hairy frog",
                "a horned lion and a hairy frog"
            ]
        );
    }

    #[test]
    fn tolerates_format_drift() {
        let a = "**### visual detail level:** 4\n###Final Prompt Sequence:  \"a glass sphere BREAK a glass peach\".";
        let p = parse_r2f_answer(a, "a glass peach on a table").unwrap();
        assert_eq!(
            p.prompts,
            vec!["a glass sphere on a table", "a glass peach on a table"]
        );
        assert_eq!(p.levels, vec![4]);
    }

    #[test]
    fn rare_span_not_in_prompt_with_one_concept_uses_the_frequent_span() {
        let a = "### Visual Detail Level: 2\n### Final Prompt Sequence: a swimming vehicle BREAK a swimming helicopter";
        let p = parse_r2f_answer(a, "A helicopter swimming in the sea").unwrap();
        assert_eq!(
            p.prompts,
            vec!["a swimming vehicle", "A helicopter swimming in the sea"]
        );
    }

    #[test]
    fn unusable_answers_fail_with_a_clear_message() {
        let cases = [
            ("I cannot help with that.", "Final Prompt Sequence"),
            (
                "### Final Prompt Sequence: a BREAK b",
                "Visual Detail Level",
            ),
            (
                "### Visual Detail Level: high\n### Final Prompt Sequence: a x BREAK a y",
                "not a number",
            ),
            (
                "### Visual Detail Level: 9\n### Final Prompt Sequence: a x BREAK a y",
                "0 to 5",
            ),
            (
                "### Visual Detail Level: 3 AND 4\n### Final Prompt Sequence: a x BREAK a y",
                "2 visual detail levels",
            ),
            (
                "### Visual Detail Level: 3\n### Final Prompt Sequence: just a prompt",
                "no `<frequent> BREAK <rare>` pair",
            ),
        ];
        for (a, needle) in cases {
            let e = parse_r2f_answer(a, "a y").unwrap_err();
            assert!(e.contains(needle), "{a:?}: {e}");
        }
    }

    #[test]
    fn r2fplus_answer_in_prose_or_code_fence() {
        let a = "Here you go:\n```json\n{\"original_prompt\": \"a glass owl and a cat\", \"base_prompt\": \"#1 and #2\", \"objects\": {\"#1\": {\"prompt\": \"#1\", \"object\": \"a glass owl\", \"r2f\": [\"a glass bird\"], \"visual_detail_levels\": [3], \"bbox\": [0.1, 0.2, 0.45, 0.7]}, \"#2\": {\"prompt\": \"#2\", \"object\": \"a cat\", \"r2f\": [], \"visual_detail_levels\": [], \"bbox\": [0.55, 0.3, 0.9, 0.7]}}}\n```";
        let p = parse_r2fplus_answer(a).unwrap();
        assert_eq!(p.objects.len(), 2);
        let bad = "{'original_prompt': 'x', 'rare': [], 'freq': []}";
        assert!(parse_r2fplus_answer(bad).is_err());
    }
}
