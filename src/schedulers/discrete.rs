//! The discrete-time schedulers SDXL uses, as diffusers 0.42 computes them: Euler discrete (SDXL's
//! published scheduler: scaled-linear betas, "leading" spacing, `init_noise_sigma`,
//! `scale_model_input`) and DPM-Solver++ 2M with Karras sigmas (what the official R2F-SDXL runs
//! use: second-order midpoint updates, first-order first and last steps, terminal sigma 0).
//!
//! The training schedule is built with libtorch's own float32 kernels (linspace, cumprod), as
//! diffusers does, so the sigmas match bit for bit.

use std::path::Path;

use serde::Deserialize;
use tch::Tensor;

use super::sigmas::{self, BetaSchedule};
use super::{dpm_solver, euler};

/// diffusers' `scheduler_config.json` for the discrete-time schedulers (the fields r2f reads).
#[derive(Debug, Clone, Deserialize)]
pub struct DiscreteConfig {
    #[serde(default = "default_train")]
    pub num_train_timesteps: i64,
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    #[serde(default)]
    pub beta_schedule: BetaSchedule,
    #[serde(default)]
    pub prediction_type: PredictionType,
    #[serde(default)]
    pub steps_offset: i64,
    #[serde(default)]
    pub timestep_spacing: TimestepSpacing,
    #[serde(default)]
    pub use_karras_sigmas: bool,
}

/// What the model predicts (only the noise is supported).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    #[default]
    Epsilon,
}

/// How Euler discrete spaces its timesteps over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    #[default]
    Linspace,
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

impl DiscreteConfig {
    /// stable-diffusion-xl-base-1.0 `scheduler/scheduler_config.json`.
    pub fn sdxl() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            prediction_type: PredictionType::Epsilon,
            steps_offset: 1,
            timestep_spacing: TimestepSpacing::Leading,
            use_karras_sigmas: false,
        }
    }

    /// Reads `scheduler_config.json`; an unsupported `beta_schedule`, `prediction_type` or
    /// `timestep_spacing` is an error naming the supported values.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        crate::models::read_config(&dir.join("scheduler_config.json"), "scheduler")
    }

    /// Training sigmas `sqrt((1 - alpha_bar) / alpha_bar)`, index = training timestep.
    pub fn train_sigmas(&self) -> Vec<f32> {
        let betas = sigmas::betas(
            self.beta_schedule,
            self.beta_start,
            self.beta_end,
            self.num_train_timesteps,
        );
        sigmas::training_sigmas(&betas)
    }
}

crate::named_enum! {
    /// Which SDXL scheduler, as `--scheduler` and the job parameter `scheduler` spell it.
    pub enum Scheduler("scheduler") {
        EulerDiscrete = "euler" | "euler-discrete",
        DpmSolverPp2mKarras = "dpm++2m-karras" | "dpmsolver++-2m-karras" | "dpm-solver++-2m-karras",
    }
}

/// A discrete schedule for one run: timesteps fed to the UNet and sigmas (terminal 0 appended).
#[derive(Debug, Clone)]
pub struct DiscreteSchedule {
    pub scheduler: Scheduler,
    pub timesteps: Vec<f32>,
    pub sigmas: Vec<f32>,
    pub init_noise_sigma: f32,
}

impl DiscreteSchedule {
    pub fn new(cfg: &DiscreteConfig, scheduler: Scheduler, steps: usize) -> anyhow::Result<Self> {
        if steps == 0 {
            anyhow::bail!("at least one step is needed");
        }
        let train = cfg.train_sigmas();
        Ok(match scheduler {
            Scheduler::EulerDiscrete => Self::euler(cfg, &train, steps),
            Scheduler::DpmSolverPp2mKarras => Self::dpm_solver_karras(&train, steps),
        })
    }

