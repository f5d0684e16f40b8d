//! The reports of a run: the official-shaped `avg_scores` JSON, a Markdown summary, and a
//! self-contained HTML page with a contact sheet per category (the same prompt side by side
//! across configurations, with the scores). Images are referenced by their paths relative to the
//! run folder, where the report is written; every text is HTML-escaped.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{Map, Value};

use super::judge::Usage;
use super::manifest::RunState;
use super::score::{CategoryScore, Gate, Paired, Verdict};
use super::spec::Category;

/// The judge's name in score keys: the model without a trailing `-YYYY-MM-DD` date and without
/// anything but lowercase letters and digits (`gpt-4o-2024-05-13` -> `gpt4o`, the official
/// files' spelling).
pub fn judge_label(model: &str) -> String {
    let m = model.rsplit('/').next().unwrap_or(model);
    let b = m.as_bytes();
    let dated = b.len() > 11 && {
        let t = &b[b.len() - 11..];
        t[0] == b'-'
            && t[5] == b'-'
            && t[8] == b'-'
            && t.iter()
                .enumerate()
                .all(|(i, c)| matches!(i, 0 | 5 | 8) || c.is_ascii_digit())
    };
    let m = if dated { &m[..m.len() - 11] } else { m };
    m.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// The official key of a score: `<config>/rarebench_<category>_t2i_scores_by_<judge label>`.
pub fn score_key(config: &str, category: Category, label: &str) -> String {
    format!("{config}/{}_t2i_scores_by_{label}", category.dataset())
}

/// The `avg_scores` JSON: score key -> 0–100 average, configurations in `configs` order and
/// categories in the official order.
pub fn avg_scores_json(scores: &[CategoryScore], configs: &[String], label: &str) -> Value {
    let mut m = Map::new();
    for c in configs {
        for cat in Category::ALL {
            if let Some(s) = scores.iter().find(|s| &s.config == c && s.category == *cat) {
                m.insert(score_key(c, *cat, label), Value::from(s.score));
            }
        }
    }
    Value::Object(m)
}

/// What a report shows.
#[derive(Debug, Clone)]
pub struct ReportData {
    pub title: String,
    /// The judge model as asked.
    pub judge_model: String,
    pub configs: Vec<String>,
    pub categories: Vec<Category>,
    pub scores: Vec<CategoryScore>,
    pub comparisons: Vec<Paired>,
    pub gate: Option<Gate>,
    /// Tokens billed per configuration.
    pub usage: BTreeMap<String, Usage>,
}

impl ReportData {
    fn score(&self, config: &str, c: Category) -> Option<&CategoryScore> {
        self.scores
            .iter()
            .find(|s| s.config == config && s.category == c)
    }

    /// The unweighted mean of a configuration's category scores (None unless every category
    /// has one).
    pub fn mean(&self, config: &str) -> Option<f64> {
        let v: Vec<f64> = self
            .categories
            .iter()
            .map(|&c| self.score(config, c).map(|s| s.score))
            .collect::<Option<_>>()?;
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    }
}

fn num(v: Option<f64>) -> String {
    v.map_or_else(|| "–".to_string(), |x| format!("{x:.1}"))
}

fn signed(x: f64) -> String {
    format!("{x:+.1}")
}

fn verdict_word(v: Verdict) -> &'static str {
    match v {
        Verdict::Pass => "pass",
        Verdict::Fail => "FAIL",
        Verdict::NoData => "no data",
    }
}

/// Markdown text in a table cell: `|` and line breaks would break the table.
fn md_cell(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('|', "\\|")
        .replace(['\n', '\r'], " ")
}

