//! `r2f rarebench`: RareBench over configurations of r2f, scored by a vision judge (issue 23).
//!
//! A run reads the benchmark folder, lists the images its configurations need (configuration ×
//! category × prompt × seed), makes those the run folder does not hold yet (or holds damaged),
//! asks the judge about those it has not scored, and writes the reports. Every image and every
//! judgement is a line of the run folder's manifest as soon as it exists, so a run that stops
//! (a crash, Ctrl-C, a judge that gives up) resumes where it was.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;

use super::args::RarebenchArgs;
use super::exit::Exit;
use crate::bench::rarebench::dataset::Dataset;
use crate::bench::rarebench::judge::{judge_id, ImageMime, Judge, JudgeSettings};
use crate::bench::rarebench::manifest::{now, store_image, Entry, Manifest, RunState};
use crate::bench::rarebench::report::{
    avg_scores_json, contact_sheet, html, judge_label, markdown, ReportData,
};
use crate::bench::rarebench::score::{self, category_scores, Bootstrap};
use crate::bench::rarebench::spec::{Category, Config, Image, ImageRequest, PlanSource, SampleKey};
use crate::config::Settings;
use crate::device::{device_name, dtype_name, DType};
use crate::generate::{generate_image, Encoding, Engine, JobMode, ModelIdentity};
use crate::image::{write_atomic, ImageFormat};
use crate::job::JobMessage;
use crate::models::hub;
use crate::plan::Plan;

/// The run spec: the configurations compared and the judge.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// The reports' title.
    #[serde(default)]
    pub title: Option<String>,
    pub configs: Vec<Config>,
    #[serde(default)]
    pub judge: JudgeSpec,
}

/// The `[judge]` table of a run spec; what it leaves out is [`JudgeSettings::default`]'s.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JudgeSpec {
    /// The API root, e.g. `https://api.openai.com/v1`.
    pub base_url: Option<String>,
    pub model: Option<String>,
    /// The environment variable that holds the API key (none: no key is sent).
    pub api_key_env: Option<String>,
    /// A judge prompt file (relative to the spec's folder), with `{prompt}` where the image's
    /// prompt goes: e.g. the official evaluation's prompt, verbatim.
    pub prompt_file: Option<PathBuf>,
    /// Questions in flight at once (default 4).
    pub concurrency: Option<usize>,
    pub timeout_secs: Option<f64>,
    pub max_attempts: Option<u32>,
    pub max_reasks: Option<u32>,
    pub retry_backoff_secs: Option<f64>,
    pub max_retry_wait_secs: Option<f64>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f64>,
    pub image_mime: Option<ImageMime>,
}

const DEFAULT_CONCURRENCY: usize = 4;

fn secs(v: f64, what: &str) -> Result<Duration, String> {
    Duration::try_from_secs_f64(v)
        .map_err(|_| format!("judge.{what} must be a non-negative number of seconds"))
}

impl JudgeSpec {
    /// The judge's settings; the API key is read from the environment only when `with_key`.
    pub fn settings(&self, spec_dir: &Path, with_key: bool) -> Result<JudgeSettings, String> {
        let mut s = JudgeSettings::default();
        if let Some(v) = &self.base_url {
            s.base_url = v.clone();
        }
        if let Some(v) = &self.model {
            s.model = v.clone();
        }
        if let Some(v) = self.timeout_secs {
            s.timeout = secs(v, "timeout_secs")?;
        }
        if let Some(v) = self.max_attempts {
            s.max_attempts = v.max(1);
        }
        if let Some(v) = self.max_reasks {
            s.max_reasks = v;
        }
        if let Some(v) = self.retry_backoff_secs {
            s.retry_backoff = secs(v, "retry_backoff_secs")?;
        }
        if let Some(v) = self.max_retry_wait_secs {
            s.max_retry_wait = secs(v, "max_retry_wait_secs")?;
        }
        if let Some(v) = self.max_tokens {
            s.max_tokens = v;
        }
        s.temperature = self.temperature;
        if let Some(v) = self.image_mime {
            s.image_mime = v;
        }
        if let Some(p) = &self.prompt_file {
            s = s.with_prompt_file(&spec_dir.join(p))?;
        }
        if with_key {
            if let Some(var) = &self.api_key_env {
                let key = std::env::var(var).map_err(|_| {
                    format!("judge.api_key_env names {var}, which is not set in the environment")
                })?;
                s.api_key = Some(key);
            }
        }
        Ok(s)
    }

    pub fn concurrency(&self) -> usize {
        self.concurrency
            .unwrap_or(DEFAULT_CONCURRENCY)
            .clamp(1, 256)
    }
}

