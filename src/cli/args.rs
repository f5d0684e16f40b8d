//! The command line's arguments (clap): the commands and their options.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::bench::BenchModel;
use crate::device::{DType, DeviceSpec};
use crate::generate::JobMode;
use crate::image::ImageFormat;
use crate::models::hub::Family;
use crate::r2f::regions::RegionMask;
use crate::r2f::{PromptSchedule, StopStepMap, StopStepMapName};
use crate::schedulers::discrete::Scheduler;
use crate::service::planner::PlanMode;

#[derive(Parser)]
#[command(
    name = env!("CARGO_PKG_NAME"),
    version,
    about = "Rare-to-Frequent text-to-image generation on libtorch"
)]
pub struct Cli {
    /// Settings file read after config/default.toml (R2F__* environment variables override both).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Generate one image in-process, without a broker.
    Generate(Box<GenerateArgs>),
    /// Measure denoising and VAE speed at full size with random weights (no download).
    Bench(BenchArgs),
    /// Print the prompt that conditions each step of an R2F plan, as a JSON array.
    Schedule(PromptScheduleArgs),
    /// Run the bundled tiny-model parity cases on a device and dtype and report the distance
    /// to the diffusers references (the GPU check's correctness half).
    Parity(ParityArgs),
    /// Print a job's status record (from Redis), as JSON.
    Status {
        /// The job's id.
        id: String,
        /// The job's tenant (multi-tenant fleets).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Wait until a job is finished and print its status record; exit 0 only if it succeeded.
    Wait {
        /// The job's id.
        id: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600.0)]
        timeout: f64,
        /// The job's tenant (multi-tenant fleets).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Cancel a job: dropped when a worker takes it if queued, stopped at its next denoising
    /// step if running; prints what was done as JSON. Exit 65 when it had already finished or
    /// no such job is known.
    Cancel {
        /// The job's id.
        id: String,
        /// The job's tenant (multi-tenant fleets).
        #[arg(long)]
        tenant: Option<String>,
        /// Record the request even without a status record (a job published straight to the
        /// broker that no worker has taken yet).
        #[arg(long)]
        force: bool,
    },
    /// Print the JSON Schema of a document clients exchange with r2f.
    Schema {
        /// The document.
        #[arg(value_enum)]
        document: crate::job::schema::Document,
    },
    /// The daemon: consume jobs, plan, generate, store, publish results, serve metrics.
    Worker,
    /// Ask the configured LLM (through the plan cache) and print the plan as JSON.
    Plan {
        /// The prompt to plan.
        #[arg(long)]
        prompt: String,
        /// The kind of plan: r2f (rare and frequent concepts) or r2fplus (with object boxes).
        #[arg(long, value_enum, default_value_t = PlanMode::R2f)]
        mode: PlanMode,
    },
    /// Measure jobs per second through the broker and the per-job service overhead against a
    /// running worker (plain jobs of the worker's model).
    BenchService {
        /// Jobs to publish.
        #[arg(long, default_value_t = 50)]
        jobs: usize,
        /// Denoising steps of each job.
        #[arg(long, default_value_t = 1)]
        steps: u32,
        /// Width and height of each job's image.
        #[arg(long, default_value_t = 64)]
        size: u32,
    },
    /// The HTTP door (docs/contract.md, "HTTP API"): submit, follow and cancel jobs over HTTP
    /// with API keys; serves until a signal, then drains within `gateway.drain_secs`.
    Gateway,
    /// Print the generation metadata an image r2f wrote carries (PNG, JPEG or WebP) as JSON,
    /// with whether it is marked as AI-generated. Exit 65 for a file without it.
    Inspect {
        /// The image file.
        image: PathBuf,
    },
    /// Make an API key: prints the key (line 1, give it to the client) and its SHA-256 digest
    /// (line 2, append it to a key file the gateway reads). With --hash, print the digest of a
    /// key read from standard input.
    Key {
        /// Print the digest of a key read from standard input instead of making one.
        #[arg(long)]
        hash: bool,
    },
    /// The configuration: `r2f config check` prints the effective settings (secrets redacted)
    /// and probes each dependency.
    Config {
        #[command(subcommand)]
        action: ConfigCommand,
    },
    /// Publish dead-lettered jobs again: select them by reason, status, model or id; a dry run
    /// unless --apply. Each selected job leaves the dead-letter queue for its model's queue
    /// with its routing, attempt and delivery headers removed and its stored failure cleared.
    Replay(ReplayArgs),
    /// Measure `POST /v1/jobs`: submissions per second and p50/p90/p99 latency at a fixed rate.
    /// Without --url, runs a gateway in this process on the configured broker and Redis, under
    /// names of its own that it removes afterwards.
    BenchGateway(BenchGatewayArgs),
    /// Run RareBench (the R2F paper's benchmark) from a folder in the official layout: make
    /// the images of each configuration of a run file, score them with an OpenAI-compatible
    /// vision judge, and write avg_scores_<judge>.json, report.md and report.html into the run
    /// folder. Resumable: what the run folder holds is not made or judged again. Exit 1 when
    /// the --compare gate fails, 75 when images or judgements are still missing.
    Rarebench(Box<RarebenchArgs>),
    /// Publish jobs (one JSON object a line) with publisher confirms.
    /// Lines a worker would reject are refused first, without the broker, each with its line
    /// number and reason; the others are published. Exit 0 when every line was published, 65
    /// when a line was refused, 69 when the broker failed.
    Enqueue {
        /// A JSON-lines file (`-` for standard input).
        file: PathBuf,
        /// Only check the lines (no broker): print what would be refused.
        #[arg(long, conflicts_with = "no_validate")]
        check: bool,
        /// Publish every JSON object with an `id` and a model that has a queue, unvalidated
        /// (to test how workers reject jobs).
        #[arg(long)]
        no_validate: bool,
    },
}

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration (defaults, file, environment; secrets redacted), then
    /// probe the broker, Redis, storage, the LLM and the model: one verdict a line. Exit 0
    /// when all answer, 69 when one does not.
    Check {
        /// Print the configuration only; probe nothing.
        #[arg(long)]
        no_probe: bool,
    },
}

