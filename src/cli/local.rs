//! The commands that run in this process: `generate`, `schedule`, `bench`.

use std::path::Path;

use anyhow::bail;
use indicatif::{ProgressBar, ProgressStyle};

use super::args::{BenchArgs, GenerateArgs, ParityArgs, PromptScheduleArgs};
use super::remote::runtime;
use crate::config::Settings;
use crate::device::{default_device, device_name, dtype_name, DType, DeviceSpec};
use crate::generate::{
    generate_image, prompt_schedule, write_latents, Encoding, Engine, Generated, GenerationRecord,
    JobMode, Mode, ModelIdentity, Params,
};
use crate::image::write_atomic;
use crate::job::{JobMessage, JobParams, ValidJob};
use crate::models::hub;
use crate::plan::{Plan, RegionPlan};

/// The device (default: the first GPU when libtorch sees one) and dtype (default: fp16 on
/// CUDA, fp32 on the CPU) the options ask for.
pub(super) fn device_and_dtype(
    device: Option<DeviceSpec>,
    dtype: Option<DType>,
) -> anyhow::Result<(tch::Device, tch::Kind)> {
    let device = match device {
        Some(d) => d.device()?,
        None => default_device(),
    };
    let dtype = dtype.unwrap_or_else(|| DType::default_for(device));
    Ok((device, dtype.kind()))
}

/// Reads a plan file (JSON).
fn read_plan_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read plan {}: {e}", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("plan {} is not valid JSON: {e}", path.display()))
}

/// Reads a plan file of either kind (the official JSON shapes), validated.
fn read_plan(path: &Path) -> anyhow::Result<Plan> {
    Plan::from_json(&read_plan_json(path)?)
        .map_err(|e| anyhow::anyhow!("invalid plan {}: {e}", path.display()))
}

/// The configured LLM behind the plan cache, or an error naming what to pass instead.
fn llm_planner(
    settings: &Settings,
    mode: JobMode,
) -> anyhow::Result<std::sync::Arc<crate::service::planner::CachedPlanner>> {
    crate::service::planner::planner(settings)
        .map_err(|e| super::exit::Exit::config(super::exit::error_line(&e)))?
        .ok_or_else(|| {
            super::exit::Exit::config(format!(
                "mode {} needs a plan: pass --plan FILE or enable [llm]",
                mode.name()
            ))
            .into()
        })
}

/// The configured LLM's plan for `prompt`, for a job of `mode` (r2f or r2fplus).
pub(super) fn plan_with_llm(
    settings: &Settings,
    prompt: &str,
    mode: JobMode,
) -> anyhow::Result<Plan> {
    use crate::service::planner::Planner;
    let planner = llm_planner(settings, mode)?;
    let metrics = crate::service::metrics::Metrics::new();
    let rt = runtime()?;
    let plan = if mode == JobMode::R2fplus {
        rt.block_on(planner.plan_regions(prompt, &metrics))
            .map(Plan::Regions)
    } else {
        rt.block_on(planner.plan(prompt, &metrics)).map(Plan::R2f)
    }
    .map_err(|e| anyhow::anyhow!("planning failed: {e}"))?;
    tracing::info!(plan = %plan.to_json(), "plan from the LLM");
    Ok(plan)
}