impl RunSpec {
    /// Reads a run spec (TOML, or JSON for a `.json` file) and checks its configurations.
    pub fn read(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the run spec {}: {e}", path.display()))?;
        let json = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        let spec: RunSpec = if json {
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
        } else {
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
        };
        if spec.configs.is_empty() {
            return Err(format!("{}: no configurations", path.display()));
        }
        let mut names = BTreeSet::new();
        for c in &spec.configs {
            c.validate()
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if !names.insert(c.name.as_str()) {
                return Err(format!(
                    "{}: configuration `{}` is listed twice",
                    path.display(),
                    c.name
                ));
            }
            if let Some(p) = &c.precision {
                parse_dtype(p).map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        Ok(spec)
    }
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    <DType as clap::ValueEnum>::from_str(s, true)
        .map_err(|_| format!("precision `{s}` is none of fp16, bf16, fp32"))
}

/// One image the run needs.
struct Planned {
    key: SampleKey,
    config: usize,
    prompt: String,
    plan: Option<Plan>,
}

/// The images of every configuration, in configuration order (so that a model loads once);
/// prompts without the precomputed plan an R2F configuration needs are left out and counted.
fn plan_run(spec: &RunSpec, data: &Dataset, limit: Option<usize>) -> Vec<Planned> {
    let mut out = Vec::new();
    for (ci, c) in spec.configs.iter().enumerate() {
        for cat in &data.categories {
            let mut skipped = 0;
            let take = limit.unwrap_or(usize::MAX);
            for item in cat.prompts.iter().take(take) {
                let plan = match (c.mode, c.plans) {
                    (JobMode::Plain, _) | (_, PlanSource::Llm) => None,
                    (mode, PlanSource::Precomputed) => match item.plan_for(mode) {
                        Some(p) => Some(p),
                        None => {
                            skipped += 1;
                            continue;
                        }
                    },
                };
                for &seed in &c.seeds {
                    out.push(Planned {
                        key: SampleKey {
                            config: c.name.clone(),
                            category: cat.category,
                            index: item.index,
                            seed,
                        },
                        config: ci,
                        prompt: item.prompt().to_string(),
                        plan: plan.clone(),
                    });
                }
            }
            if skipped > 0 {
                tracing::warn!(
                    config = %c.name,
                    category = cat.category.name(),
                    skipped,
                    "prompts without a precomputed plan are left out of this configuration"
                );
            }
        }
    }
    out
}

/// The job of one image through the workers' validation (a bad configuration is exit 65).
fn validated(settings: &Settings, req: &ImageRequest<'_>) -> anyhow::Result<crate::job::ValidJob> {
    let c = req.config;
    let mut params = c.params.clone();
    params.seed = Some(i64::try_from(req.key.seed).map_err(|_| {
        Exit::data(format!(
            "configuration `{}`: seed {} is over {}",
            c.name,
            req.key.seed,
            i64::MAX
        ))
    })?);
    params.num_images = None;
    let message = JobMessage {
        id: "rarebench".into(),
        prompt: req.prompt.to_string(),
        model: Some(c.model.clone()),
        mode: Some(c.mode),
        plan: req.plan.map(Plan::to_json),
        params,
        priority: None,
        output: None,
        expires_at: None,
    };
    message
        .validate(&settings.limits, None, &c.model)
        .map_err(|r| Exit::data(format!("configuration `{}`, {}: {}", c.name, req.key, r.0)).into())
}

/// `--local`: images made in this process, through `r2f generate`'s path; one model loaded at a
/// time (the run asks configuration by configuration).
struct LocalSource<'s> {
    settings: &'s Settings,
    device: tch::Device,
    default_dtype: tch::Kind,
    loaded: Option<(String, tch::Kind, Engine, ModelIdentity)>,
}

impl<'s> LocalSource<'s> {
    fn new(settings: &'s Settings, a: &RarebenchArgs) -> anyhow::Result<Self> {
        let (device, default_dtype) = super::local::device_and_dtype(a.device, a.dtype)?;
        Ok(Self {
            settings,
            device,
            default_dtype,
            loaded: None,
        })
    }

    fn engine(&mut self, model: &str, dtype: tch::Kind) -> anyhow::Result<()> {
        if matches!(&self.loaded, Some((m, d, ..)) if m == model && *d == dtype) {
            return Ok(());
        }
        self.loaded = None;
        let source = self.settings.model_source(model);
        let variant = self.settings.models.get(model).map(|m| m.variant);
        let folder = hub::resolve(&source, variant.unwrap_or_default().resolve(dtype))?;
        tracing::info!(model = %source, device = %device_name(self.device), dtype = dtype_name(dtype), "loading model");
        let engine = Engine::load(&folder, self.device, dtype)?;
        let identity = ModelIdentity::of_folder(model, &folder);
        self.loaded = Some((model.to_string(), dtype, engine, identity));
        Ok(())
    }