#[derive(clap::Args)]
pub struct ReplayArgs {
    /// Only dead letters whose reason contains this text (case-insensitive).
    #[arg(long)]
    pub reason: Option<String>,
    /// Only dead letters of this status: failed or rejected.
    #[arg(long)]
    pub status: Option<String>,
    /// Only jobs for this model.
    #[arg(long)]
    pub model: Option<String>,
    /// Only these job ids (repeat the option for several).
    #[arg(long = "id")]
    pub ids: Vec<String>,
    /// At most this many dead letters are looked at.
    #[arg(long, default_value_t = 10_000)]
    pub limit: usize,
    /// Publish the selected jobs again (without it: print what would be replayed).
    #[arg(long)]
    pub apply: bool,
    /// The jobs' tenant (multi-tenant fleets: only its dead letters, and its stored results).
    #[arg(long)]
    pub tenant: Option<String>,
}

#[derive(clap::Args)]
pub struct PromptScheduleArgs {
    /// An R2F or R2F+ plan in the official JSON shape.
    #[arg(long)]
    pub plan: PathBuf,
    /// R2F+ plans: a model folder (diffusers layout) whose `tokenizer/` and `tokenizer_3/` give
    /// the objects' token rows.
    #[arg(long)]
    pub tokenizers: Option<PathBuf>,
    /// R2F+ plans: the T5 length the token rows are computed at.
    #[arg(long, default_value_t = 256)]
    pub t5_tokens: usize,
    #[command(flatten)]
    pub regions: RegionArgs,
    /// The number of denoising steps.
    #[arg(long)]
    pub steps: usize,
    /// The model family (selects the level -> stop-step map).
    #[arg(long, value_enum)]
    pub model: Family,
    /// How R2F picks each step's prompt.
    #[arg(long, value_enum, default_value_t = PromptSchedule::Faithful)]
    pub schedule: PromptSchedule,
    /// paper ([0,5,10,20,30,40]) or head ([0,3,5,10,20,30]); default: the model's own map.
    #[arg(long, value_enum)]
    pub stop_step_map: Option<StopStepMapName>,
}

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// The text to draw.
    #[arg(long, required_unless_present = "from")]
    pub prompt: Option<String>,
    /// A logical model name from the config (sd3), a diffusers-layout folder, or a Hub model id
    /// (with --from: default the image's).
    #[arg(long, required_unless_present = "from")]
    pub model: Option<String>,
    /// Make an image r2f wrote (PNG, JPEG or WebP) again from its metadata record: its prompt,
    /// plan, seed and every setting, on its device and dtype unless --device/--dtype say
    /// otherwise. The same weights on the same machine give the same bytes.
    #[arg(long, value_name = "IMAGE", conflicts_with_all = [
        "prompt", "steps", "guidance", "seed", "width", "height", "negative_prompt", "mode",
        "plan", "schedule", "stop_step_map", "t5_tokens", "scheduler", "region_mask",
        "bbox_guidance_steps", "bbox_guidance_iterations", "bbox_loss_scale",
        "latent_fusion_steps", "bbox_guidance_recompute",
    ])]
    pub from: Option<PathBuf>,
    /// The image to write; its extension picks the format (.png, .jpg/.jpeg, .webp) unless
    /// --format is given.
    #[arg(long)]
    pub out: PathBuf,
    /// The output format, whatever the extension of --out.
    #[arg(long, value_enum)]
    pub format: Option<ImageFormat>,
    /// The quality of a JPEG or WebP, 1–100 (default 90; with --from, the image's).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub quality: Option<u8>,
    /// Sign a C2PA manifest into the image with the configured [c2pa] key (default: the
    /// configuration's c2pa.sign_by_default).
    #[arg(long)]
    pub c2pa: bool,
    /// Denoising steps (default: the model's and mode's).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale (default: the model's).
    #[arg(long)]
    pub guidance: Option<f64>,
    /// The seed of the initial noise.
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    /// Image width, a multiple of 16 (default: the model's native size).
    #[arg(long)]
    pub width: Option<i64>,
    /// Image height, a multiple of 16 (default: the model's native size).
    #[arg(long)]
    pub height: Option<i64>,
    /// What the image should not show.
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Default: the kind of the --plan file (r2f or r2fplus), else plain.
    #[arg(long, value_enum)]
    pub mode: Option<JobMode>,
    /// An R2F or R2F+ plan in the official JSON shape (skips the LLM).
    #[arg(long)]
    pub plan: Option<PathBuf>,
    #[command(flatten)]
    pub regions: RegionArgs,
    /// How R2F picks each step's prompt.
    #[arg(long, value_enum, default_value_t = PromptSchedule::Faithful)]
    pub schedule: PromptSchedule,
    /// paper ([0,5,10,20,30,40]) or head ([0,3,5,10,20,30]); default: the model's own map.
    #[arg(long, value_enum)]
    pub stop_step_map: Option<StopStepMapName>,
    /// Default: fp16 on CUDA, fp32 on the CPU.
    #[arg(long, value_enum, ignore_case = true)]
    pub dtype: Option<DType>,
    /// cpu, cuda or cuda:N (default: cuda when available).
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// T5 sequence length (SD3; diffusers' default 256, R2F 77, R2F+ 256).
    #[arg(long)]
    pub t5_tokens: Option<usize>,
    /// SDXL sampler (default: the model's scheduler in plain mode, DPM-Solver++ 2M Karras in
    /// R2F mode).
    #[arg(long, value_enum)]
    pub scheduler: Option<Scheduler>,
    /// Also write the final latents (before VAE decode) as safetensors, tensor `latents`.
    #[arg(long)]
    pub latents_out: Option<PathBuf>,
}

