use std::path::Path;

use serde_json::json;

use super::*;
use crate::generate::JobMode;

/// Writes `text` at `rel` under `root`, creating folders.
fn put(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// A folder in the official layout with the quirks of the real files, written here (the
/// prompts are our own).
fn quirky_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // No final newline; a trailing space; a curly apostrophe.
    put(
        root,
        "test/original_prompt/rarebench/rarebench_multi_1and.txt",
        "a furry kettle and two striped lemons\na glass owl and a woolly teapot \nthe owl\u{2019}s feathered umbrella",
    );
    put(
        root,
        "test/r2f_prompt/rarebench/rarebench_multi_1and_gpt4.txt",
        &json!({
            // Unsorted levels, as a list.
            "a furry kettle and two striped lemons": {
                "visual_detail_level": ["4", "2"],
                "r2f_prompt": [["a furry object and two striped fruits",
                                "a furry object and two striped lemons",
                                "a furry kettle and two striped lemons"]]
            },
            // The key lacks the line's trailing space.
            "a glass owl and a woolly teapot": {
                "visual_detail_level": "3",
                "r2f_prompt": [["a glass bird and a woolly teapot", "a glass owl and a woolly teapot"]]
            },
            // A length-1 plan: no rare concept.
            "the owl\u{2019}s feathered umbrella": {
                "visual_detail_level": "0",
                "r2f_prompt": [["the owl\u{2019}s feathered umbrella"]]
            },
            "a prompt of no line": {"visual_detail_level": "1", "r2f_prompt": [["x"]]}
        })
        .to_string(),
    );
    // Not every prompt has an R2F+ plan.
    put(
        root,
        "test/r2fplus_prompt/rarebench/rarebench_multi_1and_gpt4o.txt",
        &json!({
            "a glass owl and a woolly teapot": {
                "original_prompt": "a glass owl and a woolly teapot",
                "base_prompt": "#1 and #2",
                "objects": {
                    "#1": {"prompt": "#1", "object": "a glass owl", "r2f": ["a glass bird"],
                           "visual_detail_levels": [3], "bbox": [0.1, 0.2, 0.45, 0.8]},
                    "#2": {"prompt": "#2", "object": "a woolly teapot", "r2f": [],
                           "visual_detail_levels": [], "bbox": [0.55, 0.3, 0.9, 0.8]}
                }
            }
        })
        .to_string(),
    );
    put(
        root,
        "test/original_prompt/rarebench/rarebench_single_1property.txt",
        "A feathered cactus\r\nA transparent tiger\n",
    );
    dir
}

#[test]
fn reads_the_official_layout_with_its_quirks() {
    let dir = quirky_folder();
    let d = Dataset::load(
        dir.path(),
        &[Category::Multi1And, Category::Single1Property],
    )
    .unwrap();
    assert_eq!(d.len(), 5);
    let m = d.category(Category::Multi1And).unwrap();
    assert_eq!(m.prompts.len(), 3);
    assert_eq!(m.prompts[1].line, "a glass owl and a woolly teapot ");
    assert_eq!(m.prompts[1].prompt(), "a glass owl and a woolly teapot");
    assert_eq!(m.prompts[2].prompt(), "the owl\u{2019}s feathered umbrella");
    assert_eq!(
        m.prompts.iter().map(|p| p.index).collect::<Vec<_>>(),
        [0, 1, 2]
    );

    let p0 = m.prompts[0].r2f.as_ref().unwrap();
    assert_eq!(p0.levels, [4, 2], "levels stay in file order");
    assert_eq!(p0.prompts.len(), 3);
    let p1 = m.prompts[1]
        .r2f
        .as_ref()
        .expect("matched up to the trailing space");
    assert_eq!(p1.levels, [3]);
    let p2 = m.prompts[2].r2f.as_ref().unwrap();
    assert_eq!(p2.prompts, ["the owl\u{2019}s feathered umbrella"]);

    assert!(m.prompts[0].r2fplus.is_none());
    let rp = m.prompts[1].r2fplus.as_ref().unwrap();
    assert_eq!(rp.objects.len(), 2);
    assert!(m.prompts[2].r2fplus.is_none());
    assert_eq!(m.plan_counts(), (3, 1));
    assert_eq!(m.unmatched_plans, ["a prompt of no line"]);
    assert!(m.r2f_file.is_some() && m.r2fplus_file.is_some());

    assert!(matches!(
        m.prompts[1].plan_for(JobMode::R2fplus),
        Some(Plan::Regions(_))
    ));
    assert!(matches!(
        m.prompts[1].plan_for(JobMode::R2f),
        Some(Plan::R2f(_))
    ));
    assert_eq!(m.prompts[1].plan_for(JobMode::Plain), None);

    // CRLF and a final newline; no plan files at all.
    let s = d.category(Category::Single1Property).unwrap();
    assert_eq!(
        s.prompts
            .iter()
            .map(|p| p.line.as_str())
            .collect::<Vec<_>>(),
        ["A feathered cactus", "A transparent tiger"]
    );
    assert!(s.r2f_file.is_none() && s.r2fplus_file.is_none());
    assert_eq!(s.plan_counts(), (0, 0));
}