    fn generate(&mut self, req: ImageRequest<'_>) -> anyhow::Result<Image> {
        let job = validated(self.settings, &req)?;
        let dtype = match &req.config.precision {
            Some(p) => parse_dtype(p).map_err(Exit::config)?.kind(),
            None => self.default_dtype,
        };
        let planned = if job.spec.needs_planner() {
            Some(super::local::plan_with_llm(
                self.settings,
                &job.prompt,
                job.spec.mode(),
            )?)
        } else {
            None
        };
        let mode = job.spec.into_mode(planned).map_err(anyhow::Error::msg)?;
        self.engine(&req.config.model, dtype)?;
        let (_, _, engine, identity) = self.loaded.as_mut().expect("loaded above");
        let out = generate_image(
            engine,
            identity,
            &job.prompt,
            &mode,
            &job.params,
            self.settings.limits.max_pixels,
            Encoding::PNG,
            &mut |_, _| Ok(()),
        )?;
        tracing::debug!(key = %req.key, seconds = out.seconds, "image made");
        Ok(Image {
            bytes: out.bytes,
            format: ImageFormat::Png,
        })
    }
}

fn bar(len: usize, what: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>10} {bar:40} {pos}/{len} [{elapsed_precise}, eta {eta}]",
        )
        .expect("valid template"),
    );
    bar.set_message(what);
    bar
}

/// What this invocation could not do (the run is resumable: exit 75).
#[derive(Default)]
struct Missing {
    images: usize,
    judgements: usize,
}

