//! `r2f`: the command-line entry point.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use r2f::config::Settings;
use r2f::device::{
    default_device, default_dtype, device_name, dtype_name, parse_device, parse_dtype,
};
use r2f::generate::{
    conditioning_schedule, generate_png, validate, write_latents, Engine, Mode, Params,
};
use r2f::image::write_atomic;
use r2f::models::hub;
use r2f::models::hub::Family;
use r2f::plan::{Plan, R2fPlan};
use r2f::r2f::ScheduleKind;

#[derive(Parser)]
#[command(
    name = "r2f",
    version,
    about = "Rare-to-Frequent text-to-image generation on libtorch"
)]
struct Cli {
    /// Settings file read after config/default.toml (R2F__* environment variables override both).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate one image in-process, without a broker.
    Generate(Box<GenerateArgs>),
    /// Measure denoising and VAE speed at full size with random weights (no download).
    Bench(BenchArgs),
    /// Print the prompt that conditions each step of an R2F plan, as a JSON array.
    Schedule(ScheduleArgs),
    /// The daemon: consume jobs, plan, generate, store, publish results, serve metrics.
    Worker,
    /// Ask the configured LLM (through the plan cache) and print the plan as JSON.
    Plan {
        #[arg(long)]
        prompt: String,
        /// r2f or r2fplus.
        #[arg(long, default_value = "r2f")]
        mode: String,
    },
    /// Measure jobs per second through the broker and the per-job service overhead against a
    /// running worker (plain jobs of the worker's model).
    BenchService {
        #[arg(long, default_value_t = 50)]
        jobs: usize,
        #[arg(long, default_value_t = 1)]
        steps: u32,
        #[arg(long, default_value_t = 64)]
        size: u32,
    },
    /// Publish jobs (one JSON object a line) with publisher confirms.
    Enqueue {
        /// A JSON-lines file (`-` for standard input).
        file: PathBuf,
    },
}

#[derive(clap::Args)]
struct ScheduleArgs {
    /// An R2F plan in the official JSON shape.
    #[arg(long)]
    plan: PathBuf,
    #[arg(long)]
    steps: usize,
    /// sd3 or sdxl (selects the level -> stop-step map).
    #[arg(long)]
    model: String,
    #[arg(long, default_value = "faithful")]
    schedule: String,
    /// paper ([0,5,10,20,30,40]) or head ([0,3,5,10,20,30]); default: the model's own map.
    #[arg(long)]
    stop_step_map: Option<String>,
}

#[derive(clap::Args)]
struct GenerateArgs {
    #[arg(long)]
    prompt: String,
    /// A logical model name from the config (sd3), a diffusers-layout folder, or a Hub model id.
    #[arg(long)]
    model: String,
    /// The PNG to write.
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long)]
    guidance: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: i64,
    #[arg(long)]
    width: Option<i64>,
    #[arg(long)]
    height: Option<i64>,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// r2f or plain (default: r2f when --plan is given, else plain).
    #[arg(long)]
    mode: Option<String>,
    /// An R2F plan in the official JSON shape (skips the LLM).
    #[arg(long)]
    plan: Option<PathBuf>,
    /// faithful (the official loop, quirks included) or clean (each concept's own stop step).
    #[arg(long, default_value = "faithful")]
    schedule: String,
    /// paper ([0,5,10,20,30,40]) or head ([0,3,5,10,20,30]); default: the model's own map.
    #[arg(long)]
    stop_step_map: Option<String>,
    /// fp32, fp16 or bf16 (default: fp16 on CUDA, fp32 on the CPU).
    #[arg(long)]
    dtype: Option<String>,
    /// cpu, cuda or cuda:N (default: cuda when available).
    #[arg(long)]
    device: Option<String>,
    /// T5 sequence length (SD3; diffusers' default 256, R2F 77).
    #[arg(long)]
    t5_tokens: Option<usize>,
    /// SDXL sampler: euler or dpm++2m-karras (default: the model's scheduler in plain mode,
    /// DPM-Solver++ 2M Karras in R2F mode).
    #[arg(long)]
    scheduler: Option<String>,
    /// Also write the final latents (before VAE decode) as safetensors, tensor `latents`.
    #[arg(long)]
    latents_out: Option<PathBuf>,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// sd3 (SD3-medium) or sdxl (SDXL base) at full size, or sd3-tiny / sdxl-tiny (small
    /// configurations for a smoke run).
    #[arg(long, default_value = "sd3")]
    model: String,
    #[arg(long, default_value_t = 1024)]
    width: i64,
    #[arg(long, default_value_t = 1024)]
    height: i64,
    /// Timed denoising steps.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Text tokens in the context (77 CLIP + 256 T5 in diffusers' default).
    #[arg(long, default_value_t = 333)]
    context_tokens: i64,
    #[arg(long)]
    dtype: Option<String>,
    #[arg(long)]
    device: Option<String>,
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn device_and_dtype(
    device: Option<&str>,
    dtype: Option<&str>,
) -> anyhow::Result<(tch::Device, tch::Kind)> {
    let device = match device {
        Some(d) => parse_device(d)?,
        None => default_device(),
    };
    let kind = match dtype {
        Some(k) => parse_dtype(k)?,
        None => default_dtype(device),
    };
    Ok((device, kind))
}