#[test]
fn file_names_follow_the_official_layout() {
    let root = Path::new("/b");
    assert_eq!(
        prompt_file(root, Category::Single3Texture),
        Path::new("/b/test/original_prompt/rarebench/rarebench_single_3texture.txt")
    );
    assert_eq!(
        r2f_plan_file(root, Category::Multi2Relation),
        Path::new("/b/test/r2f_prompt/rarebench/rarebench_multi_2relation_gpt4.txt")
    );
    assert_eq!(
        r2fplus_plan_file(root, Category::Multi3Complex).unwrap(),
        Path::new("/b/test/r2fplus_prompt/rarebench/rarebench_multi_3complex_gpt4o.txt")
    );
    assert_eq!(r2fplus_plan_file(root, Category::Single4Action), None);
}

#[test]
fn bad_folders_and_files_are_errors_that_say_where() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let e = Dataset::load(&root.join("nope"), &[Category::Multi1And]).unwrap_err();
    assert!(e.contains("does not exist"), "{e}");
    let e = Dataset::load(root, &[Category::Multi1And]).unwrap_err();
    assert!(e.contains("rarebench_multi_1and.txt"), "{e}");

    put(
        root,
        "test/original_prompt/rarebench/rarebench_single_2shape.txt",
        "A cube apple\n\nA round book",
    );
    let e = Dataset::load(root, &[Category::Single2Shape]).unwrap_err();
    assert!(e.contains("line 2 is empty"), "{e}");

    put(
        root,
        "test/original_prompt/rarebench/rarebench_single_2shape.txt",
        "A cube apple",
    );
    put(
        root,
        "test/r2f_prompt/rarebench/rarebench_single_2shape_gpt4.txt",
        "not json",
    );
    let e = Dataset::load(root, &[Category::Single2Shape]).unwrap_err();
    assert!(e.contains("is not JSON"), "{e}");

    put(
        root,
        "test/r2f_prompt/rarebench/rarebench_single_2shape_gpt4.txt",
        r#"{"A cube apple": {"visual_detail_level": "9", "r2f_prompt": [["a cube fruit", "A cube apple"]]}}"#,
    );
    let e = Dataset::load(root, &[Category::Single2Shape]).unwrap_err();
    assert!(
        e.contains("`A cube apple` is not a valid R2F plan") && e.contains("outside 0..5"),
        "{e}"
    );

    // Two keys equal to the line up to spaces, neither exactly.
    put(
        root,
        "test/original_prompt/rarebench/rarebench_single_2shape.txt",
        "A cube apple ",
    );
    put(
        root,
        "test/r2f_prompt/rarebench/rarebench_single_2shape_gpt4.txt",
        r#"{"A cube apple": {"visual_detail_level": "1", "r2f_prompt": [["A cube apple"]]},
            " A cube apple": {"visual_detail_level": "1", "r2f_prompt": [["A cube apple"]]}}"#,
    );
    let e = Dataset::load(root, &[Category::Single2Shape]).unwrap_err();
    assert!(e.contains("several plans match"), "{e}");

    // An R2F+ plan in the R2F file.
    put(
        root,
        "test/r2f_prompt/rarebench/rarebench_single_2shape_gpt4.txt",
        r##"{"A cube apple ": {"original_prompt": "A cube apple", "base_prompt": "#1",
             "objects": {"#1": {"prompt": "#1", "object": "a cube apple", "r2f": [],
             "visual_detail_levels": [], "bbox": [0, 0, 1, 1]}}}}"##,
    );
    let e = Dataset::load(root, &[Category::Single2Shape]).unwrap_err();
    assert!(e.contains("is not an R2F plan"), "{e}");

    std::fs::write(
        root.join("test/original_prompt/rarebench/rarebench_single_2shape.txt"),
        b"A cube \xff apple",
    )
    .unwrap();
    let e = Dataset::load(root, &[Category::Single2Shape]).unwrap_err();
    assert!(e.contains("not UTF-8"), "{e}");
}

#[test]
fn a_byte_order_mark_is_not_part_of_the_first_prompt() {
    let lines = parse_prompt_lines("a\nb", "x").unwrap();
    assert_eq!(lines, ["a", "b"]);
    let dir = tempfile::tempdir().unwrap();
    put(
        dir.path(),
        "test/original_prompt/rarebench/rarebench_single_4action.txt",
        "\u{feff}A cat juggling",
    );
    let d = Dataset::load(dir.path(), &[Category::Single4Action]).unwrap();
    assert_eq!(d.categories[0].prompts[0].line, "A cat juggling");
}

/// The real benchmark, where a copy is at hand (`R2F_RAREBENCH=DIR`; never in CI): every prompt
/// of every category reads, and every precomputed plan converts.
#[test]
#[ignore = "needs the RareBench files (R2F_RAREBENCH=DIR)"]
fn the_real_benchmark_reads_whole() {
    let Ok(dir) = std::env::var("R2F_RAREBENCH") else {
        eprintln!("R2F_RAREBENCH is not set: skipped");
        return;
    };
    let d = Dataset::load(Path::new(&dir), Category::ALL).unwrap();
    assert_eq!(d.len(), 320);
    let mut r2fplus = 0;
    for c in &d.categories {
        let (r, p) = c.plan_counts();
        assert_eq!(r, 40, "{}", c.category);
        assert!(c.unmatched_plans.is_empty(), "{:?}", c.unmatched_plans);
        r2fplus += p;
    }
    assert_eq!(r2fplus, 116);
}
