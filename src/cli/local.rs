//! The commands that run in this process: `generate`, `schedule`, `bench`.

use std::path::Path;

use anyhow::bail;
use indicatif::{ProgressBar, ProgressStyle};

use super::args::{BenchArgs, GenerateArgs, ParityArgs, PromptScheduleArgs};
use super::remote::runtime;
use crate::config::Settings;
use crate::device::{default_device, device_name, dtype_name, DType, DeviceSpec};
use crate::generate::{
    generate_image, prompt_schedule, write_latents, Encoding, Engine, Generated, JobMode, Mode,
    Params,
};
use crate::image::write_atomic;
use crate::models::hub;
use crate::plan::{Plan, R2fPlan, RegionPlan};

/// The device (default: the first GPU when libtorch sees one) and dtype (default: fp16 on
/// CUDA, fp32 on the CPU) the options ask for.
fn device_and_dtype(
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

/// Reads a plan file of either kind (the official JSON shapes), validated.
fn read_plan(path: &Path) -> anyhow::Result<Plan> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read plan {}: {e}", path.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("plan {} is not valid JSON: {e}", path.display()))?;
    Plan::from_json(&value).map_err(|e| anyhow::anyhow!("invalid plan {}: {e}", path.display()))
}

/// The configured LLM behind the plan cache, or an error naming what to pass instead.
fn llm_planner(
    settings: &Settings,
    mode: JobMode,
) -> anyhow::Result<std::sync::Arc<crate::service::planner::CachedPlanner>> {
    crate::service::planner::planner(settings)?.ok_or_else(|| {
        anyhow::anyhow!(
            "mode {} needs a plan: pass --plan FILE or enable [llm]",
            mode.name()
        )
    })
}

/// The configured LLM's R2F plan for `prompt`.
fn plan_with_llm(settings: &Settings, prompt: &str) -> anyhow::Result<R2fPlan> {
    let planner = llm_planner(settings, JobMode::R2f)?;
    let metrics = crate::service::metrics::Metrics::new();
    let plan = runtime()?
        .block_on(crate::service::planner::Planner::plan(
            planner.as_ref(),
            prompt,
            &metrics,
        ))
        .map_err(|e| anyhow::anyhow!("planning failed: {e}"))?;
    tracing::info!(plan = %plan.to_official_json(), "plan from the LLM");
    Ok(plan)
}

/// The configured LLM's R2F+ plan for `prompt`.
fn region_plan_with_llm(settings: &Settings, prompt: &str) -> anyhow::Result<RegionPlan> {
    let planner = llm_planner(settings, JobMode::R2fplus)?;
    let metrics = crate::service::metrics::Metrics::new();
    let plan = runtime()?
        .block_on(crate::service::planner::Planner::plan_regions(
            planner.as_ref(),
            prompt,
            &metrics,
        ))
        .map_err(|e| anyhow::anyhow!("planning failed: {e}"))?;
    tracing::info!(plan = %serde_json::to_string(&plan)?, "R2F+ plan from the LLM");
    Ok(plan)
}

/// The mode the options ask for (default: the kind of the `--plan` file, else plain); r2f and
/// r2fplus take the plan file, or the LLM's plan when there is none.
fn mode(settings: &Settings, a: &GenerateArgs) -> anyhow::Result<Mode> {
    let file = a.plan.as_deref().map(read_plan).transpose()?;
    let default = match &file {
        Some(Plan::R2f(_)) => JobMode::R2f,
        Some(Plan::Regions(_)) => JobMode::R2fplus,
        None => JobMode::Plain,
    };
    let mode = a.mode.unwrap_or(default);
    let plan = match (mode, file) {
        (JobMode::Plain, _) => return Ok(Mode::Plain),
        (_, Some(plan)) => plan,
        (JobMode::R2f, None) => Plan::R2f(plan_with_llm(settings, &a.prompt)?),
        (JobMode::R2fplus, None) => Plan::Regions(region_plan_with_llm(settings, &a.prompt)?),
    };
    match (mode, plan) {
        (JobMode::R2f, Plan::R2f(plan)) => Ok(Mode::R2f {
            plan,
            schedule: a.schedule,
            stop_steps: a.stop_step_map,
        }),
        (JobMode::R2fplus, Plan::Regions(plan)) => Ok(Mode::R2fPlus {
            plan,
            knobs: a.regions.knobs(a.schedule, a.stop_step_map),
        }),
        (JobMode::R2f, _) => bail!("--mode r2f needs an R2F plan; the --plan file is an R2F+ plan"),
        (_, _) => bail!("--mode r2fplus needs an R2F+ plan; the --plan file is an R2F plan"),
    }
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

/// `r2f generate`: one image in this process, written as a PNG (and optionally its latents).
pub fn generate(settings: &Settings, a: GenerateArgs) -> anyhow::Result<()> {
    let mode = mode(settings, &a)?;
    let params = Params {
        steps: a.steps,
        guidance: a.guidance,
        seed: a.seed,
        width: a.width,
        height: a.height,
        negative_prompt: a.negative_prompt.clone(),
        t5_tokens: a.t5_tokens,
        scheduler: a.scheduler.map(|s| s.name().to_string()),
    };
    // Fail on bad options before spending time on loading.
    crate::job::validate_params(&a.prompt, &params, &settings.limits)?;
    let (device, dtype) = device_and_dtype(a.device, a.dtype)?;
    let source = settings.model_source(&a.model);
    let folder = hub::resolve(&source)?;
    tracing::info!(model = %source, device = %device_name(device), dtype = dtype_name(dtype), "loading model");
    let mut engine = Engine::load(&folder, device, dtype)?;

    let bar = progress_bar();
    let mut on_step = |i: usize, n: usize| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
        tracing::debug!(step = i, steps = n, "denoising step done");
        Ok(())
    };
    let out = generate_image(
        &mut engine,
        &a.model,
        &a.prompt,
        &mode,
        &params,
        settings.limits.max_pixels,
        Encoding::PNG,
        &mut on_step,
    )?;
    bar.finish_and_clear();
    write_atomic(&a.out, &out.bytes)?;
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
        stop_steps: a.stop_step_map,
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
