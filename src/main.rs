//! `r2f`: the command-line entry point.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use r2f::config::Settings;
use r2f::device::{
    default_device, default_dtype, device_name, dtype_name, parse_device, parse_dtype,
};
use r2f::generate::{generate_png, validate, write_latents, Engine, Mode, Params};
use r2f::image::write_atomic;
use r2f::models::hub;

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
    Generate(GenerateArgs),
    /// Measure denoising and VAE speed at full size with random weights (no download).
    Bench(BenchArgs),
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
    /// plain (the base model). r2f and r2fplus need a plan.
    #[arg(long, default_value = "plain")]
    mode: String,
    /// fp32, fp16 or bf16 (default: fp16 on CUDA, fp32 on the CPU).
    #[arg(long)]
    dtype: Option<String>,
    /// cpu, cuda or cuda:N (default: cuda when available).
    #[arg(long)]
    device: Option<String>,
    /// T5 sequence length (diffusers' default 256).
    #[arg(long)]
    t5_tokens: Option<usize>,
    /// Also write the final latents (before VAE decode) as safetensors, tensor `latents`.
    #[arg(long)]
    latents_out: Option<PathBuf>,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// sd3 (SD3-medium at full size) or sd3-tiny (a small configuration for a smoke run).
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

fn cmd_generate(settings: &Settings, a: GenerateArgs) -> anyhow::Result<()> {
    let mode = Mode::parse(&a.mode)?;
    let params = Params {
        steps: a.steps,
        guidance: a.guidance,
        seed: a.seed,
        width: a.width,
        height: a.height,
        negative_prompt: a.negative_prompt.clone(),
        t5_tokens: a.t5_tokens,
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
        mode,
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
    let (transformer, vae) = match a.model.as_str() {
        "sd3" => (MmditConfig::sd3_medium(), VaeConfig::sd3()),
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
            (t, v)
        }
        other => anyhow::bail!("unknown bench model `{other}` (expected sd3 or sd3-tiny)"),
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
        transformer,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_json);
    let result = Settings::load(cli.config.as_deref()).and_then(|settings| match cli.command {
        Command::Generate(a) => cmd_generate(&settings, a),
        Command::Bench(a) => cmd_bench(a),
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
