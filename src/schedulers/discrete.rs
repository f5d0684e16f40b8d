//! The discrete-time schedulers SDXL uses, as diffusers 0.42 computes them: Euler discrete (SDXL's
//! published scheduler: scaled-linear betas, "leading" spacing, `init_noise_sigma`,
//! `scale_model_input`) and DPM-Solver++ 2M with Karras sigmas (what the official R2F-SDXL runs
//! use: second-order midpoint updates, first-order first and last steps, terminal sigma 0).
//!
//! The training schedule is built with libtorch's own float32 kernels (linspace, cumprod), as
//! diffusers does, so the sigmas match bit for bit.

use std::path::Path;

use serde::Deserialize;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Deserialize)]
pub struct DiscreteConfig {
    #[serde(default = "default_train")]
    pub num_train_timesteps: i64,
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    #[serde(default = "default_schedule")]
    pub beta_schedule: String,
    #[serde(default = "default_prediction")]
    pub prediction_type: String,
    #[serde(default)]
    pub steps_offset: i64,
    #[serde(default = "default_spacing")]
    pub timestep_spacing: String,
    #[serde(default)]
    pub use_karras_sigmas: bool,
}

fn default_train() -> i64 {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn default_schedule() -> String {
    "linear".into()
}
fn default_prediction() -> String {
    "epsilon".into()
}
fn default_spacing() -> String {
    "linspace".into()
}

impl DiscreteConfig {
    /// stable-diffusion-xl-base-1.0 `scheduler/scheduler_config.json`.
    pub fn sdxl() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            prediction_type: "epsilon".into(),
            steps_offset: 1,
            timestep_spacing: "leading".into(),
            use_karras_sigmas: false,
        }
    }

    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("scheduler_config.json");
        let cfg: Self = crate::models::read_config(&path, "scheduler")?;
        if cfg.prediction_type != "epsilon" {
            anyhow::bail!("{}: only epsilon prediction is supported", path.display());
        }
        if !["linear", "scaled_linear"].contains(&cfg.beta_schedule.as_str()) {
            anyhow::bail!(
                "{}: beta_schedule `{}` is not supported",
                path.display(),
                cfg.beta_schedule
            );
        }
        Ok(cfg)
    }

    /// Training sigmas `sqrt((1 - alpha_bar) / alpha_bar)`, index = training timestep.
    pub fn train_sigmas(&self) -> Vec<f32> {
        let _g = tch::no_grad_guard();
        let n = self.num_train_timesteps;
        let opts = (Kind::Float, tch::Device::Cpu);
        let betas = if self.beta_schedule == "scaled_linear" {
            Tensor::linspace(self.beta_start.sqrt(), self.beta_end.sqrt(), n, opts)
                .pow_tensor_scalar(2)
        } else {
            Tensor::linspace(self.beta_start, self.beta_end, n, opts)
        };
        let alphas = betas.neg() + 1.0;
        let alpha_bar = alphas.cumprod(0, Kind::Float);
        let sigmas = ((alpha_bar.neg() + 1.0) / &alpha_bar).sqrt();
        Vec::<f32>::try_from(sigmas).unwrap_or_default()
    }
}

/// Which sampler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerKind {
    EulerDiscrete,
    DpmSolverPp2mKarras,
}

impl SamplerKind {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "euler" | "euler-discrete" => Ok(Self::EulerDiscrete),
            "dpm++2m-karras" | "dpmsolver++-2m-karras" | "dpm-solver++-2m-karras" => {
                Ok(Self::DpmSolverPp2mKarras)
            }
            other => Err(format!(
                "unknown scheduler `{other}` (expected euler or dpm++2m-karras)"
            )),
        }
    }
}

/// A discrete schedule for one run: timesteps fed to the UNet and sigmas (terminal 0 appended).
#[derive(Debug, Clone)]
pub struct DiscreteSchedule {
    pub kind: SamplerKind,
    pub timesteps: Vec<f32>,
    pub sigmas: Vec<f32>,
    pub init_noise_sigma: f32,
}

