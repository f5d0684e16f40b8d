use super::*;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

const TOML: &str = r#"
title = "t"
[judge]
model = "gpt-4o-2024-05-13"
api_key_env = "R2F_RAREBENCH_UNIT_NO_SUCH_VAR"
concurrency = 3
[[configs]]
name = "plain"
model = "sd3"
mode = "plain"
seeds = [0, 1]
precision = "bf16"
params = { steps = 4, width = 64, height = 64 }
[[configs]]
name = "r2f"
model = "sd3"
mode = "r2f"
plans = "llm"
seeds = [0]
"#;

#[test]
fn a_spec_reads_as_toml_or_json_with_its_judge() {
    let dir = tempfile::tempdir().unwrap();
    let spec = RunSpec::read(&write(dir.path(), "s.toml", TOML)).unwrap();
    assert_eq!(spec.configs.len(), 2);
    assert_eq!(spec.configs[1].plans, PlanSource::Llm);
    assert_eq!(spec.judge.concurrency(), 3);
    let json = serde_json::json!({
        "configs": [{"name": "a", "model": "sd3", "mode": "r2fplus", "seeds": [3]}]
    });
    let spec = RunSpec::read(&write(dir.path(), "s.json", &json.to_string())).unwrap();
    assert_eq!(spec.configs[0].mode, JobMode::R2fplus);
    assert_eq!(spec.judge.concurrency(), DEFAULT_CONCURRENCY);
    // The key is read only when the judge is asked, and a missing one is named.
    let s = RunSpec::read(&write(dir.path(), "s.toml", TOML)).unwrap();
    assert!(s
        .judge
        .settings(dir.path(), false)
        .unwrap()
        .api_key
        .is_none());
    let e = s.judge.settings(dir.path(), true).unwrap_err();
    assert!(e.contains("R2F_RAREBENCH_UNIT_NO_SUCH_VAR"), "{e}");
}

#[test]
fn bad_specs_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    for (text, want) in [
        (
            TOML.replace("name = \"r2f\"", "name = \"plain\""),
            "listed twice",
        ),
        (TOML.replace("bf16", "fp8"), "precision"),
        (
            TOML.replace("concurrency = 3", "concurency = 3"),
            "concurency",
        ),
        (TOML.replace("seeds = [0]", "seeds = []"), "no seeds"),
        (
            TOML.replace("name = \"r2f\"", "name = \"../x\""),
            "may hold only",
        ),
        (
            "title = \"x\"\nconfigs = []\n".to_string(),
            "no configurations",
        ),
    ] {
        let e = RunSpec::read(&write(dir.path(), "bad.toml", &text)).unwrap_err();
        assert!(e.contains(want), "{want}: {e}");
    }
    let s: RunSpec = toml::from_str("[judge]\nprompt_file = \"nope.txt\"\n[[configs]]\nname = \"a\"\nmodel = \"m\"\nmode = \"plain\"\nseeds = [0]\n").unwrap();
    assert!(s
        .judge
        .settings(dir.path(), false)
        .unwrap_err()
        .contains("nope.txt"));
}