/// The job `r2f generate` runs, in the contract's own terms: the options become a job message
/// and go through the same validation as a worker's jobs (the model is a name, a folder or a
/// Hub id here, so any model passes). The mode defaults to the kind of the `--plan` file, else
/// plain.
fn job_of(settings: &Settings, a: &GenerateArgs, model: &str) -> anyhow::Result<ValidJob> {
    let plan = a.plan.as_deref().map(read_plan_json).transpose()?;
    let mode = match (a.mode, &plan) {
        (Some(m), _) => m,
        (None, Some(v)) => match Plan::from_json(v) {
            Ok(Plan::Regions(_)) => JobMode::R2fplus,
            _ => JobMode::R2f,
        },
        (None, None) => JobMode::Plain,
    };
    let int = |v: Option<usize>| v.map(|v| i64::try_from(v).unwrap_or(i64::MAX));
    let r = &a.regions;
    let params = JobParams {
        steps: int(a.steps),
        guidance: a.guidance,
        width: a.width,
        height: a.height,
        seed: Some(a.seed),
        num_images: None,
        negative_prompt: Some(a.negative_prompt.clone()),
        schedule: Some(a.schedule),
        scheduler: a.scheduler,
        stop_step_map: a.stop_step_map,
        region_mask: Some(r.region_mask),
        bbox_guidance_steps: int(Some(r.bbox_guidance_steps)),
        bbox_guidance_iterations: int(Some(r.bbox_guidance_iterations)),
        bbox_loss_scale: Some(r.bbox_loss_scale),
        latent_fusion_steps: int(Some(r.latent_fusion_steps)),
        bbox_guidance_recompute: Some(r.bbox_guidance_recompute),
    };
    let prompt = a.prompt.clone().unwrap_or_default();
    validated_job(settings, model, prompt, mode, plan, params, a.t5_tokens)
}

/// A job message of `r2f generate` through the workers' validation; the T5 length checked
/// beside it (a command-line option, not a job parameter).
fn validated_job(
    settings: &Settings,
    model: &str,
    prompt: String,
    mode: JobMode,
    plan: Option<serde_json::Value>,
    params: JobParams,
    t5_tokens: Option<usize>,
) -> anyhow::Result<ValidJob> {
    let message = JobMessage {
        id: "generate".into(),
        prompt,
        model: Some(model.to_string()),
        mode: Some(mode),
        plan,
        params,
        priority: None,
        output: None,
        expires_at: None,
    };
    let job = message
        .validate(&settings.limits, None, model)
        .map_err(|r| super::exit::Exit::data(r.0))?;
    if let Some(t) = t5_tokens {
        if !(1..=512).contains(&t) {
            return Err(super::exit::Exit::data(format!(
                "T5 sequence length must be between 1 and 512 (got {t})"
            ))
            .into());
        }
    }
    Ok(job)
}

/// The job an image's metadata record describes (`r2f generate --from`), through the same
/// validation as any job: a record is data from a file, not trusted.
fn job_of_record(
    settings: &Settings,
    record: &GenerationRecord,
    model: &str,
) -> anyhow::Result<ValidJob> {
    let stop_step_map = match record.stop_steps.as_deref() {
        None => None,
        Some(s) => Some(
            crate::r2f::StopStepMapName::ALL
                .iter()
                .copied()
                .find(|n| n.map().0.as_slice() == s)
                .ok_or_else(|| {
                    super::exit::Exit::data(format!(
                        "the image's stop-step map {s:?} is none of r2f's maps"
                    ))
                })?,
        ),
    };
    let int = |v: usize| Some(i64::try_from(v).unwrap_or(i64::MAX));
    let knobs = record.r2fplus.as_ref();
    let scheduler = record
        .scheduler()
        .map_err(|e| super::exit::Exit::data(e.to_string()))?;
    let params = JobParams {
        steps: int(record.steps),
        guidance: Some(record.guidance),
        width: Some(record.width),
        height: Some(record.height),
        seed: Some(record.seed),
        num_images: None,
        negative_prompt: Some(record.negative_prompt.clone()),
        schedule: record.schedule,
        scheduler,
        stop_step_map,
        region_mask: knobs.map(|k| k.region_mask),
        bbox_guidance_steps: knobs.and_then(|k| int(k.bbox_guidance_steps)),
        bbox_guidance_iterations: knobs.and_then(|k| int(k.bbox_guidance_iterations)),
        bbox_loss_scale: knobs.map(|k| k.bbox_loss_scale),
        latent_fusion_steps: knobs.and_then(|k| int(k.latent_fusion_steps)),
        bbox_guidance_recompute: knobs.map(|k| k.bbox_guidance_recompute),
    };
    validated_job(
        settings,
        model,
        record.prompt.clone(),
        record.mode,
        record.plan.clone(),
        params,
        record.t5_tokens,
    )
}