/// numpy's `round` (half to even).
fn round_even(x: f64) -> f64 {
    x.round_ties_even()
}

/// diffusers' `_sigma_to_t`: log-sigma interpolation back to a (fractional) training timestep.
fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // Index of the last training log-sigma <= log_sigma (0 when none), clipped to n - 2.
    let mut low = 0usize;
    let mut count = 0usize;
    let mut best = 0usize;
    for (i, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - ls as f64 >= 0.0 {
            count += 1;
        }
        if count > best {
            best = count;
            low = i;
        }
    }
    let low = low.min(n - 2);
    let high = low + 1;
    let (lo, hi) = (log_sigmas[low] as f64, log_sigmas[high] as f64);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * high as f64
}

impl DiscreteSchedule {
    pub fn new(cfg: &DiscreteConfig, kind: SamplerKind, steps: usize) -> anyhow::Result<Self> {
        if steps == 0 {
            anyhow::bail!("at least one step is needed");
        }
        let train = cfg.train_sigmas();
        let n = cfg.num_train_timesteps;
        match kind {
            SamplerKind::EulerDiscrete => {
                let timesteps: Vec<f32> = match cfg.timestep_spacing.as_str() {
                    "leading" => {
                        let ratio = n / steps as i64;
                        (0..steps as i64)
                            .rev()
                            .map(|i| (i * ratio) as f32 + cfg.steps_offset as f32)
                            .collect()
                    }
                    "trailing" => {
                        let ratio = n as f64 / steps as f64;
                        let mut t = Vec::new();
                        let mut x = n as f64;
                        while x > 0.0 {
                            t.push(round_even(x) as f32 - 1.0);
                            x -= ratio;
                        }
                        t
                    }
                    "linspace" => {
                        let last = (n - 1) as f64;
                        (0..steps)
                            .rev()
                            .map(|i| {
                                if steps == 1 {
                                    0.0
                                } else {
                                    (i as f64 * last / (steps - 1) as f64) as f32
                                }
                            })
                            .collect()
                    }
                    other => anyhow::bail!("timestep_spacing `{other}` is not supported"),
                };
                let mut sigmas: Vec<f32> = timesteps
                    .iter()
                    .map(|&t| {
                        let i = t.floor() as usize;
                        let frac = (t - t.floor()) as f64;
                        if frac == 0.0 || i + 1 >= train.len() {
                            train[i.min(train.len() - 1)]
                        } else {
                            (train[i] as f64 * (1.0 - frac) + train[i + 1] as f64 * frac) as f32
                        }
                    })
                    .collect();
                sigmas.push(0.0);
                let max = sigmas.iter().cloned().fold(0.0f32, f32::max);
                let init_noise_sigma = match cfg.timestep_spacing.as_str() {
                    "linspace" | "trailing" => max,
                    _ => (max * max + 1.0).sqrt(),
                };
                Ok(Self {
                    kind,
                    timesteps,
                    sigmas,
                    init_noise_sigma,
                })
            }
            SamplerKind::DpmSolverPp2mKarras => {
                let log_sigmas: Vec<f32> = train.iter().map(|s| s.ln()).collect();
                let sigma_min = train[0] as f64;
                let sigma_max = train[train.len() - 1] as f64;
                let rho = 7.0f64;
                let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
                let karras: Vec<f64> = (0..steps)
                    .map(|i| {
                        let ramp = if steps == 1 {
                            0.0
                        } else {
                            i as f64 / (steps - 1) as f64
                        };
                        (max_inv + ramp * (min_inv - max_inv)).powf(rho)
                    })
                    .collect();
                let timesteps = karras
                    .iter()
                    .map(|&s| round_even(sigma_to_t(s, &log_sigmas)) as f32)
                    .collect();
                let mut sigmas: Vec<f32> = karras.iter().map(|&s| s as f32).collect();
                sigmas.push(0.0);
                Ok(Self {
                    kind,
                    timesteps,
                    sigmas,
                    init_noise_sigma: 1.0,
                })
            }
        }
    }

