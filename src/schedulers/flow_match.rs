//! diffusers' `FlowMatchEulerDiscreteScheduler` as SD3 uses it (static shift, no dynamic
//! shifting), reproduced with the same float32/float64 arithmetic so that sigmas and timesteps
//! match bit for bit: the training schedule is built in float32, `set_timesteps` interpolates in
//! float64 and shifts a second time, and a terminal sigma 0 is appended.

use std::path::Path;

use serde::Deserialize;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Deserialize)]
pub struct FlowMatchConfig {
    #[serde(default = "default_train")]
    pub num_train_timesteps: i64,
    #[serde(default = "default_shift")]
    pub shift: f64,
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    #[serde(default)]
    pub use_beta_sigmas: bool,
    #[serde(default)]
    pub invert_sigmas: bool,
    #[serde(default)]
    pub shift_terminal: Option<f64>,
    #[serde(default)]
    pub stochastic_sampling: bool,
}

fn default_train() -> i64 {
    1000
}
fn default_shift() -> f64 {
    1.0
}

impl Default for FlowMatchConfig {
    fn default() -> Self {
        Self::sd3()
    }
}

impl FlowMatchConfig {
    /// SD3-medium's `scheduler/scheduler_config.json`.
    pub fn sd3() -> Self {
        Self {
            num_train_timesteps: 1000,
            shift: 3.0,
            use_dynamic_shifting: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            invert_sigmas: false,
            shift_terminal: None,
            stochastic_sampling: false,
        }
    }

    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("scheduler_config.json");
        let cfg: Self = crate::models::read_config(&path, "scheduler")?;
        if cfg.use_dynamic_shifting
            || cfg.use_karras_sigmas
            || cfg.use_exponential_sigmas
            || cfg.use_beta_sigmas
            || cfg.invert_sigmas
            || cfg.shift_terminal.is_some()
            || cfg.stochastic_sampling
        {
            anyhow::bail!(
                "{}: only the static-shift flow-matching Euler schedule (SD3) is supported",
                path.display()
            );
        }
        Ok(cfg)
    }
}

/// The schedule for one run: `sigmas` has `steps + 1` entries (terminal 0), `timesteps` has
/// `steps` entries (sigma x num_train_timesteps, what the transformer is conditioned on).
#[derive(Debug, Clone)]
pub struct FlowMatchSchedule {
    pub sigmas: Vec<f32>,
    pub timesteps: Vec<f32>,
}

impl FlowMatchSchedule {
    pub fn new(cfg: &FlowMatchConfig, steps: usize) -> Self {
        let n = cfg.num_train_timesteps;
        let shift32 = cfg.shift as f32;
        // __init__: float32 tensors.
        let train_shifted = |t: f32| -> f32 {
            let s = t / n as f32;
            shift32 * s / (1.0f32 + (shift32 - 1.0f32) * s)
        };
        let sigma_max = train_shifted(n as f32) as f64;
        let sigma_min = train_shifted(1.0) as f64;
        // set_timesteps: numpy float64 linspace, second shift in float64, then float32.
        let start = sigma_max * n as f64;
        let stop = sigma_min * n as f64;
        let linspace: Vec<f64> = if steps <= 1 {
            vec![start; steps]
        } else {
            let step = (stop - start) / (steps - 1) as f64;
            (0..steps)
                .map(|i| {
                    if i + 1 == steps {
                        stop
                    } else {
                        i as f64 * step + start
                    }
                })
                .collect()
        };
        let shift = cfg.shift;
        let mut sigmas: Vec<f32> = linspace
            .iter()
            .map(|t| {
                let s = t / n as f64;
                (shift * s / (1.0 + (shift - 1.0) * s)) as f32
            })
            .collect();
        let timesteps = sigmas.iter().map(|s| s * n as f32).collect();
        sigmas.push(0.0);
        Self { sigmas, timesteps }
    }

    pub fn steps(&self) -> usize {
        self.timesteps.len()
    }

    /// The Euler step size `sigma_{i+1} - sigma_i` (float32, as the scheduler computes it).
    pub fn dt(&self, i: usize) -> f32 {
        self.sigmas[i + 1] - self.sigmas[i]
    }

    /// The Euler step of the flow ODE `dx/dsigma = velocity` from `sigmas[i]` to
    /// `sigmas[i + 1]`: `x + dt * velocity` in float32, cast back to the sample's dtype (the
    /// scheduler's `step`).
    pub fn step(&self, i: usize, sample: &Tensor, velocity: &Tensor) -> Tensor {
        let next = sample.to_kind(Kind::Float) + velocity.to_kind(Kind::Float) * self.dt(i) as f64;
        next.to_kind(sample.kind())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd3_28_steps_matches_published_values() {
        // docs/method.md §3: N = 28, shift 3.0.
        let s = FlowMatchSchedule::new(&FlowMatchConfig::sd3(), 28);
        assert_eq!(s.sigmas.len(), 29);
        assert_eq!(s.sigmas[0], 1.0);
        assert!((s.sigmas[1] - 0.987381).abs() < 1e-6);
        assert!((s.sigmas[27] - 0.008929).abs() < 1e-6);
        assert_eq!(s.sigmas[28], 0.0);
    }
}
