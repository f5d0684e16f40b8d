//! `r2f rarebench` end to end, in-process generation (`--local`, the tiny SD3 fixture on the
//! CPU) and a local judge stand-in: a benchmark folder of our own in the official layout (two
//! categories of three prompts, an R2F plan file with the real files' quirks), two
//! configurations (plain, R2F with the precomputed plans), the official aggregate checked by
//! hand, resumption (no new image, no new judge request), a damaged image made again (and left
//! unjudged, exit 75, by a `--judge-only` run), the HTML report read as text (a headless-browser
//! check is a later step), and the `--compare` gate failing and passing.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use common::fake_judge::{FakeJudge, Fault, API_KEY};
use common::model_dir;
use serde_json::{json, Value};

const KEY_VAR: &str = "R2F_TEST_RAREBENCH_JUDGE_KEY";

fn r2f() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_r2f"));
    for (k, _) in std::env::vars() {
        if k.starts_with("R2F__") {
            c.env_remove(k);
        }
    }
    c.env(KEY_VAR, API_KEY);
    c
}

fn show(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn put(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// Our own prompts in the official layout, with the quirks of the real files: no final
/// newline, a trailing space, a curly apostrophe, CRLF; plan levels as a string or an unsorted
/// list, a key without its line's trailing space, a prompt without a plan, a key of no line.
fn benchmark(root: &Path) {
    put(
        root,
        "test/original_prompt/rarebench/rarebench_single_1property.txt",
        "a feathered cactus\r\na transparent tiger \nthe owl\u{2019}s woolen umbrella",
    );
    put(
        root,
        "test/r2f_prompt/rarebench/rarebench_single_1property_gpt4.txt",
        &json!({
            "a feathered cactus": {
                "visual_detail_level": "3",
                "r2f_prompt": [["a feathered plant", "a feathered cactus"]]
            },
            // The line's trailing space is not in the key.
            "a transparent tiger": {
                "visual_detail_level": ["4"],
                "r2f_prompt": [["a transparent animal", "a transparent tiger"]]
            },
            "a prompt of no line": {"visual_detail_level": "1", "r2f_prompt": [["x"]]}
        })
        .to_string(),
    );
    put(
        root,
        "test/original_prompt/rarebench/rarebench_multi_1and.txt",
        "a furry kettle and two striped lemons\na glass owl and a woolly teapot\na stone bicycle and a paper moon\n",
    );
    put(
        root,
        "test/r2f_prompt/rarebench/rarebench_multi_1and_gpt4.txt",
        &json!({
            "a furry kettle and two striped lemons": {
                "visual_detail_level": ["4", "2"],
                "r2f_prompt": [["a furry object and two striped fruits",
                                "a furry object and two striped lemons",
                                "a furry kettle and two striped lemons"]]
            },
            "a glass owl and a woolly teapot": {
                "visual_detail_level": "3",
                "r2f_prompt": [["a glass bird and a woolly teapot", "a glass owl and a woolly teapot"]]
            },
            "a stone bicycle and a paper moon": {
                "visual_detail_level": "0",
                "r2f_prompt": [["a stone bicycle and a paper moon"]]
            }
        })
        .to_string(),
    );
}

/// A run spec: plain and R2F (precomputed plans) at 2 steps, 64×48, on the tiny fixture.
fn spec(dir: &Path, name: &str, judge: &FakeJudge, judge_model: &str) -> std::path::PathBuf {
    let model = model_dir("sd3-tiny-a");
    let model = model.to_str().unwrap();
    let text = format!(
        r#"title = "RareBench smoke"

[judge]
base_url = "{url}"
model = "{judge_model}"
api_key_env = "{KEY_VAR}"
concurrency = 2
timeout_secs = 30
max_attempts = 4
retry_backoff_secs = 0.05
max_retry_wait_secs = 2

[[configs]]
name = "plain"
model = "{model}"
mode = "plain"
seeds = [7]
params = {{ steps = 2, width = 64, height = 48 }}

[[configs]]
name = "r2f"
model = "{model}"
mode = "r2f"
seeds = [7]
params = {{ steps = 2, width = 64, height = 48 }}
"#,
        url = judge.base_url()
    );
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// (configuration, category, prompt index) -> (image path, sha256).
type Images = BTreeMap<(String, String, u64), (String, String)>;

/// The manifest's image lines, the last line of a key winning; and the number of image lines.
fn images(run: &Path) -> (Images, usize) {
    let text = std::fs::read_to_string(run.join("manifest.jsonl")).unwrap();
    let mut out = BTreeMap::new();
    let mut lines = 0;
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        if v["event"] == "image" {
            lines += 1;
            out.insert(
                (
                    v["config"].as_str().unwrap().to_string(),
                    v["category"].as_str().unwrap().to_string(),
                    v["index"].as_u64().unwrap(),
                ),
                (
                    v["image"].as_str().unwrap().to_string(),
                    v["sha256"].as_str().unwrap().to_string(),
                ),
            );
        }
    }
    (out, lines)
}

/// The official aggregate, by hand: mean(max(score - 1, 0)) / 4 * 100.
fn by_hand(scores: &[u8]) -> f64 {
    let sum: f64 = scores.iter().map(|&s| f64::from(s.saturating_sub(1))).sum();
    sum / scores.len() as f64 / 4.0 * 100.0
}

#[test]
fn a_local_run_is_scored_reported_resumed_and_gated() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("RareBench");
    benchmark(&data);
    let judge = FakeJudge::start();
    let spec_low = spec(tmp.path(), "run.toml", &judge, "fake-judge");
    let run = tmp.path().join("run");
    let base = |out: &Path, spec: &Path| {
        let mut c = r2f();
        c.arg("rarebench")
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(out)
            .arg("--spec")
            .arg(spec)
            .args(["--device", "cpu"]);
        c
    };

    // Without --local there is no generation yet: a usage error, before anything is made.
    let o = base(&tmp.path().join("never"), &spec_low).output().unwrap();
    assert_eq!(o.status.code(), Some(64), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("broker mode"),
        "{}",
        show(&o)
    );

    // The images, no judge: 3 + 3 plain, 2 + 3 R2F (a prompt has no plan).
    let t = std::time::Instant::now();
    let o = base(&run, &spec_low)
        .args(["--local", "--no-judge"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    eprintln!("11 images in {:.1} s", t.elapsed().as_secs_f64());
    let (imgs, image_lines) = images(&run);
    assert_eq!(imgs.len(), 11, "{imgs:?}");
    assert_eq!(image_lines, 11);
    assert_eq!(judge.requests(), 0);
    assert!(!imgs.contains_key(&("r2f".into(), "single_1property".into(), 2)));
    let shas: std::collections::BTreeSet<&String> = imgs.values().map(|(_, s)| s).collect();
    assert_eq!(shas.len(), 11, "every image differs");

    // The rule: plain scores 5, 4, 3 by prompt; R2F two less.
    let mut want: BTreeMap<(String, String), Vec<u8>> = BTreeMap::new();
    for ((config, category, index), (_, sha)) in &imgs {
        let a = [5u8, 4, 3][*index as usize];
        let score = if config == "plain" { a } else { a - 2 };
        judge.set_score("fake-judge", sha, score);
        want.entry((config.clone(), category.clone()))
            .or_default()
            .push(score);
    }
    // A rate limit with Retry-After, then an answer that does not follow the format.
    judge.script(&[
        Fault::RateLimited(1),
        Fault::Malformed("The image looks good to me, I would give it a four."),
    ]);

    // Judge what is there; R2F is worse by 50 points everywhere: the gate fails (exit 1).
    let o = base(&run, &spec_low)
        .args(["--judge-only", "--compare", "plain", "r2f"])
        .args(["--categories", "single_1property,multi_1and"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("the gate failed"),
        "{}",
        show(&o)
    );
    assert_eq!(
        judge.requests(),
        11 + 2,
        "one request an image, plus the 429 and the re-ask"
    );
    let bodies = judge.request_bodies();
    assert!(bodies.iter().all(|b| b["model"] == "fake-judge"));

    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("avg_scores_fakejudge.json")).unwrap(),
    )
    .unwrap();
    let obj = json.as_object().unwrap();
    assert_eq!(obj.len(), 4, "{json}");
    for ((config, category), scores) in &want {
        let key = format!("{config}/rarebench_{category}_t2i_scores_by_fakejudge");
        let got = obj[&key].as_f64().unwrap();
        assert!(
            (got - by_hand(scores)).abs() < 1e-9,
            "{key}: {got} vs {scores:?}"
        );
    }
    // By hand: plain 5,4,3 -> (4+3+2)/3/4*100 = 75; R2F single (prompts 0 and 1) 3,2 -> (2+1)/2/4*100 = 37.5.
    assert_eq!(
        obj["plain/rarebench_single_1property_t2i_scores_by_fakejudge"],
        json!(75.0)
    );
    assert_eq!(
        obj["r2f/rarebench_single_1property_t2i_scores_by_fakejudge"],
        json!(37.5)
    );

    let md = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(md.contains("FAIL"), "{md}");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("| plain"),
        "{}",
        show(&o)
    );
    // Every image, by its relative path, in a figure with its score.
    let html = std::fs::read_to_string(run.join("report.html")).unwrap();
    let scored: BTreeMap<&String, u8> = imgs
        .iter()
        .map(|((config, _, index), (path, _))| {
            let a = [5u8, 4, 3][*index as usize];
            (path, if config == "plain" { a } else { a - 2 })
        })
        .collect();
    for (path, score) in &scored {
        assert!(run.join(path).is_file());
        let at = html
            .find(&format!("src=\"{path}\""))
            .unwrap_or_else(|| panic!("{path} is not in report.html"));
        let figure = &html[at..at + html[at..].find("</figure>").unwrap()];
        assert!(
            figure.contains(&format!("<span class=\"s\">{score}</span>")),
            "{path}: {figure}"
        );
    }
    assert!(html.contains("FAIL"));

    // A second full run: no new image, no new judge request, the same verdict.
    let mtimes: Vec<_> = imgs
        .values()
        .map(|(p, _)| std::fs::metadata(run.join(p)).unwrap().modified().unwrap())
        .collect();
    let o = base(&run, &spec_low)
        .args(["--local", "--compare", "plain", "r2f"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert_eq!(judge.requests(), 13);
    assert_eq!(images(&run).1, 11);
    let again: Vec<_> = imgs
        .values()
        .map(|(p, _)| std::fs::metadata(run.join(p)).unwrap().modified().unwrap())
        .collect();
    assert_eq!(mtimes, again);

    // A damaged image is made again (and only it).
    let (victim, _) = &imgs[&("plain".into(), "multi_1and".into(), 1)];
    std::fs::write(run.join(victim), b"not a png").unwrap();
    let o = base(&run, &spec_low)
        .args(["--local", "--no-judge"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let (after, lines) = images(&run);
    assert_eq!(lines, 12);
    let bytes = std::fs::read(run.join(victim)).unwrap();
    assert!(bytes.starts_with(b"\x89PNG"));
    assert_eq!(
        sha256_hex(&bytes),
        after[&("plain".into(), "multi_1and".into(), 1)].1
    );

    // Another judge that scores every image the same: B is not worse, the gate passes.
    judge.set_fallback("fake-judge-even", 4);
    let spec_even = spec(tmp.path(), "even.toml", &judge, "fake-judge-even");
    // A damaged image is not judged by a --judge-only run: the run is left unfinished (75).
    let (victim, _) = &after[&("r2f".into(), "multi_1and".into(), 0)];
    std::fs::write(run.join(victim), b"\x89PNG but damaged").unwrap();
    let o = base(&run, &spec_even)
        .args(["--judge-only", "--compare", "plain", "r2f"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(75), "{}", show(&o));
    assert_eq!(judge.requests(), 13 + 10);
    // The same command with --local finishes it: the image made again, then judged.
    let o = base(&run, &spec_even)
        .args(["--local", "--compare", "plain", "r2f"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(judge.requests(), 13 + 11);
    assert_eq!(images(&run).1, 13);
    let even: Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("avg_scores_fakejudgeeven.json")).unwrap(),
    )
    .unwrap();
    assert!(even
        .as_object()
        .unwrap()
        .values()
        .all(|v| v.as_f64() == Some(75.0)));
    // The first judge's file is still there (each judge has its own).
    assert!(run.join("avg_scores_fakejudge.json").is_file());
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}
