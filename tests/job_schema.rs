//! The job schema and the validator agree: jobs generated from the schema's own constraints
//! (each field absent, valid at and inside its bounds, or breaking one constraint) are judged
//! by an independent JSON Schema validator (the `jsonschema` crate) and by r2f's validator, and
//! the two verdicts must match, both ways, on every case — except where a job breaks a rule the
//! schema says it cannot state (its description lists them); there the validator must reject.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

use r2f::job::schema::Document;
use r2f::job::{validate_message, Limits};

const CASES: usize = 12_000;

fn limits() -> Limits {
    Limits {
        max_prompt_chars: 40,
        max_steps: 60,
        max_pixels: 256 * 256,
        max_images_per_job: 3,
        // The message size is a rule the schema cannot state: out of the way here.
        max_message_bytes: 1 << 20,
        max_plan_prompts: 4,
        max_plan_prompt_chars: 30,
        max_plan_objects: 3,
    }
}

fn models() -> Vec<String> {
    vec!["sd3".into(), "sdxl".into()]
}

/// Characters for random text: letters, digits, punctuation, non-ASCII letters and every kind
/// of white space (Rust's and ECMA-262's, which differ at U+0085 and U+FEFF).
const CHARS: &[char] = &[
    'a', 'b', 'z', 'A', 'Z', '0', '9', '-', '_', '.', ':', '=', '/', '#', ' ', '\t', '\n', '\r',
    '\u{0B}', '\u{0C}', '\u{85}', '\u{A0}', '\u{2003}', '\u{3000}', '\u{FEFF}', 'é', 'ß', '猫',
    '🦀', '"', '\\', '+',
];
const WHITE: &[char] = &[
    ' ', '\t', '\n', '\r', '\u{0B}', '\u{0C}', '\u{85}', '\u{A0}', '\u{2003}', '\u{3000}',
];

struct Gen {
    rng: StdRng,
    l: Limits,
    /// The chance that a field is given a value that breaks its schema (set per case: none for
    /// some jobs, a few fields for others).
    bad: f64,
}

/// A generated job, and the rules it breaks that the schema cannot state (each as a part of
/// the validator's message for it).
struct Case {
    job: Value,
    cross_field: Vec<&'static str>,
}

impl Gen {
    fn chance(&mut self, p: f64) -> bool {
        self.rng.random_bool(p)
    }

    /// Whether this field breaks its schema.
    fn broken(&mut self) -> bool {
        let p = self.bad;
        self.chance(p)
    }

    fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.rng.random_range(0..xs.len())].clone()
    }

    fn text(&mut self, len: usize, alphabet: &[char]) -> String {
        (0..len).map(|_| self.pick(alphabet)).collect()
    }

    /// A string that is not blank, `min..=max` characters long.
    fn prompt(&mut self, min: usize, max: usize) -> String {
        let len = self.rng.random_range(min.max(1)..=max);
        let mut s: Vec<char> = self.text(len, CHARS).chars().collect();
        let at = self.rng.random_range(0..s.len());
        s[at] = self.pick(&['q', '猫', '🦀', '\u{FEFF}']);
        s.into_iter().collect()
    }

    fn wrong_type(&mut self) -> Value {
        self.pick(&[
            json!(true),
            json!([1]),
            json!({"a": 1}),
            json!("7"),
            json!(3.5),
        ])
    }

    /// An integer field with bounds [min, max] (and a multiple): absent, null, inside, at a
    /// bound, a whole number written as a float; or, broken, just past a bound, not a
    /// multiple, with a fraction, of another type.
    fn int(&mut self, min: i64, max: i64, multiple: i64) -> Option<Value> {
        let valid = |g: &mut Gen| {
            let k = g
                .rng
                .random_range(min.div_euclid(multiple)..=max.div_euclid(multiple));
            (k * multiple).clamp(min, max)
        };
        if self.broken() {
            return Some(match self.rng.random_range(0..5) {
                0 => json!(min.saturating_sub(multiple)),
                1 => json!(max.saturating_add(multiple)),
                2 if multiple > 1 => json!(valid(self) + 1),
                2 | 3 => json!(valid(self) as f64 + 0.5),
                _ => self.wrong_type(),
            });
        }
        Some(match self.rng.random_range(0..7) {
            0 => return None,
            1 => Value::Null,
            2 | 3 => json!(valid(self)),
            4 => json!(self.pick(&[min, max])),
            _ => json!(valid(self) as f64),
        })
    }

    fn num(&mut self, min: f64, max: f64) -> Option<Value> {
        if self.broken() {
            return Some(match self.rng.random_range(0..3) {
                0 => json!(min - 0.5),
                1 => json!(max + 0.5),
                _ => self.wrong_type(),
            });
        }
        Some(match self.rng.random_range(0..6) {
            0 => return None,
            1 => Value::Null,
            2..=4 => json!(self.rng.random_range(min..=max)),
            _ => json!(self.pick(&[min, max])),
        })
    }

    fn name(&mut self, names: &[&str]) -> Option<Value> {
        if self.broken() {
            return Some(match self.rng.random_range(0..2) {
                0 => json!(self.pick(&["sideways", "", "PLAIN", "jpg ", "dpm"])),
                _ => json!(3),
            });
        }
        Some(match self.rng.random_range(0..6) {
            0 => return None,
            1 => Value::Null,
            _ => json!(self.pick(names)),
        })
    }

    fn id(&mut self) -> Value {
        if self.broken() {
            return match self.rng.random_range(0..5) {
                0 => json!(""),
                1 => json!(self.pick(&[".", ".."])),
                2 => json!("x".repeat(129)),
                3 => json!(self.pick(&["a/b", "a b", "é"])),
                _ => json!(7),
            };
        }
        match self.rng.random_range(0..6) {
            0 => json!("x".repeat(128)),
            1 => json!(self.pick(&["...", ".a", "..b", "a.b:c_d-e"])),
            _ => {
                // Random ids from the id alphabet; `.` and `..` come out now and then.
                let n = self.rng.random_range(1..20);
                json!(self.text(n, &['a', 'Z', '0', '-', '_', '.', ':']))
            }
        }
    }

    fn prompt_field(&mut self) -> Option<Value> {
        let max = self.l.max_prompt_chars;
        if self.broken() {
            return match self.rng.random_range(0..5) {
                0 => None,
                1 => {
                    let n = self.rng.random_range(1..5);
                    Some(json!(self.text(n, WHITE)))
                }
                2 => Some(json!("")),
                3 => Some(json!(self.prompt(max + 1, max + 3))),
                _ => Some(json!(1)),
            };
        }
        Some(match self.rng.random_range(0..4) {
            0 => json!(self.prompt(max, max)),
            _ => json!(self.prompt(1, max)),
        })
    }

    fn plan_prompt(&mut self) -> Value {
        let max = self.l.max_plan_prompt_chars;
        if self.broken() {
            return match self.rng.random_range(0..3) {
                0 => json!(self.text(2, WHITE)),
                1 => json!(self.prompt(max + 1, max + 2)),
                _ => json!(5),
            };
        }
        json!(self.prompt(1, max))
    }

    /// An R2F plan in one of the official shapes (or one that breaks it). The flag is true
    /// when its levels do not match its prompts (a rule across fields).
    fn r2f_plan(&mut self) -> (Value, bool) {
        let most = self.l.max_plan_prompts + usize::from(self.broken());
        let n = self.rng.random_range(1..=most);
        let prompts: Vec<Value> = (0..n).map(|_| self.plan_prompt()).collect();
        let want = n.saturating_sub(1);
        let levels_n = if self.chance(0.9) {
            want
        } else {
            self.rng.random_range(0..=self.l.max_plan_prompts)
        };
        let mut levels: Vec<u32> = (0..levels_n)
            .map(|_| self.rng.random_range(0..=5))
            .collect();
        if self.broken() && !levels.is_empty() {
            levels[0] = self.pick(&[6, 9]);
        }
        let digits = |l: &[u32]| l.iter().map(|l| l.to_string()).collect::<String>();
        let bad_shape = self.broken();
        let level = match self.rng.random_range(0..6) {
            0 => json!(digits(&levels)),
            1 if levels.len() == 1 => json!(levels[0]),
            1 => json!(levels.iter().map(|l| json!(*l as f64)).collect::<Vec<_>>()),
            2 => json!(levels
                .iter()
                .map(|l| json!(format!(" +0{l} ")))
                .collect::<Vec<_>>()),
            3 => json!(format!(" {} ", digits(&levels))),
            4 if bad_shape => json!("x"),
            _ => json!(levels),
        };
        let r2f_prompt = match self.rng.random_range(0..6) {
            0 => json!(prompts),
            1 if bad_shape => json!([prompts, ["extra"]]),
            2 if bad_shape => json!([[]]),
            _ => json!([prompts]),
        };
        let mismatch = n > 1 && levels_n != want;
        let mut plan = json!({"visual_detail_level": level, "r2f_prompt": r2f_prompt});
        if bad_shape && self.chance(0.3) {
            plan.as_object_mut().unwrap().remove("r2f_prompt");
        }
        (plan, mismatch)
    }

    /// An R2F+ plan (or one that breaks it); the flag as for [`Gen::r2f_plan`].
    fn region_plan(&mut self) -> (Value, bool) {
        let most = self.l.max_plan_objects + usize::from(self.broken());
        let n = self.rng.random_range(1..=most);
        let keys: Vec<String> = (1..=n).map(|i| format!("#{i}")).collect();
        let mut consistent = true;
        let mut objects = Map::new();
        for key in &keys {
            let r2f_n = self.rng.random_range(0..=self.l.max_plan_prompts);
            let mut levels: Vec<Value> = (0..r2f_n).map(|i| json!((i as u64).min(5))).collect();
            if self.chance(0.1) {
                levels.push(json!(5));
                consistent = false;
            }
            if self.chance(0.05) && levels.len() >= 2 {
                levels.reverse();
                consistent &= levels.windows(2).all(|w| w[0].as_u64() <= w[1].as_u64());
            }
            if self.broken() {
                levels.push(json!("3"));
            }
            let mut bbox = vec![json!(0.1), json!(0.2), json!(0.6), json!(0.9)];
            if self.broken() {
                if self.chance(0.5) {
                    bbox[0] = json!(1.5);
                } else {
                    bbox.pop();
                }
            }
            match self.rng.random_range(0..12) {
                0 => {
                    bbox[0] = json!(0.8);
                    consistent = false;
                }
                1 => bbox[1] = json!(0),
                _ => {}
            }
            let prompt = if self.chance(0.95) {
                format!("{key} in a hat")
            } else {
                consistent = false;
                "no key".into()
            };
            let object = self.prompt(1, 10);
            let r2f: Vec<Value> = (0..r2f_n).map(|_| json!(self.prompt(1, 10))).collect();
            objects.insert(
                key.clone(),
                json!({
                    "prompt": prompt,
                    "object": object,
                    "r2f": r2f,
                    "visual_detail_levels": levels,
                    "bbox": bbox,
                }),
            );
        }
        let base = if n > 1 && self.chance(0.05) {
            consistent = false;
            "#1".to_string()
        } else {
            keys.join(" and ")
        };
        let mut plan = json!({"original_prompt": "o", "base_prompt": base, "objects": objects});
        if self.broken() {
            match self.rng.random_range(0..3) {
                0 => {
                    plan.as_object_mut().unwrap().remove("base_prompt");
                }
                1 => plan["objects"] = json!({}),
                _ => plan["objects"]["#1"] = json!(["#1 x", "x", [], [], [0, 0, 1, 1]]),
            }
        }
        (plan, !consistent)
    }

    fn case(&mut self) -> Case {
        // A third of the jobs break nothing on purpose, the others a few fields.
        self.bad = [0.0, 0.0, 0.02, 0.05, 0.1, 0.3][self.rng.random_range(0..6)];
        let mut job = Map::new();
        if !(self.broken() && self.chance(0.3)) {
            let id = self.id();
            job.insert("id".into(), id);
        }
        if let Some(p) = self.prompt_field() {
            job.insert("prompt".into(), p);
        }
        if let Some(m) = self.name(&["sd3", "sdxl"]) {
            job.insert("model".into(), m);
        }
        if self.broken() {
            job.insert("model".into(), json!("sd9"));
        }
        if let Some(m) = self.name(&["r2f", "r2fplus", "plain"]) {
            job.insert("mode".into(), m);
        }
        let l = limits();
        let max_steps = l.max_steps as i64;
        let mut params = Map::new();
        let fields: Vec<(&str, Option<Value>)> = vec![
            ("steps", self.int(1, max_steps, 1)),
            ("width", self.int(16, 8192, 16)),
            ("height", self.int(16, 8192, 16)),
            ("seed", self.int(-1000, 1000, 1)),
            ("num_images", self.int(1, l.max_images_per_job as i64, 1)),
            ("guidance", self.num(0.0, 100.0)),
            ("bbox_guidance_steps", self.int(0, max_steps, 1)),
            ("latent_fusion_steps", self.int(0, max_steps, 1)),
            ("bbox_guidance_iterations", self.int(0, 20, 1)),
            ("bbox_loss_scale", self.num(0.0, 1e6)),
            ("schedule", self.name(&["faithful", "clean"])),
            (
                "scheduler",
                self.name(&["euler", "dpm++2m-karras", "euler-discrete"]),
            ),
            (
                "stop_step_map",
                self.name(&["paper", "head", "sd3", "sdxl"]),
            ),
            ("region_mask", self.name(&["ellipse", "box"])),
        ];
        for (k, v) in fields {
            if let Some(mut v) = v {
                // Small sizes most of the time: the pixel limit is met as often as broken.
                if matches!(k, "width" | "height") && v.is_i64() && self.chance(0.7) {
                    v = json!(16 * self.rng.random_range(1..=24));
                }
                params.insert(k.into(), v);
            }
        }
        if self.chance(0.2) {
            params.insert("bbox_guidance_recompute".into(), json!(self.chance(0.5)));
        }
        if self.chance(0.3) {
            let n = self.l.max_prompt_chars + usize::from(self.broken());
            params.insert("negative_prompt".into(), json!(self.text(n, CHARS)));
        }
        if self.broken() {
            let v = self.wrong_type();
            job.insert("params".into(), v);
        } else if self.chance(0.9) {
            job.insert("params".into(), Value::Object(params));
        }
        if let Some(p) = self.int(0, 255, 1) {
            job.insert("priority".into(), p);
        }
        if self.chance(0.5) {
            let mut out = Map::new();
            if let Some(f) = self.name(&["png", "jpeg", "webp", "jpg"]) {
                out.insert("format".into(), f);
            }
            if let Some(q) = self.int(1, 100, 1) {
                out.insert("quality".into(), q);
            }
            if self.chance(0.5) {
                let prefix = if self.broken() {
                    self.pick(&["..", "a/../b", "a//b", "a b", "./x"])
                } else {
                    self.pick(&["", "/", "a/b", "/a/b/", "x/...y", "tenant=1/run.2"])
                };
                out.insert("prefix".into(), json!(prefix));
            }
            if self.chance(0.3) {
                let events = if self.broken() {
                    self.pick(&[json!([]), json!(["sideways"])])
                } else {
                    self.pick(&[
                        Value::Null,
                        json!(["succeeded", "failed"]),
                        json!(["started", "progress"]),
                    ])
                };
                out.insert(
                    "webhook".into(),
                    json!({"url": "https://hooks.example.com/r2f", "events": events}),
                );
            }
            job.insert("output".into(), Value::Object(out));
        }
        let mut cross_field = Vec::new();
        match self.rng.random_range(0..10) {
            0..=2 => {}
            3 if self.broken() => {
                let v = self.wrong_type();
                job.insert("plan".into(), v);
            }
            3 => {
                job.insert("plan".into(), Value::Null);
            }
            4..=5 => {
                let (plan, mismatch) = self.r2f_plan();
                job.insert("plan".into(), plan);
                if mismatch {
                    cross_field.push("visual detail levels");
                }
            }
            _ => {
                let (plan, inconsistent) = self.region_plan();
                job.insert("plan".into(), plan);
                if inconsistent {
                    cross_field.push("invalid plan");
                }
            }
        }
        let job = Value::Object(job);
        cross_field.extend(sizes_and_faithful(&job));
        Case { job, cross_field }
    }
}

