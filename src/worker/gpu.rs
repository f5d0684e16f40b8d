//! The GPU side of the worker: one thread owns the loaded model and runs jobs one at a time, so
//! the async side never blocks on tensor work. Panics and errors inside a job become that job's
//! `model` failure; a CUDA error that poisons the context marks the worker wedged.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::c2pa_sign::C2paSigner;
use crate::config::Settings;
use crate::generate::{
    generate_image, Encoding, Engine, GenerationRecord, Mode, ModelCaps, ModelIdentity, Params,
};
use crate::models::hub;
use crate::pipelines::Timings;
use crate::service::metrics::Metrics;

/// One image of a job, encoded.
pub struct GeneratedImage {
    /// The file (in the job's format), metadata included.
    pub bytes: Vec<u8>,
    pub width: i64,
    pub height: i64,
    /// Denoising steps taken for this image, every run counted (R2F+: object runs too).
    pub steps: usize,
    pub timings: Timings,
    /// What the image's metadata says (also in the job's `result.json`).
    pub record: GenerationRecord,
}

/// Why the GPU thread could not finish a task.
#[derive(Debug, Clone, PartialEq)]
pub enum GpuFailure {
    /// The model failed on this job (an error or a panic in the model code); the device is
    /// still usable.
    Job(String),
    /// The device is unusable (a CUDA error that poisons the context): the worker is sick.
    Device(String),
    /// The run was asked to stop and stopped between two denoising steps.
    Stopped(StopReason),
}

/// Why a run stopped before its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A client cancelled the job (`r2f cancel`).
    Cancelled,
    /// The job ran past `worker.job_timeout_secs` and its worker gave up on it.
    Abandoned,
    /// The worker is stopping (drain deadline, second signal): the job is handed back.
    Stopping,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::Cancelled => "cancelled by request",
            StopReason::Abandoned => "abandoned past job_timeout_secs",
            StopReason::Stopping => "the worker is stopping",
        })
    }
}

impl std::error::Error for StopReason {}

/// What a job and the GPU thread running it share: a stop request, read between denoising
/// steps (an atomic load, no device synchronisation), and whether the GPU thread is done with
/// the task. A task that was asked to stop but is not finished keeps the GPU busy.
#[derive(Debug, Default)]
pub struct TaskControl {
    stop: AtomicU8,
    finished: AtomicBool,
}

impl TaskControl {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Asks the run to stop after its current step; the first reason given wins.
    pub fn stop(&self, why: StopReason) {
        let code = match why {
            StopReason::Cancelled => 1,
            StopReason::Abandoned => 2,
            StopReason::Stopping => 3,
        };
        let _ = self
            .stop
            .compare_exchange(0, code, Ordering::SeqCst, Ordering::SeqCst);
    }

    pub fn stop_reason(&self) -> Option<StopReason> {
        match self.stop.load(Ordering::SeqCst) {
            1 => Some(StopReason::Cancelled),
            2 => Some(StopReason::Abandoned),
            3 => Some(StopReason::Stopping),
            _ => None,
        }
    }

    /// An error when a stop was asked for (what the pipelines' step hook returns).
    pub fn check(&self) -> Result<(), StopReason> {
        self.stop_reason().map_or(Ok(()), Err)
    }

    /// Whether the GPU thread has let go of the task (finished, failed or stopped).
    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::SeqCst)
    }

    fn finish(&self) {
        self.finished.store(true, Ordering::SeqCst);
    }
}

impl crate::service::metrics::HeldTask for TaskControl {
    fn is_finished(&self) -> bool {
        TaskControl::is_finished(self)
    }
}

pub struct GpuTask {
    pub model_name: String,
    pub prompt: String,
    pub mode: Mode,
    pub params: Params,
    pub num_images: usize,
    /// The output format.
    pub encoding: Encoding,
    /// Sign a C2PA manifest into each image (the worker has checked that it has a key).
    pub c2pa: bool,
    /// (step done, total steps over all images).
    pub progress: mpsc::UnboundedSender<(usize, usize)>,
    /// Stop requests, and the GPU thread's word that it is done with the task.
    pub control: Arc<TaskControl>,
    pub reply: oneshot::Sender<Result<Vec<GeneratedImage>, GpuFailure>>,
    /// The job's span: the GPU thread's spans (one per image, its stages inside) are its
    /// children.
    pub span: tracing::Span,
}