fn make_images(
    settings: &Settings,
    a: &RarebenchArgs,
    spec: &RunSpec,
    planned: &[Planned],
    manifest: &mut Manifest,
    state: &mut RunState,
    missing: &mut Missing,
) -> anyhow::Result<()> {
    let damaged: BTreeSet<SampleKey> = state.damaged_images(&a.out).into_iter().collect();
    for k in &damaged {
        tracing::warn!(key = %k, "the stored image is missing or damaged: made again");
    }
    let todo: Vec<&Planned> = planned
        .iter()
        .filter(|p| state.needs_image(&p.key) || damaged.contains(&p.key))
        .collect();
    tracing::info!(planned = planned.len(), to_make = todo.len(), "images");
    if todo.is_empty() {
        return Ok(());
    }
    if !a.local {
        return Err(Exit::usage(format!(
            "{} images are to be made: broker mode is not yet implemented, pass --local (or --judge-only)",
            todo.len()
        ))
        .into());
    }
    // A configuration the workers would refuse fails the run before any loading.
    for p in &todo {
        validated(settings, &request(spec, p))?;
    }
    let mut source = LocalSource::new(settings, a)?;
    let bar = bar(todo.len(), "images");
    for p in todo {
        match source.generate(request(spec, p)) {
            Ok(image) => {
                let entry =
                    store_image(&a.out, &p.key, &p.prompt, &image).map_err(anyhow::Error::msg)?;
                manifest.append(&entry).map_err(anyhow::Error::msg)?;
                state.apply(entry);
            }
            Err(e) if Exit::code_of(&e) != Exit::FAILURE => return Err(e),
            Err(e) => {
                missing.images += 1;
                bar.suspend(|| tracing::error!(key = %p.key, error = %super::exit::error_line(&e), "image failed"));
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(())
}

fn request<'a>(spec: &'a RunSpec, p: &'a Planned) -> ImageRequest<'a> {
    ImageRequest {
        key: &p.key,
        config: &spec.configs[p.config],
        prompt: &p.prompt,
        plan: p.plan.as_ref(),
    }
}

fn judge_images(
    a: &RarebenchArgs,
    spec: &RunSpec,
    js: JudgeSettings,
    planned: &[Planned],
    manifest: &mut Manifest,
    state: &mut RunState,
    missing: &mut Missing,
) -> anyhow::Result<()> {
    let jid = judge_id(&js);
    let todo: Vec<(SampleKey, String, PathBuf, String)> = planned
        .iter()
        .filter(|p| state.needs_judgement(&p.key, &jid))
        .filter_map(|p| {
            let img = state.samples.get(&p.key)?.image.as_ref()?;
            Some((
                p.key.clone(),
                p.prompt.clone(),
                a.out.join(&img.path),
                img.sha256.clone(),
            ))
        })
        .collect();
    tracing::info!(judge = %js.model, id = %jid, to_judge = todo.len(), "judgements");
    if todo.is_empty() {
        return Ok(());
    }
    let judge = Judge::new(js).map_err(|e| Exit::config(super::exit::error_line(&e)))?;
    let bar = bar(todo.len(), "judged");
    let rt = super::remote::runtime()?;
    rt.block_on(async {
        let judge = &judge;
        let mut answers = futures::stream::iter(todo)
            .map(|(key, prompt, path, sha)| async move {
                let unjudged = |message: String| {
                    Err(crate::bench::rarebench::judge::JudgeError {
                        kind: crate::bench::rarebench::judge::JudgeErrorKind::Failed,
                        message,
                        requests: 0,
                        malformed: 0,
                        usage: Default::default(),
                    })
                };
                let r = match tokio::fs::read(&path).await {
                    // Only the bytes the manifest recorded are judged (a damaged file is made
                    // again by a run that makes images).
                    Ok(bytes) if crate::bench::rarebench::manifest::sha256_hex(&bytes) == sha => {
                        judge.judge(&prompt, &bytes).await
                    }
                    Ok(_) => unjudged(format!(
                        "{} is not the image the manifest recorded (damaged): it is made again by a run without --judge-only",
                        path.display()
                    )),
                    Err(e) => unjudged(format!("cannot read {}: {e}", path.display())),
                };
                (key, sha, r)
            })
            .buffer_unordered(spec.judge.concurrency());
        let mut refused = None;
        while let Some((key, sha256, r)) = answers.next().await {
            let entry = match r {
                Ok(judgement) => Entry::Judged {
                    key,
                    sha256,
                    judge: jid.clone(),
                    judgement,
                    at: now(),
                },
                Err(e) => {
                    missing.judgements += 1;
                    bar.suspend(|| tracing::error!(key = %key, error = %e, "judgement failed"));
                    if e.kind == crate::bench::rarebench::judge::JudgeErrorKind::Refused {
                        refused.get_or_insert_with(|| e.message.clone());
                    }
                    Entry::JudgeFailed {
                        key,
                        sha256,
                        judge: jid.clone(),
                        kind: format!("{:?}", e.kind).to_lowercase(),
                        error: e.message,
                        requests: e.requests,
                        malformed: e.malformed,
                        usage: e.usage,
                        at: now(),
                    }
                }
            };
            manifest.append(&entry).map_err(anyhow::Error::msg)?;
            state.apply(entry);
            bar.inc(1);
        }
        bar.finish_and_clear();
        match refused {
            // The key or the endpoint is wrong: every other question would fail the same way.
            Some(m) => Err(anyhow::Error::new(Exit::unavailable(format!(
                "the judge refused: {m}"
            )))),
            None => Ok(()),
        }
    })
}

/// Writes the reports into the run folder; returns the gate's verdict (None without
/// `--compare`) and the Markdown.
fn write_reports(
    a: &RarebenchArgs,
    spec: &RunSpec,
    js: &JudgeSettings,
    categories: &[Category],
    planned: &[Planned],
    state: &RunState,
) -> anyhow::Result<(Option<score::Gate>, String)> {
    let jid = judge_id(js);
    let keys: BTreeSet<&SampleKey> = planned.iter().map(|p| &p.key).collect();
    let table = score::table(state.scores(&jid).filter(|(k, _)| keys.contains(k)));
    let scores = category_scores(&table);
    let configs: Vec<String> = spec.configs.iter().map(|c| c.name.clone()).collect();
    let boot = Bootstrap {
        confidence: a.confidence,
        ..Bootstrap::default()
    };
    let mut comparisons = Vec::new();
    if let Some(first) = configs.first() {
        for other in &configs[1..] {
            for &c in categories {
                comparisons.extend(score::paired(&table, c, first, other, &boot));
            }
        }
    }
    let gate = a
        .compare
        .as_ref()
        .map(|ab| score::gate(&table, categories, &ab[0], &ab[1], a.threshold, &boot));
    let usage: BTreeMap<_, _> = state
        .billed(&jid)
        .into_iter()
        .filter(|(c, _)| configs.contains(c))
        .collect();
    let data = ReportData {
        title: spec.title.clone().unwrap_or_else(|| "RareBench".into()),
        judge_model: js.model.clone(),
        configs: configs.clone(),
        categories: categories.to_vec(),
        scores,
        comparisons,
        gate: gate.clone(),
        usage,
    };
    let label = judge_label(&js.model);
    let json = avg_scores_json(&data.scores, &configs, &label);
    let write = |name: &str, bytes: &[u8]| {
        let path = a.out.join(name);
        write_atomic(&path, bytes).with_context(|| format!("cannot write {}", path.display()))
    };
    write(
        &format!("avg_scores_{label}.json"),
        (serde_json::to_string_pretty(&json)? + "\n").as_bytes(),
    )?;
    let md = markdown(&data);
    write("report.md", md.as_bytes())?;
    let sheet = contact_sheet(state, &jid, &configs, categories);
    write("report.html", html(&data, &sheet).as_bytes())?;
    Ok((gate, md))
}

/// `r2f rarebench`.
pub fn rarebench(settings: &Settings, a: RarebenchArgs) -> anyhow::Result<()> {
    let spec = RunSpec::read(&a.spec).map_err(Exit::usage)?;
    if let Some(ab) = &a.compare {
        for name in ab {
            if !spec.configs.iter().any(|c| &c.name == name) {
                return Err(Exit::usage(format!(
                    "--compare: no configuration `{name}` in {}",
                    a.spec.display()
                ))
                .into());
            }
        }
    }
    if !(a.threshold.is_finite() && a.threshold >= 0.0) {
        return Err(Exit::usage("--threshold must be a non-negative number").into());
    }
    if !(a.confidence > 0.0 && a.confidence < 1.0) {
        return Err(Exit::usage("--confidence must be between 0 and 1 (exclusive)").into());
    }
    let spec_dir = a.spec.parent().unwrap_or(Path::new(".")).to_path_buf();
    // The judge's identity (its prompt file read) is known before any work.
    let js = spec
        .judge
        .settings(&spec_dir, false)
        .map_err(Exit::config)?;
    let categories: Vec<Category> = if a.categories.is_empty() {
        // The categories the folder has (the official one has all eight).
        let present: Vec<Category> = Category::ALL
            .iter()
            .copied()
            .filter(|&c| crate::bench::rarebench::dataset::prompt_file(&a.data, c).is_file())
            .collect();
        if present.is_empty() {
            return Err(Exit::data(format!(
                "{} holds no RareBench prompt file ({}/rarebench_<category>.txt)",
                a.data.display(),
                crate::bench::rarebench::dataset::PROMPT_DIR
            ))
            .into());
        }
        present
    } else {
        let mut seen = BTreeSet::new();
        a.categories
            .iter()
            .copied()
            .filter(|c| seen.insert(*c))
            .collect()
    };
    let data = Dataset::load(&a.data, &categories).map_err(Exit::data)?;
    for c in &data.categories {
        if !c.unmatched_plans.is_empty() {
            tracing::warn!(
                category = c.category.name(),
                unmatched = c.unmatched_plans.len(),
                "plan keys that match no prompt line"
            );
        }
    }
    let planned = plan_run(&spec, &data, a.limit);
    let (mut manifest, mut state) = Manifest::open(&a.out).map_err(Exit::usage)?;
    tracing::info!(run = %a.out.display(), prompts = data.len(), images = planned.len(), manifest_lines = state.lines, "rarebench run");
    // The judge's key is checked before any image is made.
    let keyed = if a.no_judge {
        None
    } else {
        Some(spec.judge.settings(&spec_dir, true).map_err(Exit::config)?)
    };
    let mut missing = Missing::default();
    if !a.judge_only {
        make_images(
            settings,
            &a,
            &spec,
            &planned,
            &mut manifest,
            &mut state,
            &mut missing,
        )?;
    }
    if let Some(keyed) = keyed {
        judge_images(
            &a,
            &spec,
            keyed,
            &planned,
            &mut manifest,
            &mut state,
            &mut missing,
        )?;
    }
    let (gate, md) = write_reports(&a, &spec, &js, &categories, &planned, &state)?;
    println!("{md}");
    if missing.images > 0 || missing.judgements > 0 {
        return Err(Exit::tempfail(format!(
            "{} images and {} judgements failed; run the same command again to finish the run",
            missing.images, missing.judgements
        ))
        .into());
    }
    if let Some(g) = gate.filter(|g| !g.passed) {
        let failed: Vec<&str> = g
            .rows
            .iter()
            .filter(|r| r.verdict != score::Verdict::Pass)
            .map(|r| r.category.name())
            .collect();
        return Err(Exit {
            code: Exit::FAILURE,
            message: format!(
                "the gate failed: `{}` is worse than `{}` by more than {} points (or unpaired) in {}",
                g.b,
                g.a,
                g.threshold,
                failed.join(", ")
            ),
        }
        .into());
    }
    Ok(())
}

#[cfg(test)]
#[path = "rarebench_tests.rs"]
mod tests;