/// The rules across fields on the job's parameters (meaningful only where the schema accepts the
/// fields themselves): the pixel limit, and what faithful R2F+ cannot run.
fn sizes_and_faithful(job: &Value) -> Vec<&'static str> {
    let mut out = Vec::new();
    let p = &job["params"];
    let int = |k: &str| p[k].as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64);
    let (w, h) = (int("width"), int("height"));
    if let (Some(w), Some(h)) = (w, h) {
        if w * h > limits().max_pixels {
            out.push("max_pixels");
        }
    }
    let faithful_plus = job["mode"] == "r2fplus" && p["schedule"] != "clean";
    if faithful_plus {
        if let (Some(w), Some(h)) = (w, h) {
            if w != h {
                out.push("square image");
            }
        }
        if p["guidance"].as_f64().is_some_and(|g| g <= 1.0) {
            out.push("guidance above 1");
        }
        let head = matches!(p["stop_step_map"].as_str(), Some("head" | "sdxl"));
        let min = if head { 31 } else { 41 };
        if int("steps").is_some_and(|s| s < min) {
            out.push("stop-step map");
        }
    }
    out
}

#[test]
fn schema_and_validator_agree_both_ways_on_generated_jobs() {
    let l = limits();
    let schema = Document::Job.schema(&l, &models());
    let checker = jsonschema::validator_for(&schema).expect("the job schema is a valid schema");
    let mut g = Gen {
        rng: StdRng::seed_from_u64(20261207),
        l: limits(),
        bad: 0.0,
    };
    let (mut both_accept, mut both_reject, mut cross) = (0, 0, 0);
    for _ in 0..CASES {
        let case = g.case();
        let body = serde_json::to_vec(&case.job).unwrap();
        let ours = validate_message(&body, &l, &models(), "sd3");
        let by_schema = checker.is_valid(&case.job);
        let rules = &case.cross_field;
        match (by_schema, &ours) {
            (true, Ok(_)) if rules.is_empty() => both_accept += 1,
            (false, Err(_)) => both_reject += 1,
            (true, Err(r)) if rules.iter().any(|rule| r.0.contains(rule)) => cross += 1,
            (true, Err(r)) => panic!(
                "the schema accepts what the validator rejects ({}; cross-field rules broken: {rules:?}):\n{}",
                r.0,
                serde_json::to_string_pretty(&case.job).unwrap()
            ),
            (true, Ok(_)) => panic!(
                "the validator accepts a job that breaks the cross-field rules {rules:?}:\n{}",
                serde_json::to_string_pretty(&case.job).unwrap()
            ),
            (false, Ok(_)) => {
                let errors: Vec<String> =
                    checker.iter_errors(&case.job).map(|e| e.to_string()).collect();
                panic!(
                    "the validator accepts what the schema rejects ({errors:?}):\n{}",
                    serde_json::to_string_pretty(&case.job).unwrap()
                )
            }
        }
    }
    eprintln!(
        "{CASES} jobs: {both_accept} accepted by both, {both_reject} rejected by both, {cross} accepted by the schema and rejected by a cross-field rule"
    );
    // Both directions on thousands of cases each.
    assert!(both_accept >= 2_000, "{both_accept} accepted by both");
    assert!(both_reject >= 2_000, "{both_reject} rejected by both");
    assert!(cross >= 200, "{cross} cross-field rejections");
}