    /// Euler discrete: the config's spacing of training timesteps and their training sigmas;
    /// the initial noise is scaled to the largest sigma (`sqrt(sigma_max^2 + 1)` for "leading").
    fn euler(cfg: &DiscreteConfig, train: &[f32], steps: usize) -> Self {
        let n = cfg.num_train_timesteps;
        let timesteps = match cfg.timestep_spacing {
            TimestepSpacing::Leading => sigmas::leading_timesteps(n, steps, cfg.steps_offset),
            TimestepSpacing::Trailing => sigmas::trailing_timesteps(n, steps),
            TimestepSpacing::Linspace => sigmas::linspace_timesteps(n, steps),
        };
        let sigmas = sigmas::append_zero(sigmas::sigmas_at(train, &timesteps));
        let sigma_max = sigmas.iter().cloned().fold(0.0f32, f32::max);
        let init_noise_sigma = match cfg.timestep_spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => sigma_max,
            TimestepSpacing::Leading => (sigma_max * sigma_max + 1.0).sqrt(),
        };
        Self {
            scheduler: Scheduler::EulerDiscrete,
            timesteps,
            sigmas,
            init_noise_sigma,
        }
    }

    /// DPM-Solver++ 2M on Karras sigmas (rho 7) between the training schedule's extremes; the
    /// timesteps are those sigmas mapped back to training timesteps, rounded.
    fn dpm_solver_karras(train: &[f32], steps: usize) -> Self {
        let (sigma_min, sigma_max) = (train[0] as f64, train[train.len() - 1] as f64);
        let karras = sigmas::get_sigmas_karras(steps, sigma_min, sigma_max, 7.0);
        let log_sigmas: Vec<f32> = train.iter().map(|s| s.ln()).collect();
        let timesteps = karras
            .iter()
            .map(|&s| sigmas::round_even(sigmas::sigma_to_t(s, &log_sigmas)) as f32)
            .collect();
        let sigmas = sigmas::append_zero(karras.iter().map(|&s| s as f32).collect());
        Self {
            scheduler: Scheduler::DpmSolverPp2mKarras,
            timesteps,
            sigmas,
            init_noise_sigma: 1.0,
        }
    }

    pub fn steps(&self) -> usize {
        self.timesteps.len()
    }

    /// The model input at step `i` (Euler divides by sqrt(sigma^2 + 1); DPM-Solver is identity).
    pub fn scale_model_input(&self, sample: &Tensor, i: usize) -> Tensor {
        match self.scheduler {
            Scheduler::EulerDiscrete => euler::scale_model_input(sample, self.sigmas[i]),
            Scheduler::DpmSolverPp2mKarras => sample.shallow_clone(),
        }
    }
}

/// A schedule and the state its sampler carries between steps (DPM-Solver++ 2M keeps the
/// previous step's data prediction; Euler keeps nothing).
pub struct Sampler {
    pub noise_schedule: DiscreteSchedule,
    old_denoised: Option<Tensor>,
}

impl Sampler {
    pub fn new(noise_schedule: DiscreteSchedule) -> Self {
        Self {
            noise_schedule,
            old_denoised: None,
        }
    }

    /// The model input at step `i`.
    pub fn scale_model_input(&self, sample: &Tensor, i: usize) -> Tensor {
        self.noise_schedule.scale_model_input(sample, i)
    }

    /// One step from `sample` with the (guided) noise prediction `eps` at step `i`; the result
    /// is in `eps`'s dtype, the arithmetic in float32.
    pub fn step(&mut self, eps: &Tensor, i: usize, sample: &Tensor) -> Tensor {
        let sigmas = &self.noise_schedule.sigmas;
        match self.noise_schedule.scheduler {
            Scheduler::EulerDiscrete => euler::step(sigmas, i, sample, eps),
            Scheduler::DpmSolverPp2mKarras => {
                let (next, denoised) =
                    dpm_solver::step(sigmas, i, sample, eps, self.old_denoised.as_ref());
                self.old_denoised = Some(denoised);
                next
            }
        }
    }
}