/// Reads an R2F plan file (either official shape; R2F+ plans are not accepted here).
fn read_r2f_plan(path: &std::path::Path) -> anyhow::Result<R2fPlan> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read plan {}: {e}", path.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("plan {} is not valid JSON: {e}", path.display()))?;
    match Plan::from_json(&value, "") {
        Ok(Plan::R2f(p)) => Ok(p),
        Ok(Plan::Regions(_)) => anyhow::bail!(
            "plan {} is an R2F+ (regions) plan; r2fplus is not supported yet",
            path.display()
        ),
        Err(e) => anyhow::bail!("invalid plan {}: {e}", path.display()),
    }
}

fn parse_stop_steps(s: Option<&str>) -> anyhow::Result<Option<r2f::r2f::StopStepMap>> {
    s.map(|s| r2f::r2f::StopStepMap::parse(s).map_err(anyhow::Error::msg))
        .transpose()
}

fn cmd_schedule(a: ScheduleArgs) -> anyhow::Result<()> {
    let family = match a.model.as_str() {
        "sd3" => Family::Sd3,
        "sdxl" => Family::Sdxl,
        other => anyhow::bail!("unknown model `{other}` (expected sd3 or sdxl)"),
    };
    if a.steps == 0 {
        anyhow::bail!("steps must be at least 1");
    }
    let schedule = ScheduleKind::parse(&a.schedule).map_err(anyhow::Error::msg)?;
    let plan = read_r2f_plan(&a.plan)?;
    let mode = Mode::R2f {
        plan,
        schedule,
        stop_steps: parse_stop_steps(a.stop_step_map.as_deref())?,
    };
    let (prompts, order) = conditioning_schedule(&mode, "", a.steps, family);
    let per_step: Vec<&String> = order.iter().map(|&i| &prompts[i]).collect();
    println!("{}", serde_json::to_string_pretty(&per_step)?);
    Ok(())
}

fn cmd_generate(settings: &Settings, a: GenerateArgs) -> anyhow::Result<()> {
    let schedule = ScheduleKind::parse(&a.schedule).map_err(anyhow::Error::msg)?;
    let mode_name = a
        .mode
        .clone()
        .unwrap_or_else(|| if a.plan.is_some() { "r2f" } else { "plain" }.to_string());
    let mode = match mode_name.as_str() {
        "plain" => Mode::Plain,
        "r2f" => match &a.plan {
            Some(path) => Mode::R2f {
                plan: read_r2f_plan(path)?,
                schedule,
                stop_steps: parse_stop_steps(a.stop_step_map.as_deref())?,
            },
            None => {
                let planner = r2f::plan::llm::planner(settings)?.ok_or_else(|| {
                    anyhow::anyhow!("mode r2f needs a plan: pass --plan FILE or enable [llm]")
                })?;
                let metrics = r2f::metrics::Metrics::new();
                let plan = runtime()?
                    .block_on(r2f::plan::Planner::plan(
                        planner.as_ref(),
                        &a.prompt,
                        &metrics,
                    ))
                    .map_err(|e| anyhow::anyhow!("planning failed: {e}"))?;
                tracing::info!(plan = %plan.to_official_json(), "plan from the LLM");
                Mode::R2f {
                    plan,
                    schedule,
                    stop_steps: parse_stop_steps(a.stop_step_map.as_deref())?,
                }
            }
        },
        "r2fplus" => anyhow::bail!("mode r2fplus is not supported yet"),
        other => anyhow::bail!("unknown mode `{other}` (expected r2f, r2fplus or plain)"),
    };
    let params = Params {
        steps: a.steps,
        guidance: a.guidance,
        seed: a.seed,
        width: a.width,
        height: a.height,
        negative_prompt: a.negative_prompt.clone(),
        t5_tokens: a.t5_tokens,
        scheduler: a.scheduler.clone(),
    };
    // Fail on bad options before spending time on loading.
    validate(&a.prompt, &params, &settings.limits)?;
    let (device, kind) = device_and_dtype(a.device.as_deref(), a.dtype.as_deref())?;
    let source = settings.model_source(&a.model);
    let folder = hub::resolve(&source)?;
    tracing::info!(model = %source, device = %device_name(device), dtype = dtype_name(kind), "loading model");
    let mut engine = Engine::load(&folder, device, kind)?;

    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("denoising {bar:40} {pos}/{len} steps [{elapsed_precise}]")
            .expect("valid template"),
    );
    let mut on_step = |i: usize, n: usize| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
        tracing::debug!(step = i, steps = n, "denoising step done");
    };
    let out = generate_png(
        &mut engine,
        &a.model,
        &a.prompt,
        &mode,
        &params,
        &settings.limits,
        &mut on_step,
    )?;
    bar.finish_and_clear();
    write_atomic(&a.out, &out.png)?;
    if let Some(path) = &a.latents_out {
        write_latents(path, &out.output.latents)?;
    }
    let t = &out.output.timings;
    tracing::info!(
        out = %a.out.display(),
        width = out.resolved.width,
        height = out.resolved.height,
        steps = out.resolved.steps,
        seed = out.resolved.seed,
        encode_ms = t.encode.as_millis() as u64,
        denoise_ms = t.denoise.as_millis() as u64,
        decode_ms = t.decode.as_millis() as u64,
        "image written"
    );
    println!("{}", a.out.display());
    Ok(())
}