/// The metadata record of an image r2f wrote.
fn read_record(path: &Path) -> anyhow::Result<GenerationRecord> {
    let bytes = std::fs::read(path)
        .map_err(|e| super::exit::Exit::usage(format!("cannot read {}: {e}", path.display())))?;
    let (fields, _) = crate::image::read_metadata(&bytes)
        .map_err(|e| super::exit::Exit::data(format!("{}: {e}", path.display())))?;
    if fields.is_empty() {
        return Err(
            super::exit::Exit::data(format!("{} carries no r2f metadata", path.display())).into(),
        );
    }
    GenerationRecord::from_fields(&fields)
        .map_err(|e| super::exit::Exit::data(format!("{}: {e}", path.display())).into())
}

/// A progress bar over the denoising steps (standard error).
fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("denoising {bar:40} {pos}/{len} steps [{elapsed_precise}]")
            .expect("valid template"),
    );
    bar
}

/// `r2f inspect IMAGE`: the metadata record an image carries, as one JSON object (typed as in
/// `result.json`; the fields as strings for an image whose record is incomplete), and
/// `ai_generated`: whether its XMP carries the IPTC trainedAlgorithmicMedia source type.
pub fn inspect(path: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(path)
        .map_err(|e| super::exit::Exit::usage(format!("cannot read {}: {e}", path.display())))?;
    let (fields, marked) = crate::image::read_metadata(&bytes)
        .map_err(|e| super::exit::Exit::data(format!("{}: {e}", path.display())))?;
    if fields.is_empty() {
        return Err(
            super::exit::Exit::data(format!("{} carries no r2f metadata", path.display())).into(),
        );
    }
    let mut out = match GenerationRecord::from_fields(&fields)
        .ok()
        .and_then(|r| serde_json::to_value(r).ok())
    {
        Some(serde_json::Value::Object(map)) => map,
        _ => fields
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect(),
    };
    out.insert("ai_generated".into(), serde_json::Value::Bool(marked));
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// The format of the image file `path`, from its extension.
fn format_of(path: &Path) -> anyhow::Result<crate::image::ImageFormat> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    crate::image::ImageFormat::parse(&ext).map_err(|_| {
        super::exit::Exit::usage(format!(
            "cannot tell the image format of `{}` from its extension: use .png, .jpg, .jpeg or \
             .webp, or --format",
            path.display()
        ))
        .into()
    })
}

