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

/// The byte range of the first case-insensitive occurrence of `needle` in `text`, or None (also
/// for an empty `needle`). Matching walks the char boundaries of `text` itself and compares the
/// `char::to_lowercase` expansions char by char, so both ends of the range are char boundaries
/// of `text` whatever lowercasing does to byte lengths (Kelvin sign, 'Ⱥ', 'İ', ...). A match
/// must end where a char of `text` ends: a needle that covers only part of one char's
/// lowercase expansion (the "i" of 'İ') does not match.
fn find_ci(text: &str, needle: &str) -> Option<(usize, usize)> {
    let needle: Vec<char> = needle.chars().flat_map(char::to_lowercase).collect();
    if needle.is_empty() {
        return None;
    }
    'starts: for (start, _) in text.char_indices() {
        let mut k = 0;
        for (offset, c) in text[start..].char_indices() {
            for l in c.to_lowercase() {
                if k == needle.len() || l != needle[k] {
                    continue 'starts;
                }
                k += 1;
            }
            if k == needle.len() {
                return Some((start, start + offset + c.len_utf8()));
            }
        }
        // The text ran out while still matching: later starts have even less text.
        return None;
    }
    None
}

/// Case-insensitive replacement of the first occurrence of `from` in `text`; None when `from`
/// is empty or does not occur.
fn replace_ci(text: &str, from: &str, to: &str) -> Option<String> {
    let (start, end) = find_ci(text, from)?;
    let mut out = String::with_capacity(text.len() - (end - start) + to.len());
    out.push_str(&text[..start]);
    out.push_str(to);
    out.push_str(&text[end..]);
    Some(out)
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
#[path = "parse_tests.rs"]
mod tests;
