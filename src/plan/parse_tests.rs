//! Unit tests of `parse.rs` (kept apart so that the module reads top to bottom).

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