/// The R2F+ knobs (official defaults).
#[derive(clap::Args, Debug, Clone)]
pub struct RegionArgs {
    /// R2F+: the object masks of the latent fusion.
    #[arg(long, value_enum, default_value_t = RegionMask::Ellipse)]
    pub region_mask: RegionMask,
    /// R2F+: steps with bbox attention guidance.
    #[arg(long, default_value_t = 10)]
    pub bbox_guidance_steps: usize,
    /// R2F+: gradient steps on the latent per guided step.
    #[arg(long, default_value_t = 5)]
    pub bbox_guidance_iterations: usize,
    /// R2F+: scale of the bbox loss.
    #[arg(long, default_value_t = 30.0)]
    pub bbox_loss_scale: f64,
    /// R2F+: steps after which the object latents are pasted into the overall image.
    #[arg(long, default_value_t = 20)]
    pub latent_fusion_steps: usize,
    /// R2F+: recompute the transformer block by block in the guidance's backward pass (the
    /// memory of one block's activations instead of all; one more forward per iteration).
    #[arg(long)]
    pub bbox_guidance_recompute: bool,
}

impl RegionArgs {
    /// The knobs, with the prompt schedule and stop-step map of the other options.
    pub fn knobs(
        &self,
        schedule: PromptSchedule,
        stop_steps: Option<StopStepMapName>,
    ) -> crate::pipelines::sd3::plus::RegionKnobs {
        crate::pipelines::sd3::plus::RegionKnobs {
            mask: self.region_mask,
            guidance_steps: self.bbox_guidance_steps,
            guidance_iterations: self.bbox_guidance_iterations,
            loss_scale: self.bbox_loss_scale,
            fusion_steps: self.latent_fusion_steps,
            schedule,
            stop_steps: stop_steps.map_or(StopStepMap::SD3, StopStepMapName::map),
            recompute_blocks: self.bbox_guidance_recompute,
            full_object_runs: false,
        }
    }
}