fn cmd_bench(a: BenchArgs) -> anyhow::Result<()> {
    use r2f::models::mmdit::MmditConfig;
    use r2f::models::vae::VaeConfig;
    let (device, kind) = device_and_dtype(a.device.as_deref(), a.dtype.as_deref())?;
    use r2f::bench::Denoiser;
    use r2f::models::unet::UnetConfig;
    let (denoiser, vae) = match a.model.as_str() {
        "sd3" => (Denoiser::Sd3(MmditConfig::sd3_medium()), VaeConfig::sd3()),
        "sd3-tiny" => {
            let mut t = MmditConfig::sd3_medium();
            t.num_layers = 2;
            t.num_attention_heads = 2;
            t.caption_projection_dim = 128;
            t.joint_attention_dim = 256;
            t.pooled_projection_dim = 64;
            let mut v = VaeConfig::sd3();
            v.block_out_channels = vec![32, 32, 64, 64];
            v.layers_per_block = 1;
            (Denoiser::Sd3(t), v)
        }
        "sdxl" => (Denoiser::Sdxl(UnetConfig::sdxl_base()), VaeConfig::sdxl()),
        "sdxl-tiny" => {
            let mut u = UnetConfig::sdxl_base();
            u.block_out_channels = vec![32, 64, 64];
            u.heads = vec![2, 4, 4];
            u.transformer_layers = vec![1, 1, 1];
            u.cross_attention_dim = 64;
            u.projection_class_embeddings_input_dim = 6 * 256 + 64;
            let mut v = VaeConfig::sdxl();
            v.block_out_channels = vec![32, 32, 64, 64];
            v.layers_per_block = 1;
            (Denoiser::Sdxl(u), v)
        }
        other => anyhow::bail!(
            "unknown bench model `{other}` (expected sd3, sdxl, sd3-tiny or sdxl-tiny)"
        ),
    };
    if a.width % 16 != 0 || a.height % 16 != 0 || a.width <= 0 || a.height <= 0 {
        anyhow::bail!("width and height must be positive multiples of 16");
    }
    if a.steps == 0 {
        anyhow::bail!("steps must be at least 1");
    }
    let report = r2f::bench::run(&r2f::bench::BenchOptions {
        device,
        kind,
        width: a.width,
        height: a.height,
        steps: a.steps,
        warmup: a.warmup,
        context_tokens: a.context_tokens,
        denoiser,
        vae,
    })?;
    println!(
        "model={} size={}x{} dtype={} device={} steps={}",
        a.model,
        a.width,
        a.height,
        dtype_name(kind),
        device_name(device),
        a.steps
    );
    println!("ms_per_step={:.2}", report.ms_per_step);
    println!("denoise_ms={:.1}", report.denoise_ms);
    println!("vae_decode_ms={:.1}", report.vae_decode_ms);
    match report.peak_gpu_bytes {
        Some(b) => println!("gpu_memory_mib={}", b >> 20),
        None => println!("gpu_memory_mib=n/a"),
    }
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn cmd_worker(settings: Settings) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut shutdown = r2f::worker::shutdown_signal();
        let planner = r2f::plan::planner_from_settings(&settings)?;
        let drain = std::time::Duration::from_secs(settings.worker.drain_timeout_secs);
        let Some(worker) = r2f::worker::Worker::start(settings, &mut shutdown, planner).await?
        else {
            return Ok(());
        };
        // The drain deadline and the second signal are decided here, not in the job code:
        // past either, the process ends without acking (the broker redelivers the job).
        let mut watch = shutdown.clone();
        let deadline = async move {
            let _ = watch.wait_for(|s| *s > 0).await;
            tokio::select! {
                _ = tokio::time::sleep(drain) => 1,
                _ = watch.wait_for(|s| *s > 1) => 130,
            }
        };
        tokio::select! {
            r = worker.run(shutdown) => r,
            code = deadline => {
                tracing::error!(code, "drain not finished in time (or second signal): exiting without acking; the job in hand will be redelivered");
                std::process::exit(code);
            }
        }
    })
}