/// The Markdown summary: scores per configuration and category, the comparisons, the gate and
/// the judge's tokens.
pub fn markdown(d: &ReportData) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "# {}\n", md_cell(&d.title));
    let _ = writeln!(
        o,
        "Judge: `{}`. Scores: the official RareBench aggregate, mean(max(score − 1, 0)) / 4 × 100.\n",
        md_cell(&d.judge_model)
    );
    let _ = write!(o, "| configuration |");
    for c in &d.categories {
        let _ = write!(o, " {} |", c.name());
    }
    let _ = writeln!(o, " mean |");
    let _ = writeln!(o, "|---|{}---:|", "---:|".repeat(d.categories.len()));
    for cfg in &d.configs {
        let _ = write!(o, "| {} |", md_cell(cfg));
        for &c in &d.categories {
            let _ = write!(o, " {} |", num(d.score(cfg, c).map(|s| s.score)));
        }
        let _ = writeln!(o, " {} |", num(d.mean(cfg)));
    }
    if !d.comparisons.is_empty() {
        let _ = writeln!(o, "\n## Paired differences\n");
        let _ = writeln!(
            o,
            "| B − A | category | pairs | A | B | B − A | CI |\n|---|---|---:|---:|---:|---:|---|"
        );
        for p in &d.comparisons {
            let _ = writeln!(
                o,
                "| {} − {} | {} | {} | {:.1} | {:.1} | {} | [{}, {}] ({:.0}%) |",
                md_cell(&p.b),
                md_cell(&p.a),
                p.category.name(),
                p.pairs,
                p.score_a,
                p.score_b,
                signed(p.diff),
                signed(p.ci_low),
                signed(p.ci_high),
                p.confidence * 100.0
            );
        }
    }
    if let Some(g) = &d.gate {
        let _ = writeln!(
            o,
            "\n## Gate: {} against {} — {}\n\nB fails a category when the upper bound of its {:.0}% interval of B − A is below −{}.\n",
            md_cell(&g.b),
            md_cell(&g.a),
            if g.passed { "passed" } else { "FAILED" },
            g.bootstrap.confidence * 100.0,
            g.threshold
        );
        let _ = writeln!(o, "| category | B − A | CI | verdict |\n|---|---:|---|---|");
        for r in &g.rows {
            let (diff, ci) = match &r.paired {
                Some(p) => (
                    signed(p.diff),
                    format!("[{}, {}]", signed(p.ci_low), signed(p.ci_high)),
                ),
                None => ("–".into(), "–".into()),
            };
            let _ = writeln!(
                o,
                "| {} | {diff} | {ci} | {} |",
                r.category.name(),
                verdict_word(r.verdict)
            );
        }
    }
    if !d.usage.is_empty() {
        let _ = writeln!(
            o,
            "\n## Judge tokens\n\n| configuration | prompt | completion | total |\n|---|---:|---:|---:|"
        );
        let mut total = Usage::default();
        for (cfg, u) in &d.usage {
            total += *u;
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} |",
                md_cell(cfg),
                u.prompt_tokens,
                u.completion_tokens,
                u.total_tokens
            );
        }
        let _ = writeln!(
            o,
            "| all | {} | {} | {} |",
            total.prompt_tokens, total.completion_tokens, total.total_tokens
        );
    }
    o
}

/// Text for HTML (content and attribute values).
pub fn escape_html(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// A relative path as a URL path: bytes other than unreserved characters and `/` are
/// percent-encoded; a path that is absolute or climbs out (`..`) is refused.
pub fn relative_url(path: &str) -> Option<String> {
    if path.starts_with('/') || path.contains('\\') || path.split('/').any(|s| s == "..") {
        return None;
    }
    let mut o = String::new();
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            o.push(b as char);
        } else {
            let _ = write!(o, "%{b:02X}");
        }
    }
    Some(o)
}

/// One image of the contact sheet.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    pub seed: u64,
    /// Relative to the run folder.
    pub image: String,
    pub score: Option<u8>,
    pub explanation: Option<String>,
}

/// One prompt of a category across configurations (one list of cells per configuration, in the
/// report's order).
#[derive(Debug, Clone, PartialEq)]
pub struct SheetRow {
    pub category: Category,
    pub index: usize,
    pub prompt: String,
    pub cells: Vec<Vec<Cell>>,
}