#[test]
fn the_committed_examples_of_the_contract_pass_the_schema() {
    let schema = Document::Job.schema(&limits(), &models());
    let checker = jsonschema::validator_for(&schema).unwrap();
    for ok in [
        json!({"id": "j-1", "prompt": "a hairy frog"}),
        json!({"id": "j-2", "prompt": "a hairy frog", "mode": "plain",
               "params": {"steps": 4, "width": 128, "height": 128, "scheduler": "euler"},
               "output": {"format": "jpg", "quality": 80, "prefix": "/runs/1/"}}),
    ] {
        assert!(checker.is_valid(&ok), "{ok}");
    }
    for bad in [
        json!({"id": "", "prompt": ""}),
        json!({"id": "j", "prompt": "p", "priority": 256}),
        json!({"id": "j", "prompt": "p", "mode": "sideways"}),
        json!({"id": "j", "prompt": "p", "params": {"steps": 5000}}),
        json!({"id": "j", "prompt": "p", "params": {"width": 1000}}),
        json!({"id": "j", "prompt": "p", "plan": 3}),
        json!({"id": "j", "prompt": "p", "mode": "r2fplus",
               "plan": {"visual_detail_level": "3", "r2f_prompt": [["a", "b"]]}}),
    ] {
        assert!(!checker.is_valid(&bad), "{bad}");
    }
}