fn cmd_enqueue(settings: Settings, file: PathBuf) -> anyhow::Result<()> {
    let reader: Box<dyn std::io::BufRead> = if file.as_os_str() == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(&file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?,
        ))
    };
    let report = runtime()?.block_on(r2f::enqueue::enqueue(&settings, reader))?;
    for (line, reason) in &report.refused {
        eprintln!("line {line}: not published: {reason}");
    }
    println!(
        "{} published (confirmed by the broker), {} refused",
        report.accepted.len(),
        report.refused.len()
    );
    if report.refused.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("{} line(s) were not published", report.refused.len())
    }
}

fn cmd_plan(settings: Settings, prompt: String, mode: String) -> anyhow::Result<()> {
    use r2f::plan::llm::PlanMode;
    let mode = match mode.as_str() {
        "r2f" => PlanMode::R2f,
        "r2fplus" => PlanMode::R2fPlus,
        other => anyhow::bail!("unknown mode `{other}` (expected r2f or r2fplus)"),
    };
    if prompt.trim().is_empty() {
        anyhow::bail!("prompt is empty");
    }
    let planner = r2f::plan::llm::planner(&settings)?.ok_or_else(|| {
        anyhow::anyhow!("the LLM is disabled in the configuration ([llm] enabled)")
    })?;
    let metrics = r2f::metrics::Metrics::new();
    let plan = runtime()?
        .block_on(planner.plan_value(prompt.trim(), mode, &metrics))
        .map_err(|e| anyhow::anyhow!("planning failed: {e}"))?;
    println!("{}", serde_json::to_string_pretty(&plan)?);
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = Settings::load(cli.config.as_deref());
    let json_logs = cli.log_json
        || settings
            .as_ref()
            .map(|s| s.log.format == "json")
            .unwrap_or(false);
    if let Ok(s) = &settings {
        // Before any thread exists: the CA bundle for every TLS client.
        s.apply_tls();
    }
    init_tracing(json_logs);
    let result = settings.and_then(|settings| match cli.command {
        Command::Generate(a) => cmd_generate(&settings, *a),
        Command::Bench(a) => cmd_bench(a),
        Command::Schedule(a) => cmd_schedule(a),
        Command::Worker => cmd_worker(settings),
        Command::Plan { prompt, mode } => cmd_plan(settings, prompt, mode),
        Command::BenchService { jobs, steps, size } => runtime().and_then(|rt| {
            let r = rt.block_on(r2f::bench_service::run(&settings, jobs, steps, size))?;
            println!(
                "jobs={} succeeded={} wall_s={:.2}",
                r.jobs,
                r.succeeded,
                r.wall.as_secs_f64()
            );
            println!("jobs_per_second={:.2}", r.jobs_per_second);
            println!("model_ms_per_job={:.1}", r.model_ms);
            println!("worker_overhead_ms_per_job={:.1}", r.worker_overhead_ms);
            println!(
                "saturated_overhead_ms_per_job={:.1}",
                r.saturated_overhead_ms
            );
            Ok(())
        }),
        Command::Enqueue { file } => cmd_enqueue(settings, file),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes.
            let msg = e
                .chain()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(": ");
            eprintln!("error: {msg}");
            ExitCode::from(2)
        }
    }
}