    pub fn steps(&self) -> usize {
        self.timesteps.len()
    }

    /// The model input at step `i` (Euler divides by sqrt(sigma^2 + 1); DPM-Solver is identity).
    pub fn scale_model_input(&self, sample: &Tensor, i: usize) -> Tensor {
        match self.kind {
            SamplerKind::EulerDiscrete => {
                let s = self.sigmas[i];
                sample / ((s * s + 1.0).sqrt() as f64)
            }
            SamplerKind::DpmSolverPp2mKarras => sample.shallow_clone(),
        }
    }
}

/// The state a sampler carries between steps (DPM-Solver++ keeps the previous x0 prediction).
pub struct Sampler {
    pub schedule: DiscreteSchedule,
    previous_x0: Option<Tensor>,
    lower_order_nums: usize,
}

/// `(alpha_t, sigma_t)` of the VP form for a sigma (float32, as `_sigma_to_alpha_sigma_t`).
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

impl Sampler {
    pub fn new(schedule: DiscreteSchedule) -> Self {
        Self {
            schedule,
            previous_x0: None,
            lower_order_nums: 0,
        }
    }

    /// One step from `sample` with the (guided) noise prediction `eps` at step `i`; the result
    /// is in `eps`'s dtype, the arithmetic in float32.
    pub fn step(&mut self, eps: &Tensor, i: usize, sample: &Tensor) -> Tensor {
        let out_kind = eps.kind();
        let s = &self.schedule;
        match s.kind {
            SamplerKind::EulerDiscrete => {
                let sample = sample.to_kind(Kind::Float);
                let sigma = s.sigmas[i] as f64;
                let x0 = &sample - eps.to_kind(Kind::Float) * sigma;
                let derivative = (&sample - x0) / sigma;
                let dt = (s.sigmas[i + 1] - s.sigmas[i]) as f64;
                (sample + derivative * dt).to_kind(out_kind)
            }
            SamplerKind::DpmSolverPp2mKarras => {
                let n = s.steps();
                // Data prediction x0 = (x - sigma_t eps) / alpha_t, in the sample's dtype.
                let (alpha_s0, sigma_s0) = alpha_sigma(s.sigmas[i]);
                let x0 = (sample - eps * sigma_s0 as f64) / alpha_s0 as f64;
                let sample32 = sample.to_kind(Kind::Float);
                let x0_32 = x0.to_kind(Kind::Float);
                let (alpha_t, sigma_t) = alpha_sigma(s.sigmas[i + 1]);
                let lambda_t = alpha_t.ln() - sigma_t.ln();
                let lambda_s0 = alpha_s0.ln() - sigma_s0.ln();
                let h = lambda_t - lambda_s0;
                let coef = alpha_t * ((-h).exp() - 1.0);
                let ratio = sigma_t / sigma_s0;
                let last = i == n - 1;
                let first_order = self.lower_order_nums < 1 || last || self.previous_x0.is_none();
                let prev = if first_order {
                    sample32 * ratio as f64 - &x0_32 * coef as f64
                } else {
                    let m1 = self.previous_x0.as_ref().expect("previous x0");
                    let (alpha_s1, sigma_s1) = alpha_sigma(s.sigmas[i - 1]);
                    let lambda_s1 = alpha_s1.ln() - sigma_s1.ln();
                    let r0 = (lambda_s0 - lambda_s1) / h;
                    let d1 = (&x0_32 - m1) * (1.0 / r0) as f64;
                    sample32 * ratio as f64 - &x0_32 * coef as f64 - d1 * (0.5 * coef) as f64
                };
                self.previous_x0 = Some(x0_32);
                if self.lower_order_nums < 2 {
                    self.lower_order_nums += 1;
                }
                prev.to_kind(out_kind)
            }
        }
    }
}
