//! Unit tests of `mod.rs` (kept apart so that the module reads top to bottom).

use super::*;
use serde_json::json;

#[test]
fn single_object_shape_with_string_level() {
    let v = json!({"visual_detail_level": "4",
                   "r2f_prompt": [["A hairy sea animal", "A hairy octopus"]]});
    let Plan::R2f(p) = Plan::from_json(&v).unwrap() else {
        panic!("an R2F plan")
    };
    assert_eq!(p.levels, vec![4]);
    assert_eq!(p.prompts.len(), 2);
    assert_eq!(p.to_official_json(), v);
}

#[test]
fn multi_object_shape_with_level_list_keeps_llm_order() {
    let v = json!({"visual_detail_level": ["5", "3"], "r2f_prompt": [[
        "a hairy fish and two spotted shellfish",
        "a hairy shark and two spotted shellfish",
        "a hairy shark and two spotted clams"]]});
    let Plan::R2f(p) = Plan::from_json(&v).unwrap() else {
        panic!()
    };
    assert_eq!(p.levels, vec![5, 3]);
    assert_eq!(p.prompts[2], "a hairy shark and two spotted clams");
}

#[test]
fn single_prompt_plans_are_accepted_whatever_the_level() {
    for level in ["0", "1"] {
        let v = json!({"visual_detail_level": level, "r2f_prompt": [["An oval shaped table"]]});
        assert!(Plan::from_json(&v).is_ok());
    }
}

#[test]
fn invalid_r2f_plans_fail_with_the_reason() {
    let cases = [
        (json!({"r2f_prompt": [["a", "b"]]}), "visual_detail_level"),
        (json!({"visual_detail_level": "3"}), "r2f_prompt"),
        (
            json!({"visual_detail_level": "7", "r2f_prompt": [["a", "b"]]}),
            "outside",
        ),
        (
            json!({"visual_detail_level": ["3", "4"], "r2f_prompt": [["a", "b"]]}),
            "need 1",
        ),
        (
            json!({"visual_detail_level": "x", "r2f_prompt": [["a", "b"]]}),
            "not a number",
        ),
        (
            json!({"visual_detail_level": "3", "r2f_prompt": [["a", ""]]}),
            "empty",
        ),
        (
            json!({"visual_detail_level": "3", "r2f_prompt": [[1, 2]]}),
            "not a string",
        ),
        (json!(["not", "an", "object"]), "JSON object"),
    ];
    for (v, needle) in cases {
        let e = Plan::from_json(&v).unwrap_err();
        assert!(e.contains(needle), "{v}: {e} should mention {needle}");
    }
}

fn region_plan() -> Value {
    json!({"original_prompt": "a hairy shark and a spotted clam", "base_prompt": "#1 and #2",
           "objects": {
             "#1": {"prompt": "#1", "object": "a hairy shark", "r2f": ["a hairy animal"],
                    "visual_detail_levels": [5], "bbox": [0.1, 0.2, 0.4, 0.6]},
             "#2": {"prompt": "a photo of #2", "object": "a spotted clam", "r2f": [],
                    "visual_detail_levels": [], "bbox": [0.6, 0.4, 0.8, 0.6]}}})
}

#[test]
fn region_plan_validates_like_the_official_loader() {
    assert!(matches!(
        Plan::from_json(&region_plan()).unwrap(),
        Plan::Regions(_)
    ));
    let mut bad = region_plan();
    bad["objects"]["#1"]["bbox"] = json!([0.5, 0.75, 0.4, 0.3]);
    assert!(Plan::from_json(&bad).unwrap_err().contains("bbox"));
    let mut bad = region_plan();
    bad["objects"]["#1"]["visual_detail_levels"] = json!([5, 3]);
    assert!(Plan::from_json(&bad).unwrap_err().contains("levels"));
    let mut bad = region_plan();
    bad["base_prompt"] = json!("#1 only");
    assert!(Plan::from_json(&bad).unwrap_err().contains("placeholders"));
    let mut bad = region_plan();
    bad["objects"]["#2"]["prompt"] = json!("#1 and #2");
    assert!(Plan::from_json(&bad).unwrap_err().contains("exactly one"));
}

fn limits() -> PlanLimits {
    PlanLimits {
        max_prompts: 16,
        max_prompt_chars: 2000,
        max_objects: 8,
    }
}

fn r2f_plan(prompts: usize) -> Plan {
    let levels = vec!["3"; prompts - 1];
    let list: Vec<String> = (0..prompts).map(|i| format!("prompt {i}")).collect();
    let v = json!({"visual_detail_level": levels, "r2f_prompt": [list]});
    Plan::from_json(&v).unwrap()
}

