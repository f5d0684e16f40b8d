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

    #[test]
    fn replace_ci_matches_the_kelvin_sign() {
        // U+212A KELVIN SIGN lowercases to ASCII 'k' (3 bytes become 1).
        assert_eq!(
            replace_ci("a \u{212A}itten on a mat", "kitten", "cat").as_deref(),
            Some("a cat on a mat")
        );
        assert_eq!(
            replace_ci("a kitten on a mat", "\u{212A}ITTEN", "cat").as_deref(),
            Some("a cat on a mat")
        );
        assert_eq!(
            replace_ci("\u{212A}\u{212A} a Kitten", "KITTEN", "cat").as_deref(),
            Some("\u{212A}\u{212A} a cat")
        );
    }

    #[test]
    fn replace_ci_with_a_char_that_grows_when_lowercased() {
        // U+023A lowercases to U+2C65 (2 bytes become 3).
        assert_eq!(
            replace_ci("ȺȺȺ a Frog", "frog", "toad").as_deref(),
            Some("ȺȺȺ a toad")
        );
        assert_eq!(replace_ci("a Ⱥb c", "ⱥB", "x").as_deref(), Some("a x c"));
    }

    #[test]
    fn replace_ci_with_the_dotted_capital_i() {
        // U+0130 lowercases to two chars, 'i' and U+0307.
        assert_eq!(
            replace_ci("İstanbul cat", "CAT", "dog").as_deref(),
            Some("İstanbul dog")
        );
        assert_eq!(
            replace_ci("a İstanbul cat", "İSTANBUL", "Paris").as_deref(),
            Some("a Paris cat")
        );
        assert_eq!(
            replace_ci("i\u{307} cat", "İ", "x").as_deref(),
            Some("x cat")
        );
        // A match may not end inside one char's lowercase expansion.
        assert_eq!(replace_ci("İ", "i", "x"), None);
    }

    #[test]
    fn replace_ci_after_emoji_and_combining_marks() {
        assert_eq!(
            replace_ci("🐸👩‍👩‍👧 a Frog 🐸", "FROG", "toad").as_deref(),
            Some("🐸👩‍👩‍👧 a toad 🐸")
        );
        assert_eq!(
            replace_ci("Cafe\u{301} FROG", "cafe\u{301} frog", "x").as_deref(),
            Some("x")
        );
        assert_eq!(
            replace_ci("e\u{301}\u{301} a Frog", "frog", "toad").as_deref(),
            Some("e\u{301}\u{301} a toad")
        );
    }

    #[test]
    fn replace_ci_where_lowercasing_shifts_offsets_but_keeps_the_total_length() {
        // The Kelvin sign loses 2 bytes and the two 'Ⱥ' gain 2: offsets in a lowercased copy
        // point inside the Kelvin sign of the original.
        assert_eq!(
            replace_ci("\u{212A} frog ȺȺ", "frog", "toad").as_deref(),
            Some("\u{212A} toad ȺȺ")
        );
        assert_eq!(
            replace_ci("Ⱥ Ⱥ x frog \u{212A}", "FROG", "toad").as_deref(),
            Some("Ⱥ Ⱥ x toad \u{212A}")
        );
    }

    #[test]
    fn replace_ci_with_an_empty_needle_or_no_match() {
        assert_eq!(replace_ci("a frog", "", "x"), None);
        assert_eq!(replace_ci("", "", "x"), None);
        assert_eq!(replace_ci("a frog", "toad", "x"), None);
        assert_eq!(replace_ci("", "frog", "x"), None);
        assert_eq!(replace_ci("a fro", "frog", "x"), None);
        assert_eq!(replace_ci("ȺȺ", "ⱥⱥⱥ", "x"), None);
    }

    #[test]
    fn replace_ci_replaces_only_the_first_occurrence() {
        assert_eq!(
            replace_ci("A FROG and a frog", "frog", "toad").as_deref(),
            Some("A toad and a frog")
        );
    }

    #[test]
    fn r2f_answer_for_a_prompt_with_case_changing_chars() {
        // Before, the Kelvin sign made the rare span unfindable and the plan fell back to the
        // frequent span alone.
        let a = "### Visual Detail Level: 4\n### Final Prompt Sequence: an animal made of glass BREAK a kitten made of glass";
        let prompt = "a \u{212A}itten made of glass on a table";
        let p = parse_r2f_answer(a, prompt).unwrap();
        assert_eq!(
            p.prompts,
            vec!["an animal made of glass on a table", prompt]
        );
        // Two concepts after chars whose lowercase has another byte length.
        let a = "### Visual Detail Level: 3 AND 5\n### Final Prompt Sequence: a horned animal BREAK a horned lion AND a hairy animal BREAK a hairy frog";
        let prompt = "\u{212A} İ A Horned Lion and ȺȺ a hairy FROG";
        let p = parse_r2f_answer(a, prompt).unwrap();
        assert_eq!(
            p.prompts,
            vec![
                "\u{212A} İ a horned animal and ȺȺ a hairy animal",
                "\u{212A} İ a horned animal and ȺȺ a hairy frog",
                prompt
            ]
        );
    }

    /// Pieces the generated strings are made of: chars whose case mapping changes byte length
    /// or char count, emoji, combining marks, control chars and the answer grammar's words.
    const TRICKY: &[&str] = &[
        "\u{212A}",
        "Ⱥ",
        "ⱥ",
        "İ",
        "i\u{307}",
        "ß",
        "ẞ",
        "ﬁ",
        "Σ",
        "ς",
        "ΐ",
        "ǅ",
        "Ω",
        "\u{2126}",
        "🐸",
        "👩\u{200D}👩\u{200D}👧",
        "e\u{301}",
        "\u{301}",
        "é",
        "\u{0}",
        "\u{FEFF}",
        "a",
        "A",
        "k",
        "K",
        "i",
        "I",
        "frog",
        "FROG",
        "Frog",
        " ",
        "  ",
        "\n",
        "\r\n",
        "\t",
        "#",
        "###",
        "#1",
        ":",
        "**",
        "`",
        "{",
        "}",
        "[",
        "]",
        "\"",
        "'",
        ".",
        ",",
        "BREAK",
        "AND",
        "and",
        "0",
        "3",
        "5",
        "9",
        "12",
        "Visual Detail Level",
        "Final Prompt Sequence",
    ];

    /// A small deterministic generator (xorshift64).
    struct Gen(u64);

    impl Gen {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn pieces(&mut self, max: usize) -> Vec<&'static str> {
            let n = self.below(max + 1);
            (0..n).map(|_| TRICKY[self.below(TRICKY.len())]).collect()
        }

        fn text(&mut self, max: usize) -> String {
            self.pieces(max).concat()
        }

        /// A run of the pieces, as is, lowercased or uppercased char by char, or random text.
        fn part_of(&mut self, pieces: &[&str]) -> (String, u8) {
            let kind = self.below(4) as u8;
            if kind == 3 || pieces.is_empty() {
                return (self.text(4), 3);
            }
            let a = self.below(pieces.len());
            let b = a + 1 + self.below(pieces.len() - a);
            let run = pieces[a..b].concat();
            let s = match kind {
                0 => run,
                1 => run.chars().flat_map(char::to_lowercase).collect(),
                _ => run.chars().flat_map(char::to_uppercase).collect(),
            };
            (s, kind)
        }
    }

    fn lower(s: &str) -> String {
        s.chars().flat_map(char::to_lowercase).collect()
    }

    #[test]
    fn replace_ci_never_panics_and_matches_on_char_boundaries() {
        let mut g = Gen(0x9E37_79B9_7F4A_7C15);
        for _ in 0..20_000 {
            let pieces = g.pieces(12);
            let text = pieces.concat();
            let (from, kind) = g.part_of(&pieces);
            let found = find_ci(&text, &from);
            if let Some((s, e)) = found {
                assert!(s < e && e <= text.len(), "{text:?} {from:?}");
                assert!(text.is_char_boundary(s) && text.is_char_boundary(e));
                assert_eq!(lower(&text[s..e]), lower(&from), "{text:?} {from:?}");
            }
            // A run of the text itself, or its char-wise lowercase, is always found.
            if !from.is_empty() && kind <= 1 {
                assert!(found.is_some(), "{from:?} not found in {text:?}");
            }
            let replaced = replace_ci(&text, &from, "<X>");
            assert_eq!(replaced.is_some(), found.is_some());
            if let (Some(r), Some((s, e))) = (replaced, found) {
                assert_eq!(r, format!("{}<X>{}", &text[..s], &text[e..]));
            }
        }
    }

    #[test]
    fn parsers_never_panic_on_arbitrary_input() {
        let mut g = Gen(0x2545_F491_4F6C_DD1D);
        for i in 0..10_000 {
            let pieces = g.pieces(10);
            let prompt = pieces.concat();
            let answer = if i % 3 == 0 {
                g.text(30)
            } else {
                let (r1, _) = g.part_of(&pieces);
                let (r2, _) = g.part_of(&pieces);
                format!(
                    "{}\n### Visual Detail Level: {}\n{}### Final Prompt Sequence: {} BREAK {} AND {} BREAK {}{}",
                    g.text(3),
                    g.text(3),
                    g.text(2),
                    g.text(3),
                    r1,
                    g.text(3),
                    r2,
                    g.text(2)
                )
            };
            if let Ok(plan) = parse_r2f_answer(&answer, &prompt) {
                assert_eq!(plan.prompts.last(), Some(&prompt), "{answer:?}");
            }
            let _ = parse_r2fplus_answer(&answer);
            let _ = parse_r2fplus_answer(&prompt);
            let json = serde_json::json!({
                "original_prompt": prompt,
                "base_prompt": format!("#1 {}", g.text(4)),
                "objects": {"#1": {"prompt": format!("{} #1", g.text(3)), "object": g.text(4),
                    "r2f": [g.text(4)], "visual_detail_levels": [g.below(7)],
                    "bbox": [0.1, 0.2, 0.5, 0.6]}}
            });
            let wrapped = format!("{}{json}{}", g.text(3), g.text(3));
            let _ = parse_r2fplus_answer(&wrapped);
        }
    }
}