#[derive(clap::Args)]
pub struct ParityArgs {
    /// The fixtures folder (default: tests/fixtures of the repository).
    #[arg(long)]
    pub fixtures: Option<PathBuf>,
    /// Default: fp16 on CUDA, fp32 on the CPU.
    #[arg(long, value_enum, ignore_case = true)]
    pub dtype: Option<DType>,
    /// cpu, cuda or cuda:N (default: cuda when available).
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// Fail (exit 1) when a case's final latents are further than this, relative.
    #[arg(long)]
    pub tolerance: Option<f64>,
    /// Also write the report as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct BenchGatewayArgs {
    /// Requests per second.
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// How long to send.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// A running gateway (`http://host:port`); needs --key.
    #[arg(long)]
    pub url: Option<String>,
    /// An API key of that gateway.
    #[arg(long, env = "R2F_API_KEY", hide_env_values = true)]
    pub key: Option<String>,
}

#[derive(clap::Args)]
pub struct RarebenchArgs {
    /// The benchmark folder in the official layout (its `test/original_prompt/rarebench/`,
    /// and for R2F/R2F+ configurations `test/r2f_prompt/` and `test/r2fplus_prompt/`).
    #[arg(long)]
    pub data: PathBuf,
    /// The run folder: images, manifest.jsonl and the reports (created; a run there resumes).
    #[arg(long)]
    pub out: PathBuf,
    /// The run spec (TOML, or JSON by its `.json` extension): the configurations compared
    /// (`[[configs]]`) and the judge (`[judge]`). Not `--config`: that is r2f's settings file.
    #[arg(long)]
    pub spec: PathBuf,
    /// Only these categories (comma-separated, e.g. single_1property,multi_1and; default: every
    /// category the folder has a prompt file of).
    #[arg(long, value_delimiter = ',', value_parser = crate::bench::rarebench::spec::Category::parse)]
    pub categories: Vec<crate::bench::rarebench::spec::Category>,
    /// Only the first N prompts of each category (a quick run).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Make the images in this process (as `r2f generate`) instead of through the broker.
    #[arg(long)]
    pub local: bool,
    /// --local: cpu, cuda or cuda:N (default: cuda when available).
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// --local: the dtype of configurations without `precision` (default: fp16 on CUDA, fp32
    /// on the CPU).
    #[arg(long, value_enum, ignore_case = true)]
    pub dtype: Option<DType>,
    /// Make no images: judge those the run folder holds and report.
    #[arg(long, conflicts_with = "no_judge")]
    pub judge_only: bool,
    /// Make the images, ask no judge; report the scores already in the run folder.
    #[arg(long)]
    pub no_judge: bool,
    /// Compare configuration B against A, category by category (paired by prompt and seed):
    /// fail (exit 1) when B is worse by more than --threshold points at --confidence.
    #[arg(long, num_args = 2, value_names = ["A", "B"])]
    pub compare: Option<Vec<String>>,
    /// --compare: the largest drop (0–100 score points) B may show in a category.
    #[arg(long, default_value_t = 5.0, requires = "compare")]
    pub threshold: f64,
    /// --compare: the confidence of the bootstrap interval of B − A.
    #[arg(long, default_value_t = 0.95, requires = "compare")]
    pub confidence: f64,
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// sd3 (SD3-medium) or sdxl (SDXL base) at full size, or sd3-tiny / sdxl-tiny (small
    /// configurations for a smoke run).
    #[arg(long, value_enum, default_value = "sd3")]
    pub model: BenchModel,
    /// Image width.
    #[arg(long, default_value_t = 1024)]
    pub width: i64,
    /// Image height.
    #[arg(long, default_value_t = 1024)]
    pub height: i64,
    /// Timed denoising steps.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Text tokens in the context (77 CLIP + 256 T5 in diffusers' default).
    #[arg(long, default_value_t = 333)]
    pub context_tokens: i64,
    /// Default: fp16 on CUDA, fp32 on the CPU.
    #[arg(long, value_enum, ignore_case = true)]
    pub dtype: Option<DType>,
    /// cpu, cuda or cuda:N (default: cuda when available).
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// Whole jobs through the worker's generate path (plain, R2F), every component with random
    /// weights built in memory, instead of the denoiser and VAE alone.
    #[arg(long)]
    pub e2e: bool,
    /// --e2e: also an R2F+ job with two objects (SD3).
    #[arg(long, requires = "e2e")]
    pub r2fplus: bool,
    /// --e2e: steps of the R2F (and R2F+) job.
    #[arg(long, default_value_t = 50, requires = "e2e")]
    pub r2f_steps: usize,
    /// --e2e: steps of the plain job (default 28 for SD3, 30 for SDXL).
    #[arg(long, requires = "e2e")]
    pub plain_steps: Option<usize>,
    /// --e2e, --write-model: a model folder whose tokenizer folders to use (default: the
    /// bundled fixtures).
    #[arg(long)]
    pub tokenizers: Option<PathBuf>,
    /// Also write the report as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// A diffusers-layout folder whose `transformer/` (SD3 presets) or `unet/` (SDXL presets)
    /// replaces the random denoiser: the same weights diffusers loads, for a side-by-side
    /// measurement (scripts/bench_vs_diffusers.py).
    #[arg(long, conflicts_with = "e2e")]
    pub weights: Option<PathBuf>,
    /// Write an SD3 model folder (diffusers layout) with random weights in --dtype instead of
    /// measuring (`--model sd3` or `sd3-tiny`): for the cold-start measurement.
    #[arg(long, conflicts_with_all = ["e2e", "weights"])]
    pub write_model: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generate_args(extra: &[&str]) -> Result<GenerateArgs, clap::Error> {
        let base = [
            "r2f", "generate", "--prompt", "p", "--model", "m", "--out", "o.png",
        ];
        let cli = Cli::try_parse_from(base.iter().chain(extra))?;
        match cli.command {
            Command::Generate(a) => Ok(*a),
            _ => unreachable!("a generate command"),
        }
    }