/// `r2f generate`: one image in this process, in the format `--format` or its `--out`
/// extension names (and optionally its latents); with `--from`, the image a metadata record
/// describes, made again.
pub fn generate(settings: &Settings, a: GenerateArgs) -> anyhow::Result<()> {
    // Fail on bad options before spending time on loading (or on the LLM).
    let format = match a.format {
        Some(f) => f,
        None => format_of(&a.out)?,
    };
    let record = a.from.as_deref().map(read_record).transpose()?;
    let model = match (&a.model, &record) {
        (Some(m), _) => m.clone(),
        (None, Some(r)) => r.model.clone(),
        (None, None) => unreachable!("clap requires --model without --from"),
    };
    let (job, t5_tokens, device, dtype) = match &record {
        Some(r) => {
            let device = match a.device {
                Some(d) => Some(d),
                None => Some(r.device.parse().map_err(|e| {
                    super::exit::Exit::data(format!("the image's device `{}`: {e}", r.device))
                })?),
            };
            let dtype = match a.dtype {
                Some(d) => Some(d),
                None => Some(
                    <DType as clap::ValueEnum>::from_str(&r.dtype, true).map_err(|e| {
                        super::exit::Exit::data(format!("the image's dtype `{}`: {e}", r.dtype))
                    })?,
                ),
            };
            (
                job_of_record(settings, r, &model)?,
                r.t5_tokens,
                device,
                dtype,
            )
        }
        None => (
            job_of(settings, &a, &model)?,
            a.t5_tokens,
            a.device,
            a.dtype,
        ),
    };
    let quality = a
        .quality
        .or(record.as_ref().and_then(|r| r.quality))
        .unwrap_or(crate::image::DEFAULT_QUALITY);
    let mode = job.spec.mode();
    let planned = if job.spec.needs_planner() {
        Some(plan_with_llm(settings, &job.prompt, mode)?)
    } else {
        None
    };
    let mode = job.spec.into_mode(planned).map_err(anyhow::Error::msg)?;
    let params = Params {
        t5_tokens,
        ..job.params
    };
    let signer = if a.c2pa || settings.c2pa.sign_by_default {
        let signer = settings
            .c2pa
            .signer()
            .map_err(super::exit::Exit::config)?
            .ok_or_else(|| {
                super::exit::Exit::config(
                    "--c2pa needs a signing key: set c2pa.key_file and c2pa.cert_file",
                )
            })?;
        Some(signer)
    } else {
        None
    };
    let (device, dtype) = device_and_dtype(device, dtype)?;
    let source = settings.model_source(&model);
    let variant = settings.models.get(&model).map(|m| m.variant);
    let folder = hub::resolve(&source, variant.unwrap_or_default().resolve(dtype))?;
    tracing::info!(model = %source, device = %device_name(device), dtype = dtype_name(dtype), "loading model");
    let mut engine = Engine::load(&folder, device, dtype)?;
    let identity = ModelIdentity::of_folder(&model, &folder);
    if let Some(r) = &record {
        if r.weights_hash.is_some() && r.weights_hash != identity.weights_hash {
            tracing::warn!(
                image = r.weights_hash.as_deref().unwrap_or("-"),
                loaded = identity.weights_hash.as_deref().unwrap_or("-"),
                "the loaded weights are not the ones the image was made with: it will differ"
            );
        }
    }

    let bar = progress_bar();
    let mut on_step = |i: usize, n: usize| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
        tracing::debug!(step = i, steps = n, "denoising step done");
        Ok(())
    };
    let out = generate_image(
        &mut engine,
        &identity,
        &job.prompt,
        &mode,
        &params,
        settings.limits.max_pixels,
        Encoding { format, quality },
        &mut on_step,
    )?;
    bar.finish_and_clear();
    let bytes = match &signer {
        Some(s) => s.sign(
            &out.bytes,
            format.content_type(),
            &job.prompt,
            &serde_json::to_value(&out.record)?,
        )?,
        None => out.bytes.clone(),
    };
    write_atomic(&a.out, &bytes)?;
    if let Some(path) = &a.latents_out {
        write_latents(path, &out.output.latents)?;
    }
    log_written(&a.out, &out);
    println!("{}", a.out.display());
    Ok(())
}

fn log_written(path: &Path, out: &Generated) {
    let t = &out.output.timings;
    tracing::info!(
        out = %path.display(),
        width = out.resolved.width,
        height = out.resolved.height,
        steps = out.resolved.steps,
        seed = out.resolved.seed,
        encode_ms = t.encode.as_millis() as u64,
        denoise_ms = t.denoise.as_millis() as u64,
        guidance_ms = t.guidance.as_millis() as u64,
        decode_ms = t.decode.as_millis() as u64,
        "image written"
    );
}

/// `r2f schedule`: the prompt of each step of an R2F plan (its prompt schedule), as a JSON
/// array; for an R2F+ plan, per run (each object, then the overall image) and per step, the
/// prompt and each object's token rows, as a JSON array of runs.
pub fn schedule(a: PromptScheduleArgs) -> anyhow::Result<()> {
    if a.steps == 0 {
        bail!("steps must be at least 1");
    }
    let plan = match read_plan(&a.plan)? {
        Plan::R2f(plan) => plan,
        Plan::Regions(plan) => return region_schedule(&a, plan),
    };
    let mode = Mode::R2f {
        plan,
        schedule: a.schedule,
        stop_steps: a.stop_step_map.map(|m| m.map()),
    };
    let (prompts, order) = prompt_schedule(&mode, "", a.steps, a.model);
    let per_step: Vec<&String> = order.iter().map(|&i| &prompts[i]).collect();
    println!("{}", serde_json::to_string_pretty(&per_step)?);
    Ok(())
}