/// What the GPU thread reports once the model is loaded and warm.
pub struct Loaded {
    pub caps: ModelCaps,
    pub device: tch::Device,
}

pub struct GpuWorker {
    tx: std::sync::mpsc::Sender<GpuTask>,
}

/// CUDA errors after which the context cannot be trusted (the process must restart).
fn is_fatal_cuda_error(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    [
        "illegal memory access",
        "device-side assert",
        "unspecified launch failure",
        "cuda error: an illegal instruction",
        "misaligned address",
        "uncorrectable ecc",
        "cudaerrorlaunchfailure",
    ]
    .iter()
    .any(|p| m.contains(p))
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic in the model code".into()
    }
}

impl GpuWorker {
    /// Loads the configured model on a dedicated thread, which signs C2PA manifests with
    /// `signer` (read from `[c2pa]` at start); the returned receiver yields once the model is
    /// loaded and warm (or failed to load).
    pub fn start(
        settings: &Settings,
        metrics: Arc<Metrics>,
        signer: Option<C2paSigner>,
    ) -> anyhow::Result<(Self, oneshot::Receiver<anyhow::Result<Loaded>>)> {
        let (tx, rx) = std::sync::mpsc::channel::<GpuTask>();
        let (ready_tx, ready_rx) = oneshot::channel();
        let settings = settings.clone();
        std::thread::Builder::new()
            .name("r2f-gpu".into())
            .spawn(move || {
                let loaded = (|| -> anyhow::Result<(Engine, ModelIdentity, Option<C2paSigner>)> {
                    let w = &settings.worker;
                    let device = w.device.resolve()?;
                    let kind = w.dtype.resolve(device);
                    let source = settings.model_source(&w.model);
                    let start = Instant::now();
                    let variant = settings.models.get(&w.model).map(|m| m.variant);
                    let prefer = variant.unwrap_or_default().resolve(kind);
                    let folder = hub::resolve(&source, prefer)?;
                    let mut engine = Engine::load(&folder, device, kind)?;
                    let identity = ModelIdentity::of_folder(&w.model, &folder);
                    tracing::info!(
                        revision = identity.revision.as_deref().unwrap_or("-"),
                        weights_hash = identity.weights_hash.as_deref().unwrap_or("-"),
                        "model identity (recorded in every image)"
                    );
                    metrics
                        .model_load_seconds
                        .with_label_values(&[&w.model])
                        .set(start.elapsed().as_secs_f64());
                    if w.warmup {
                        let t = Instant::now();
                        let p = Params {
                            steps: Some(1),
                            ..Params::default()
                        };
                        generate_image(
                            &mut engine,
                            &identity,
                            "warm-up",
                            &Mode::Plain,
                            &p,
                            settings.limits.max_pixels,
                            Encoding::PNG,
                            &mut |_, _| Ok(()),
                        )?;
                        tracing::info!(seconds = t.elapsed().as_secs_f64(), "warm-up step done");
                    }
                    if let Some(s) = &signer {
                        tracing::info!(
                            algorithm = %s.algorithm(),
                            subject = s.subject(),
                            by_default = settings.c2pa.sign_by_default,
                            "C2PA signing enabled"
                        );
                    }
                    Ok((engine, identity, signer))
                })();
                let (mut engine, identity, signer) = match loaded {
                    Ok((e, identity, signer)) => {
                        let _ = ready_tx.send(Ok(Loaded {
                            caps: e.caps(),
                            device: e.device(),
                        }));
                        (e, identity, signer)
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let device = engine.device();
                // GPU memory is sampled off the job path (see `metrics::sample_gpu_memory`).
                while let Ok(task) = rx.recv() {
                    let result = run_task(&mut engine, &identity, signer.as_ref(), &settings, &task);
                    // The GPU is free: a task abandoned past its timeout no longer holds it.
                    task.control.finish();
                    let result = result.map_err(|e| match e {
                        TaskError::Stopped(why) => {
                            tracing::info!(reason = %why, "generation stopped between steps");
                            GpuFailure::Stopped(why)
                        }
                        TaskError::Failed(msg) if device.is_cuda() && is_fatal_cuda_error(&msg) => {
                            tracing::error!(error = %msg, "CUDA context is unusable: /healthz now fails");
                            metrics.set_wedged();
                            GpuFailure::Device(msg)
                        }
                        TaskError::Failed(msg) => GpuFailure::Job(msg),
                    });
                    let _ = task.reply.send(result);
                }
            })?;
        Ok((Self { tx }, ready_rx))
    }

    /// Queues a task; the reply comes on the task's oneshot.
    pub fn submit(&self, task: GpuTask) -> Result<(), String> {
        self.tx
            .send(task)
            .map_err(|_| "the GPU thread has stopped".to_string())
    }
}

/// Why `run_task` gave no images.
enum TaskError {
    Stopped(StopReason),
    Failed(String),
}

fn run_task(
    engine: &mut Engine,
    identity: &ModelIdentity,
    signer: Option<&C2paSigner>,
    settings: &Settings,
    task: &GpuTask,
) -> Result<Vec<GeneratedImage>, TaskError> {
    let mut images = Vec::with_capacity(task.num_images);
    for index in 0..task.num_images {
        // A task stopped while it waited for the GPU (or between images) does not start.
        task.control.check().map_err(TaskError::Stopped)?;
        // Image i of a job uses seed + i, so every image is reproducible on its own.
        let mut params = task.params.clone();
        params.seed = task.params.seed.wrapping_add(index as i64);
        let progress = task.progress.clone();
        let n = task.num_images;
        // `steps` counts every run of the image (R2F+: each object run, then the overall one).
        let run_steps = std::cell::Cell::new(0);
        let control = &task.control;
        let _image = tracing::info_span!(parent: &task.span, "generate", image = index).entered();
        let mut on_step = |s: usize, steps: usize| {
            run_steps.set(steps);
            let _ = progress.send((index * steps + s, n * steps));
            control.check()?;
            Ok(())
        };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _guard = tch::no_grad_guard();
            let model = ModelIdentity {
                name: task.model_name.clone(),
                ..identity.clone()
            };
            generate_image(
                engine,
                &model,
                &task.prompt,
                &task.mode,
                &params,
                settings.limits.max_pixels,
                task.encoding,
                &mut on_step,
            )
        }));
        let result = match (result, signer.filter(|_| task.c2pa)) {
            (Ok(Ok(mut g)), Some(signer)) => {
                let signed = serde_json::to_value(&g.record)
                    .map_err(anyhow::Error::from)
                    .and_then(|record| {
                        signer.sign(
                            &g.bytes,
                            task.encoding.format.content_type(),
                            &format!("{} ({})", task.prompt, index),
                            &record,
                        )
                    });
                match signed {
                    Ok(bytes) => {
                        g.bytes = bytes;
                        Ok(Ok(g))
                    }
                    Err(e) => Ok(Err(e.context("C2PA signing"))),
                }
            }
            (other, _) => other,
        };
        match result {
            Ok(Ok(g)) => images.push(GeneratedImage {
                bytes: g.bytes,
                width: g.resolved.width,
                height: g.resolved.height,
                // The denoising steps taken, all runs together (the per-step metric divides by it).
                steps: run_steps.get().max(g.resolved.steps),
                timings: g.output.timings,
                record: g.record,
            }),
            Ok(Err(e)) => {
                if let Some(why) = e.downcast_ref::<StopReason>() {
                    return Err(TaskError::Stopped(*why));
                }
                return Err(TaskError::Failed(
                    e.chain()
                        .map(|c| c.to_string())
                        .collect::<Vec<_>>()
                        .join(": "),
                ));
            }
            Err(p) => return Err(TaskError::Failed(panic_message(p))),
        }
    }
    Ok(images)
}

/// Sums the per-image timings.
pub fn total_timings(images: &[GeneratedImage]) -> Timings {
    let mut t = Timings::default();
    for i in images {
        t.encode += i.timings.encode;
        t.denoise += i.timings.denoise;
        t.guidance += i.timings.guidance;
        t.decode += i.timings.decode;
    }
    t
}

pub fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}
