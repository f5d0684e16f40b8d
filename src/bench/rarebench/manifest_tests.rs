use super::*;
use crate::bench::rarebench::spec::Category;
use crate::image::ImageFormat;

fn key(config: &str, index: usize, seed: u64) -> SampleKey {
    SampleKey {
        config: config.into(),
        category: Category::Multi1And,
        index,
        seed,
    }
}

fn judgement(score: u8, tokens: u64) -> Judgement {
    Judgement {
        score,
        explanation: "fine".into(),
        answer: format!("### SCORE: {score}\n### EXPLANATION: fine"),
        model: "gpt-4o-2024-05-13".into(),
        requests: 1,
        malformed: 0,
        usage: Usage {
            prompt_tokens: tokens,
            completion_tokens: 0,
            total_tokens: tokens,
        },
    }
}

fn image_entry(k: &SampleKey, sha: &str) -> Entry {
    Entry::Image {
        key: k.clone(),
        prompt: "a furry kettle".into(),
        image: k.image_path(ImageFormat::Png),
        sha256: sha.into(),
        at: "2025-06-01T12:00:00Z".into(),
    }
}

fn judged(k: &SampleKey, sha: &str, judge: &str, score: u8) -> Entry {
    Entry::Judged {
        key: k.clone(),
        sha256: sha.into(),
        judge: judge.into(),
        judgement: judgement(score, 100),
        at: "2025-06-01T12:00:01Z".into(),
    }
}

#[test]
fn lines_are_flat_json_and_read_back() {
    let k = key("r2f-sd3", 7, 42);
    let e = judged(&k, "ab", "gpt-4o@1234abcd", 4);
    let line = serde_json::to_string(&e).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["event"], "judged");
    assert_eq!(v["config"], "r2f-sd3");
    assert_eq!(v["category"], "multi_1and");
    assert_eq!(v["index"], 7);
    assert_eq!(v["seed"], 42);
    assert_eq!(v["score"], 4);
    assert_eq!(v["usage"]["total_tokens"], 100);
    assert_eq!(serde_json::from_str::<Entry>(&line).unwrap(), e);
    let img = image_entry(&k, "ab");
    let back: Entry = serde_json::from_str(&serde_json::to_string(&img).unwrap()).unwrap();
    assert_eq!(back, img);
    assert_eq!(
        k.image_path(ImageFormat::Jpeg),
        "images/r2f-sd3/multi_1and/007_s42.jpg"
    );
}

#[test]
fn the_state_is_the_fold_of_the_lines() {
    let (a, b) = (key("plain", 0, 1), key("plain", 1, 1));
    let j = "gpt-4o@00000000";
    let mut s = RunState::default();
    assert!(s.needs_image(&a) && !s.needs_judgement(&a, j));
    s.apply(image_entry(&a, "s1"));
    assert!(!s.needs_image(&a) && s.needs_judgement(&a, j));
    s.apply(Entry::JudgeFailed {
        key: a.clone(),
        sha256: "s1".into(),
        judge: j.into(),
        kind: "malformed".into(),
        error: "no score".into(),
        requests: 3,
        malformed: 3,
        usage: Usage {
            prompt_tokens: 30,
            completion_tokens: 3,
            total_tokens: 33,
        },
        at: now(),
    });
    assert_eq!(s.samples[&a].judge_failures[j], 1);
    assert!(s.needs_judgement(&a, j));
    s.apply(judged(&a, "s1", j, 5));
    assert!(!s.needs_judgement(&a, j));
    assert!(
        s.needs_judgement(&a, "other@11111111"),
        "judges are kept apart"
    );
    assert!(s.samples[&a].judge_failures.is_empty());
    // A judgement of another image (an old sha256) does not count, but it was billed.
    s.apply(image_entry(&b, "s2"));
    s.apply(judged(&b, "stale", j, 1));
    assert!(s.needs_judgement(&b, j));
    // A new image of `a` drops its judgements.
    s.apply(image_entry(&a, "s3"));
    assert!(s.needs_judgement(&a, j));
    s.apply(judged(&a, "s3", j, 2));
    let scores: Vec<_> = s.scores(j).map(|(k, v)| (k.index, v)).collect();
    assert_eq!(scores, [(0, 2)]);
    let billed = s.billed(j);
    assert_eq!(billed["plain"].total_tokens, 33 + 100 + 100 + 100);
}

#[test]
fn a_manifest_resumes_and_cuts_a_torn_last_line() {
    let dir = tempfile::tempdir().unwrap();
    let (k1, k2) = (key("r2f", 0, 0), key("r2f", 1, 0));
    {
        let (mut m, s) = Manifest::open(dir.path()).unwrap();
        assert_eq!(s, RunState::default());
        let e = store_image(
            dir.path(),
            &k1,
            "a furry kettle",
            &Image {
                bytes: b"\x89PNG\r\n\x1a\nbytes".to_vec(),
                format: ImageFormat::Png,
            },
        )
        .unwrap();
        let Entry::Image { sha256, image, .. } = &e else {
            panic!()
        };
        assert_eq!(image, "images/r2f/multi_1and/000_s0.png");
        assert_eq!(sha256, &sha256_hex(b"\x89PNG\r\n\x1a\nbytes"));
        m.append(&e).unwrap();
        m.append(&judged(&k1, sha256, "j", 3)).unwrap();
    }
    // A crash in the middle of a line.
    let path = dir.path().join(MANIFEST_FILE);
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("{\"event\":\"image\",\"config\":\"r2f\",\"categ");
    std::fs::write(&path, &text).unwrap();
    {
        let (mut m, s) = Manifest::open(dir.path()).unwrap();
        assert!(s.torn_tail);
        assert_eq!(s.lines, 2);
        assert!(!s.needs_image(&k1) && !s.needs_judgement(&k1, "j"));
        assert!(s.needs_image(&k2));
        assert!(s.damaged_images(dir.path()).is_empty());
        m.append(&image_entry(&k2, "s2")).unwrap();
    }
    let (_m, s) = Manifest::open(dir.path()).unwrap();
    assert!(!s.torn_tail);
    assert_eq!(s.lines, 3);
    // k2's file was never written: damaged.
    assert_eq!(s.damaged_images(dir.path()), std::slice::from_ref(&k2));
    std::fs::write(dir.path().join(k1.image_path(ImageFormat::Png)), b"changed").unwrap();
    assert_eq!(s.damaged_images(dir.path()), [k1, k2]);
}

#[test]
fn a_bad_line_before_the_end_is_an_error() {
    let e = RunState::parse("not json\n{}\n").unwrap_err();
    assert!(e.contains("manifest line 1"), "{e}");
    // A complete last line that does not parse is no torn write either.
    let e = RunState::parse("{\"event\":\"nope\"}\n").unwrap_err();
    assert!(e.contains("manifest line 1"), "{e}");
    let s = RunState::parse("\n\n").unwrap();
    assert_eq!(s.lines, 0);
}
