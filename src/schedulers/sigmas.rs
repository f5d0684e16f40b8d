//! Noise schedules as pure functions, in the style of k-diffusion's `get_sigmas_*`: the training
//! sigmas of a beta schedule, the three timestep spacings of diffusers' Euler scheduler
//! ("leading", "trailing", "linspace"), the sigma of a (fractional) training timestep and back,
//! and the Karras et al. (2022) schedule. Nothing here steps a sample.
//!
//! Every expression keeps diffusers' float widths and order of operations (float32 where
//! diffusers uses torch float32 tensors, float64 where it uses numpy), so that timesteps match
//! exactly and sigmas within an ulp or two.

use serde::Deserialize;
use tch::{Kind, Tensor};

/// How the betas run from `beta_start` to `beta_end` (diffusers' `squaredcos_cap_v2` is not
/// supported).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    #[default]
    Linear,
    ScaledLinear,
}

/// numpy's `round` (half to even).
pub fn round_even(x: f64) -> f64 {
    x.round_ties_even()
}

/// `betas = linspace(beta_start, beta_end, n)` (linear), or the square of the linspace of
/// their square roots (scaled linear), in libtorch's float32 kernels as diffusers builds them.
pub fn betas(schedule: BetaSchedule, beta_start: f64, beta_end: f64, n: i64) -> Tensor {
    let opts = (Kind::Float, tch::Device::Cpu);
    match schedule {
        BetaSchedule::Linear => Tensor::linspace(beta_start, beta_end, n, opts),
        BetaSchedule::ScaledLinear => {
            Tensor::linspace(beta_start.sqrt(), beta_end.sqrt(), n, opts).pow_tensor_scalar(2)
        }
    }
}

/// Training sigmas `sqrt((1 - alpha_bar) / alpha_bar)` with `alpha_bar = cumprod(1 - betas)`;
/// index = training timestep.
pub fn training_sigmas(betas: &Tensor) -> Vec<f32> {
    let _g = tch::no_grad_guard();
    let alphas = betas.neg() + 1.0;
    let alpha_bar = alphas.cumprod(0, Kind::Float);
    let sigmas = ((alpha_bar.neg() + 1.0) / &alpha_bar).sqrt();
    Vec::<f32>::try_from(sigmas).unwrap_or_default()
}

/// "leading": `arange(0, steps) * (n // steps)`, reversed, plus `steps_offset`.
pub fn leading_timesteps(num_train: i64, steps: usize, steps_offset: i64) -> Vec<f32> {
    let ratio = num_train / steps as i64;
    (0..steps as i64)
        .rev()
        .map(|i| (i * ratio) as f32 + steps_offset as f32)
        .collect()
}

/// "trailing": `round(arange(n, 0, -n / steps)) - 1`.
pub fn trailing_timesteps(num_train: i64, steps: usize) -> Vec<f32> {
    let ratio = num_train as f64 / steps as f64;
    std::iter::successors(Some(num_train as f64), |x| Some(x - ratio))
        .take_while(|&x| x > 0.0)
        .map(|x| round_even(x) as f32 - 1.0)
        .collect()
}

/// "linspace": `linspace(0, n - 1, steps)`, reversed.
pub fn linspace_timesteps(num_train: i64, steps: usize) -> Vec<f32> {
    let last = (num_train - 1) as f64;
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

/// The sigma of each timestep: `np.interp(timesteps, arange(n), train_sigmas)`.
pub fn sigmas_at(train: &[f32], timesteps: &[f32]) -> Vec<f32> {
    timesteps
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
        .collect()
}

/// diffusers' `_sigma_to_t`: log-sigma interpolation back to a (fractional) training timestep.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
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

/// The noise schedule of Karras et al. (2022), eq. 5: `steps` sigmas from `sigma_max` down to
/// `sigma_min`, evenly spaced in `sigma^(1/rho)` (no terminal zero).
pub fn get_sigmas_karras(steps: usize, sigma_min: f64, sigma_max: f64, rho: f64) -> Vec<f64> {
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    (0..steps)
        .map(|i| {
            let ramp = if steps == 1 {
                0.0
            } else {
                i as f64 / (steps - 1) as f64
            };
            (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(rho)
        })
        .collect()
}

/// `sigmas` with the terminal sigma 0 appended.
pub fn append_zero(mut sigmas: Vec<f32>) -> Vec<f32> {
    sigmas.push(0.0);
    sigmas
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spacings_of_1000_training_steps() {
        assert_eq!(leading_timesteps(1000, 4, 1), [751.0, 501.0, 251.0, 1.0]);
        assert_eq!(trailing_timesteps(1000, 4), [999.0, 749.0, 499.0, 249.0]);
        assert_eq!(linspace_timesteps(1000, 4), [999.0, 666.0, 333.0, 0.0]);
        assert_eq!(linspace_timesteps(1000, 1), [0.0]);
    }

    #[test]
    fn karras_runs_from_max_to_min() {
        let s = get_sigmas_karras(5, 0.03, 14.6, 7.0);
        assert_eq!(s.len(), 5);
        assert!((s[0] - 14.6).abs() < 1e-12 && (s[4] - 0.03).abs() < 1e-12);
        assert!(s.windows(2).all(|w| w[0] > w[1]));
    }

    #[test]
    fn sigma_to_t_inverts_sigmas_at_on_the_grid() {
        let train = training_sigmas(&betas(BetaSchedule::ScaledLinear, 0.00085, 0.012, 1000));
        let log_sigmas: Vec<f32> = train.iter().map(|s| s.ln()).collect();
        for t in [0usize, 1, 500, 998, 999] {
            let back = sigma_to_t(train[t] as f64, &log_sigmas);
            assert!((back - t as f64).abs() < 1e-3, "{t} -> {back}");
        }
    }
}