/// `r2f schedule` for an R2F+ plan: needs the model's tokenizers for the token rows.
fn region_schedule(a: &PromptScheduleArgs, plan: RegionPlan) -> anyhow::Result<()> {
    use crate::models::tokenizer::PromptTokenizer;
    use crate::pipelines::sd3::plus::{RegionRequest, RegionTokenizer};
    let dir = a.tokenizers.as_ref().ok_or_else(|| {
        anyhow::anyhow!("an R2F+ plan needs --tokenizers MODEL_DIR (the SD3 folder whose tokenizers give the token rows)")
    })?;
    let clip = PromptTokenizer::clip(&dir.join("tokenizer"))?;
    let t5_dir = dir.join("tokenizer_3");
    let t5 = if t5_dir.is_dir() {
        Some(PromptTokenizer::t5(&t5_dir, a.t5_tokens)?)
    } else {
        None
    };
    let req = RegionRequest {
        plan,
        negative_prompt: String::new(),
        guidance: 7.0,
        seed: 0,
        width: 1024,
        height: 1024,
        steps: a.steps,
        knobs: a.regions.knobs(a.schedule, a.stop_step_map),
    };
    let tok = RegionTokenizer::new(&clip, t5.as_ref(), a.t5_tokens)?;
    let runs = req.text(&req.setup()?, &tok)?;
    println!("{}", serde_json::to_string_pretty(&runs)?);
    Ok(())
}

/// `r2f bench`: denoiser and VAE speed with random weights, or (`--e2e`) whole jobs.
pub fn bench(a: BenchArgs) -> anyhow::Result<()> {
    let (device, dtype) = device_and_dtype(a.device, a.dtype)?;
    if let Some(dir) = &a.write_model {
        let configs = match a.model {
            crate::bench::BenchModel::Sd3 => crate::pipelines::sd3::Sd3Configs::sd3_medium(),
            crate::bench::BenchModel::Sd3Tiny => crate::bench::e2e::sd3_tiny_configs(),
            other => bail!(
                "--write-model writes SD3 folders (sd3, sd3-tiny), not {}",
                other.name()
            ),
        };
        let tokenizers = a
            .tokenizers
            .clone()
            .unwrap_or_else(|| crate::bench::parity::default_fixtures().join("sd3-tiny-a"));
        crate::bench::model::write_sd3(dir, &configs, &tokenizers, dtype)?;
        println!("{}", dir.display());
        return Ok(());
    }
    let json = if a.e2e {
        let report = crate::bench::e2e::run(&crate::bench::e2e::E2eOptions {
            model: a.model,
            device,
            dtype,
            width: a.width,
            height: a.height,
            tokenizers: a.tokenizers.clone(),
            plain_steps: a.plain_steps,
            r2f_steps: a.r2f_steps,
            r2fplus: a.r2fplus,
        })?;
        println!("{report}");
        serde_json::to_string_pretty(&report)?
    } else {
        let report = crate::bench::run(&crate::bench::BenchOptions {
            device,
            dtype,
            width: a.width,
            height: a.height,
            steps: a.steps,
            warmup: a.warmup,
            context_tokens: a.context_tokens,
            preset: a.model.preset(),
            weights: a.weights.clone(),
        })?;
        println!("{report}");
        serde_json::to_string_pretty(&report.to_json())?
    };
    if let Some(path) = &a.json {
        write_atomic(path, json.as_bytes())?;
    }
    Ok(())
}

/// `r2f parity`: the bundled parity cases on a device and dtype.
pub fn parity(a: ParityArgs) -> anyhow::Result<()> {
    let (device, dtype) = device_and_dtype(a.device, a.dtype)?;
    let fixtures = a
        .fixtures
        .unwrap_or_else(crate::bench::parity::default_fixtures);
    let report = crate::bench::parity::run(&fixtures, device, dtype, a.tolerance)?;
    println!("{report}");
    if let Some(path) = &a.json {
        write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    if !report.ok {
        bail!("a parity case is over the tolerance");
    }
    Ok(())
}