/// The contact sheet of a run state for `judge`: every prompt that has an image, by category
/// and index.
pub fn contact_sheet(
    state: &RunState,
    judge: &str,
    configs: &[String],
    categories: &[Category],
) -> Vec<SheetRow> {
    let mut rows: BTreeMap<(usize, usize), SheetRow> = BTreeMap::new();
    for (k, s) in &state.samples {
        let (Some(cat_pos), Some(cfg_pos)) = (
            categories.iter().position(|&c| c == k.category),
            configs.iter().position(|c| c == &k.config),
        ) else {
            continue;
        };
        let Some(img) = &s.image else { continue };
        let row = rows.entry((cat_pos, k.index)).or_insert_with(|| SheetRow {
            category: k.category,
            index: k.index,
            prompt: s.prompt.clone(),
            cells: vec![Vec::new(); configs.len()],
        });
        let j = s.judgements.get(judge);
        row.cells[cfg_pos].push(Cell {
            seed: k.seed,
            image: img.path.clone(),
            score: j.map(|j| j.score),
            explanation: j.map(|j| j.explanation.clone()),
        });
    }
    rows.into_values().collect()
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.3em .5em;vertical-align:top}\
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}\
.fail{color:#b00;font-weight:bold}.pass{color:#070}\
.sheet img{width:192px;height:auto;display:block}.sheet figure{margin:0 .3em .3em 0;display:inline-block;width:192px}\
figcaption{font-size:.8em}.s{font-weight:bold}";

/// The HTML report: the tables of [`markdown`] and a contact sheet per category.
pub fn html(d: &ReportData, sheet: &[SheetRow]) -> String {
    let e = escape_html;
    let mut o = String::new();
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body>\n<h1>{}</h1>\n<p>Judge: <code>{}</code>. Scores: the official RareBench aggregate, mean(max(score − 1, 0)) / 4 × 100.</p>\n",
        e(&d.title),
        e(&d.title),
        e(&d.judge_model)
    );
    let _ = write!(o, "<table><tr><th>configuration</th>");
    for c in &d.categories {
        let _ = write!(o, "<th>{}</th>", e(c.name()));
    }
    let _ = writeln!(o, "<th>mean</th></tr>");
    for cfg in &d.configs {
        let _ = write!(o, "<tr><th>{}</th>", e(cfg));
        for &c in &d.categories {
            let _ = write!(
                o,
                "<td class=\"n\">{}</td>",
                num(d.score(cfg, c).map(|s| s.score))
            );
        }
        let _ = writeln!(o, "<td class=\"n\">{}</td></tr>", num(d.mean(cfg)));
    }
    let _ = writeln!(o, "</table>");
    if !d.comparisons.is_empty() {
        let _ = writeln!(o, "<h2>Paired differences</h2><table><tr><th>B − A</th><th>category</th><th>pairs</th><th>A</th><th>B</th><th>B − A</th><th>CI</th></tr>");
        for p in &d.comparisons {
            let _ = writeln!(
                o,
                "<tr><td>{} − {}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{:.1}</td><td class=\"n\">{:.1}</td><td class=\"n\">{}</td><td>[{}, {}] ({:.0}%)</td></tr>",
                e(&p.b),
                e(&p.a),
                e(p.category.name()),
                p.pairs,
                p.score_a,
                p.score_b,
                signed(p.diff),
                signed(p.ci_low),
                signed(p.ci_high),
                p.confidence * 100.0
            );
        }
        let _ = writeln!(o, "</table>");
    }
    if let Some(g) = &d.gate {
        let _ = writeln!(
            o,
            "<h2>Gate: {} against {} — <span class=\"{}\">{}</span></h2><table><tr><th>category</th><th>B − A</th><th>CI</th><th>verdict</th></tr>",
            e(&g.b),
            e(&g.a),
            if g.passed { "pass" } else { "fail" },
            if g.passed { "passed" } else { "FAILED" }
        );
        for r in &g.rows {
            let (diff, ci) = match &r.paired {
                Some(p) => (
                    signed(p.diff),
                    format!("[{}, {}]", signed(p.ci_low), signed(p.ci_high)),
                ),
                None => ("–".into(), "–".into()),
            };
            let class = if r.verdict == Verdict::Pass {
                "pass"
            } else {
                "fail"
            };
            let _ = writeln!(
                o,
                "<tr><td>{}</td><td class=\"n\">{diff}</td><td>{ci}</td><td class=\"{class}\">{}</td></tr>",
                e(r.category.name()),
                verdict_word(r.verdict)
            );
        }
        let _ = writeln!(o, "</table>");
    }
    if !d.usage.is_empty() {
        let _ = writeln!(o, "<h2>Judge tokens</h2><table><tr><th>configuration</th><th>prompt</th><th>completion</th><th>total</th></tr>");
        for (cfg, u) in &d.usage {
            let _ = writeln!(
                o,
                "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
                e(cfg),
                u.prompt_tokens,
                u.completion_tokens,
                u.total_tokens
            );
        }
        let _ = writeln!(o, "</table>");
    }
    for &cat in &d.categories {
        let rows: Vec<&SheetRow> = sheet.iter().filter(|r| r.category == cat).collect();
        if rows.is_empty() {
            continue;
        }
        let _ = write!(
            o,
            "<h2 id=\"{0}\">{0}</h2>\n<table class=\"sheet\"><tr><th>#</th><th>prompt</th>",
            e(cat.name())
        );
        for cfg in &d.configs {
            let _ = write!(o, "<th>{}</th>", e(cfg));
        }
        let _ = writeln!(o, "</tr>");
        for r in rows {
            let _ = write!(
                o,
                "<tr><td class=\"n\">{}</td><td>{}</td>",
                r.index,
                e(&r.prompt)
            );
            for cells in &r.cells {
                let _ = write!(o, "<td>");
                for c in cells {
                    let score = c.score.map_or_else(|| "–".to_string(), |s| s.to_string());
                    let title = c.explanation.as_deref().unwrap_or("not judged");
                    let img = match relative_url(&c.image) {
                        Some(u) => format!(
                            "<img src=\"{}\" alt=\"{}\" loading=\"lazy\">",
                            e(&u),
                            e(&r.prompt)
                        ),
                        None => String::new(),
                    };
                    let _ = write!(
                        o,
                        "<figure title=\"{}\">{img}<figcaption>seed {} · <span class=\"s\">{score}</span></figcaption></figure>",
                        e(title),
                        c.seed
                    );
                }
                let _ = write!(o, "</td>");
            }
            let _ = writeln!(o, "</tr>");
        }
        let _ = writeln!(o, "</table>");
    }
    o.push_str("</body></html>\n");
    o
}

#[cfg(test)]
#[path = "report_tests.rs"]
mod tests;
