use super::*;
use crate::bench::rarebench::judge::Judgement;
use crate::bench::rarebench::manifest::Entry;
use crate::bench::rarebench::score::{self, Bootstrap};
use crate::bench::rarebench::spec::SampleKey;
use crate::image::ImageFormat;

#[test]
fn judge_labels_and_keys_are_the_official_spelling() {
    assert_eq!(judge_label("gpt-4o-2024-05-13"), "gpt4o");
    assert_eq!(judge_label("gpt-4o"), "gpt4o");
    assert_eq!(judge_label("openai/gpt-4.1-mini"), "gpt41mini");
    assert_eq!(
        judge_label("Qwen2.5-VL-72B-Instruct"),
        "qwen25vl72binstruct"
    );
    assert_eq!(
        score_key("R2F-sd3", Category::Multi1And, "gpt4o"),
        "R2F-sd3/rarebench_multi_1and_t2i_scores_by_gpt4o"
    );
}

fn cs(config: &str, category: Category, score: f64) -> CategoryScore {
    CategoryScore {
        config: config.into(),
        category,
        images: 40,
        prompts: 40,
        score,
    }
}

#[test]
fn avg_scores_is_shaped_like_the_official_file() {
    let scores = vec![
        cs("r2f", Category::Multi1And, 61.25000000000001),
        cs("plain", Category::Single2Shape, 50.0),
        cs("r2f", Category::Single1Property, 12.5),
    ];
    let v = avg_scores_json(&scores, &["r2f".into(), "plain".into()], "gpt4o");
    let text = serde_json::to_string(&v).unwrap();
    assert_eq!(
        text,
        "{\"r2f/rarebench_single_1property_t2i_scores_by_gpt4o\":12.5,\
         \"r2f/rarebench_multi_1and_t2i_scores_by_gpt4o\":61.25000000000001,\
         \"plain/rarebench_single_2shape_t2i_scores_by_gpt4o\":50.0}"
    );
}

fn state_and_table() -> (RunState, score::ScoreTable) {
    let mut st = RunState::default();
    let prompts = [
        "a <b>furry</b> kettle & \"two\" lemons",
        "the owl\u{2019}s umbrella",
    ];
    for cfg in ["plain", "r2f"] {
        for (i, p) in prompts.iter().enumerate() {
            let key = SampleKey {
                config: cfg.into(),
                category: Category::Multi1And,
                index: i,
                seed: 0,
            };
            st.apply(Entry::Image {
                key: key.clone(),
                prompt: p.to_string(),
                image: key.image_path(ImageFormat::Png),
                sha256: "s".into(),
                at: "t".into(),
            });
            let score = if cfg == "r2f" { 5 } else { 3 };
            st.apply(Entry::Judged {
                key,
                sha256: "s".into(),
                judge: "j".into(),
                judgement: Judgement {
                    score,
                    explanation: "it's <fine> & \"ok\"".into(),
                    answer: String::new(),
                    model: "m".into(),
                    requests: 1,
                    malformed: 0,
                    usage: Usage {
                        prompt_tokens: 10,
                        completion_tokens: 2,
                        total_tokens: 12,
                    },
                },
                at: "t".into(),
            });
        }
    }
    let t = score::table(st.scores("j"));
    (st, t)
}

fn data() -> (ReportData, Vec<SheetRow>) {
    let (st, t) = state_and_table();
    let configs: Vec<String> = vec!["plain".into(), "r2f".into()];
    let cats = vec![Category::Multi1And];
    let boot = Bootstrap {
        resamples: 100,
        ..Bootstrap::default()
    };
    let d = ReportData {
        title: "RareBench <run> & co".into(),
        judge_model: "gpt-4o-2024-05-13".into(),
        configs: configs.clone(),
        categories: cats.clone(),
        scores: score::category_scores(&t),
        comparisons: vec![score::paired(&t, Category::Multi1And, "plain", "r2f", &boot).unwrap()],
        gate: Some(score::gate(&t, &cats, "plain", "r2f", 5.0, &boot)),
        usage: st.billed("j"),
    };
    let sheet = contact_sheet(&st, "j", &configs, &cats);
    (d, sheet)
}