/// A valid R2F+ plan with `objects` objects, each with `r2f` frequent prompts.
fn regions(objects: usize, r2f: usize) -> RegionPlan {
    let keys: Vec<String> = (1..=objects).map(|n| format!("#{n}")).collect();
    let plan = RegionPlan {
        original_prompt: "a hairy shark".into(),
        base_prompt: keys.join(" and "),
        objects: keys
            .iter()
            .map(|k| {
                let o = RegionObject {
                    prompt: format!("a photo of {k}"),
                    object: "a hairy shark".into(),
                    r2f: vec!["a hairy animal".into(); r2f],
                    visual_detail_levels: vec![3; r2f],
                    bbox: [0.1, 0.1, 0.9, 0.9],
                };
                (k.clone(), o)
            })
            .collect(),
    };
    plan.validate().unwrap();
    plan
}

#[test]
fn check_limits_max_plan_prompts_for_r2f_plans() {
    assert_eq!(r2f_plan(16).check_limits(&limits()), Ok(()));
    assert_eq!(
        r2f_plan(17).check_limits(&limits()),
        Err("plan has 17 prompts, over the limit of 16 (max_plan_prompts)".into())
    );
    // A single-prompt plan may carry any number of levels: they count too.
    let at = Plan::R2f(R2fPlan {
        prompts: vec!["a".into()],
        levels: vec![0; 16],
    });
    assert_eq!(at.check_limits(&limits()), Ok(()));
    let over = Plan::R2f(R2fPlan {
        prompts: vec!["a".into()],
        levels: vec![0; 17],
    });
    assert!(over
        .check_limits(&limits())
        .unwrap_err()
        .contains("17 visual detail levels, over the limit of 16 (max_plan_prompts)"));
}

#[test]
fn check_limits_max_plan_prompt_chars_for_r2f_plans() {
    // Characters, not bytes: 'é' is 2 bytes.
    let plan = |n: usize| {
        Plan::R2f(R2fPlan {
            prompts: vec!["a".into(), "é".repeat(n), "b".into()],
            levels: vec![3, 4],
        })
    };
    assert_eq!(plan(2000).check_limits(&limits()), Ok(()));
    assert_eq!(
        plan(2001).check_limits(&limits()),
        Err(
            "plan prompt 1 has 2001 characters, over the limit of 2000 (max_plan_prompt_chars)"
                .into()
        )
    );
}

#[test]
fn check_limits_max_plan_objects() {
    assert_eq!(Plan::Regions(regions(8, 1)).check_limits(&limits()), Ok(()));
    assert_eq!(
        Plan::Regions(regions(9, 1)).check_limits(&limits()),
        Err("plan has 9 objects, over the limit of 8 (max_plan_objects)".into())
    );
}

#[test]
fn check_limits_r2f_list_of_an_object_counts_against_max_plan_prompts() {
    assert_eq!(
        Plan::Regions(regions(2, 16)).check_limits(&limits()),
        Ok(())
    );
    assert_eq!(
        Plan::Regions(regions(2, 17)).check_limits(&limits()),
        Err("plan object #1 has 17 r2f prompts, over the limit of 16 (max_plan_prompts)".into())
    );
}

#[test]
fn check_limits_every_string_of_an_r2fplus_plan_counts_against_max_plan_prompt_chars() {
    type Set = fn(&mut RegionPlan, String);
    let fields: [(&str, Set); 5] = [
        ("plan original_prompt", |p, s| p.original_prompt = s),
        ("plan base_prompt", |p, s| {
            p.base_prompt = format!("#1 and #2 {s}")
        }),
        ("plan object #2 prompt", |p, s| {
            p.objects.get_mut("#2").unwrap().prompt = format!("#2 {s}")
        }),
        ("plan object #1 name", |p, s| {
            p.objects.get_mut("#1").unwrap().object = s
        }),
        ("plan object #2 r2f prompt 1", |p, s| {
            p.objects.get_mut("#2").unwrap().r2f[1] = s
        }),
    ];
    for (what, set) in fields {
        for (n, ok) in [(2000, true), (2001, false)] {
            let mut plan = regions(2, 3);
            set(&mut plan, String::new());
            let fixed = match what {
                "plan base_prompt" => plan.base_prompt.chars().count(),
                "plan object #2 prompt" => plan.objects["#2"].prompt.chars().count(),
                _ => 0,
            };
            set(&mut plan, "ß".repeat(n - fixed));
            plan.validate().unwrap();
            let result = Plan::Regions(plan).check_limits(&limits());
            if ok {
                assert_eq!(result, Ok(()), "{what} at the limit");
            } else {
                assert_eq!(
                    result,
                    Err(format!(
                        "{what} has 2001 characters, over the limit of 2000 (max_plan_prompt_chars)"
                    ))
                );
            }
        }
    }
}