    #[test]
    fn every_spelling_accepted_before_is_accepted() {
        for (s, want) in [
            ("euler", Scheduler::EulerDiscrete),
            ("euler-discrete", Scheduler::EulerDiscrete),
            ("dpm++2m-karras", Scheduler::DpmSolverPp2mKarras),
            ("dpmsolver++-2m-karras", Scheduler::DpmSolverPp2mKarras),
            ("dpm-solver++-2m-karras", Scheduler::DpmSolverPp2mKarras),
        ] {
            let a = generate_args(&["--scheduler", s]).unwrap();
            assert_eq!(a.scheduler, Some(want), "{s}");
        }
        for (s, want) in [
            ("paper", StopStepMapName::Paper),
            ("sd3", StopStepMapName::Paper),
            ("head", StopStepMapName::Head),
            ("sdxl", StopStepMapName::Head),
        ] {
            let a = generate_args(&["--stop-step-map", s]).unwrap();
            assert_eq!(a.stop_step_map, Some(want), "{s}");
        }
        for (s, want) in [
            ("fp32", DType::Fp32),
            ("float32", DType::Fp32),
            ("F32", DType::Fp32),
            ("fp16", DType::Fp16),
            ("half", DType::Fp16),
            ("float16", DType::Fp16),
            ("f16", DType::Fp16),
            ("BF16", DType::Bf16),
            ("bfloat16", DType::Bf16),
        ] {
            let a = generate_args(&["--dtype", s]).unwrap();
            assert_eq!(a.dtype, Some(want), "{s}");
        }
        for (s, want) in [
            ("r2f", JobMode::R2f),
            ("r2fplus", JobMode::R2fplus),
            ("plain", JobMode::Plain),
        ] {
            assert_eq!(generate_args(&["--mode", s]).unwrap().mode, Some(want));
        }
        let a = generate_args(&["--schedule", "clean", "--device", "cuda:1"]).unwrap();
        assert_eq!(a.schedule, PromptSchedule::Clean);
        assert_eq!(a.device, Some(DeviceSpec::Cuda(1)));
        assert_eq!(
            generate_args(&[]).unwrap().schedule,
            PromptSchedule::Faithful
        );
    }