#[test]
fn the_contact_sheet_puts_a_prompt_side_by_side() {
    let (_, sheet) = data();
    assert_eq!(sheet.len(), 2);
    assert_eq!(sheet[0].index, 0);
    assert_eq!(sheet[0].cells.len(), 2);
    assert_eq!(
        sheet[0].cells[1],
        [Cell {
            seed: 0,
            image: "images/r2f/multi_1and/000_s0.png".into(),
            score: Some(5),
            explanation: Some("it's <fine> & \"ok\"".into()),
        }]
    );
    assert_eq!(sheet[1].prompt, "the owl\u{2019}s umbrella");
}

#[test]
fn markdown_has_the_tables() {
    let (d, _) = data();
    let md = markdown(&d);
    assert!(md.contains("| configuration | multi_1and | mean |"), "{md}");
    assert!(md.contains("| plain | 50.0 | 50.0 |"), "{md}");
    assert!(md.contains("| r2f | 100.0 | 100.0 |"), "{md}");
    assert!(
        md.contains(
            "| r2f − plain | multi_1and | 2 | 50.0 | 100.0 | +50.0 | [+50.0, +50.0] (95%) |"
        ),
        "{md}"
    );
    assert!(md.contains("## Gate: r2f against plain — passed"), "{md}");
    assert!(
        md.contains("| multi_1and | +50.0 | [+50.0, +50.0] | pass |"),
        "{md}"
    );
    assert!(md.contains("| all | 40 | 8 | 48 |"), "{md}");
    assert_eq!(md_cell("a|b\nc"), "a\\|b c");
}

#[test]
fn html_escapes_every_text_and_links_images_relatively() {
    let (d, sheet) = data();
    let h = html(&d, &sheet);
    assert!(h.starts_with("<!DOCTYPE html>"));
    assert!(h.contains("<title>RareBench &lt;run&gt; &amp; co</title>"));
    assert!(!h.contains("<b>furry</b>"), "a prompt's markup is text");
    assert!(h.contains("a &lt;b&gt;furry&lt;/b&gt; kettle &amp; &quot;two&quot; lemons"));
    assert!(h.contains("title=\"it&#39;s &lt;fine&gt; &amp; &quot;ok&quot;\""));
    assert!(h.contains("<img src=\"images/r2f/multi_1and/000_s0.png\""));
    assert!(h.contains("the owl\u{2019}s umbrella"));
    assert!(
        !h.contains("http://") && !h.contains("https://"),
        "self-contained"
    );
    assert!(h.contains("<span class=\"pass\">passed</span>"));
    assert_eq!(
        escape_html("<a href='x'>\"&\"</a>"),
        "&lt;a href=&#39;x&#39;&gt;&quot;&amp;&quot;&lt;/a&gt;"
    );
    assert_eq!(
        relative_url("images/a b/#1?.png").unwrap(),
        "images/a%20b/%231%3F.png"
    );
    assert_eq!(relative_url("../secret.png"), None);
    assert_eq!(relative_url("/etc/passwd"), None);
    assert_eq!(relative_url("images/../../x"), None);
}

#[test]
fn a_failed_gate_and_missing_scores_show() {
    let (mut d, _) = data();
    d.categories.push(Category::Single1Property);
    d.gate = Some(score::gate(
        &score::table(state_and_table().0.scores("j")),
        &d.categories,
        "r2f",
        "plain",
        5.0,
        &Bootstrap {
            resamples: 50,
            ..Bootstrap::default()
        },
    ));
    let md = markdown(&d);
    assert!(md.contains("| plain | 50.0 | – | – |"), "{md}");
    assert!(md.contains("— FAILED"), "{md}");
    assert!(
        md.contains("| multi_1and | -50.0 | [-50.0, -50.0] | FAIL |"),
        "{md}"
    );
    assert!(
        md.contains("| single_1property | – | – | no data |"),
        "{md}"
    );
    let h = html(&d, &[]);
    assert!(h.contains("<td class=\"fail\">FAIL</td>"));
    assert!(h.contains("<td class=\"fail\">no data</td>"));
}