    #[test]
    fn r2fplus_knobs_default_to_the_official_values_and_parse() {
        let a = generate_args(&["--mode", "r2fplus"]).unwrap();
        assert_eq!(a.mode, Some(JobMode::R2fplus));
        let k = a.regions.knobs(a.schedule, a.stop_step_map);
        assert_eq!(k, crate::pipelines::sd3::plus::RegionKnobs::default());
        let a = generate_args(&[
            "--region-mask",
            "box",
            "--bbox-guidance-steps",
            "3",
            "--bbox-guidance-iterations",
            "2",
            "--bbox-loss-scale",
            "100",
            "--latent-fusion-steps",
            "7",
            "--bbox-guidance-recompute",
        ])
        .unwrap();
        let k = a.regions.knobs(PromptSchedule::Clean, None);
        assert_eq!(k.mask, RegionMask::Box);
        assert_eq!(
            (k.guidance_steps, k.guidance_iterations, k.fusion_steps),
            (3, 2, 7)
        );
        assert_eq!(k.loss_scale, 100.0);
        assert!(k.recompute_blocks);
        // Bench modes: --r2fplus only with --e2e; --write-model not with --e2e.
        assert!(Cli::try_parse_from(["r2f", "bench", "--r2fplus"]).is_err());
        assert!(Cli::try_parse_from(["r2f", "bench", "--e2e", "--r2fplus"]).is_ok());
        assert!(Cli::try_parse_from(["r2f", "bench", "--e2e", "--write-model", "d"]).is_err());
        assert!(Cli::try_parse_from(["r2f", "schema", "result"]).is_ok());
        assert!(Cli::try_parse_from(["r2f", "schema", "cheese"]).is_err());
    }

    #[test]
    fn a_wrong_value_lists_the_possible_ones() {
        for (flag, value, listed) in [
            ("--scheduler", "ddim", "euler, dpm++2m-karras"),
            ("--dtype", "fp8", "fp32, fp16, bf16"),
            ("--mode", "sideways", "r2f, r2fplus, plain"),
            ("--schedule", "fast", "faithful, clean"),
            ("--stop-step-map", "tail", "paper, head"),
            ("--region-mask", "star", "ellipse, box"),
        ] {
            let e = generate_args(&[flag, value]).err().unwrap().to_string();
            assert!(e.contains("possible values") && e.contains(listed), "{e}");
        }
        let e = generate_args(&["--device", "tpu"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("expected cpu, cuda or cuda:N"), "{e}");
    }

    #[test]
    fn bench_plan_and_schedule_take_their_closed_sets() {
        let cli = Cli::try_parse_from(["r2f", "bench", "--model", "sdxl-tiny"]).unwrap();
        assert!(matches!(cli.command, Command::Bench(a) if a.model == BenchModel::SdxlTiny));
        let cli = Cli::try_parse_from(["r2f", "plan", "--prompt", "p"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Plan {
                mode: PlanMode::R2f,
                ..
            }
        ));
        let cli = Cli::try_parse_from([
            "r2f", "schedule", "--plan", "x", "--steps", "5", "--model", "sdxl",
        ])
        .unwrap();
        assert!(matches!(cli.command, Command::Schedule(a) if a.model == Family::Sdxl));
    }

    #[test]
    fn every_command_option_and_argument_says_what_it_is() {
        use clap::CommandFactory;
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                let help = a.get_help().map(ToString::to_string).unwrap_or_default();
                if help.trim().is_empty() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for s in cmd.get_subcommands() {
                if s.get_name() == "help" {
                    continue;
                }
                if s.get_about().is_none() {
                    missing.push(format!("{path} {}", s.get_name()));
                }
                walk(s, &format!("{path} {}", s.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "r2f", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }
}
