//! DPM-Solver++ 2M (Lu et al. 2022, "DPM-Solver++", algorithm 2: data prediction, multistep,
//! second order) as diffusers' `DPMSolverMultistepScheduler` computes it for an
//! epsilon-predicting model on Karras sigmas, in the variance-preserving form:
//!
//! - `alpha = 1 / sqrt(sigma^2 + 1)`, `sigma_vp = sigma * alpha`, log-SNR
//!   `lambda = ln alpha - ln sigma_vp`;
//! - `denoised = (x - sigma_vp * eps) / alpha` (the data prediction);
//! - step `s -> t`: `h = lambda_t - lambda_s`,
//!   `x_t = (sigma_t / sigma_s) x - alpha_t (e^-h - 1) D` with `D = denoised` (first order) or
//!   `D = denoised + (denoised - old_denoised) / (2 r)`, `r = h_last / h` (second order).
//!
//! The first step has no `old_denoised` and the last step (to sigma 0) is first order, as in
//! diffusers. The scalar coefficients are float32 and use the system libm, as diffusers'.

use tch::{Kind, Tensor};

/// `(alpha_t, sigma_t)` of the VP form for a sigma (float32, as `_sigma_to_alpha_sigma_t`).
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// The log-SNR `lambda = ln alpha - ln sigma`.
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

/// One step from `x` at `sigmas[i]` to `sigmas[i + 1]` with the (guided) noise prediction `eps`
/// and the previous step's data prediction `old_denoised` (None on the first step). Returns the
/// next sample (in `eps`'s dtype, computed in float32) and this step's `denoised`, which the
/// next step takes as its `old_denoised`.
pub fn step(
    sigmas: &[f32],
    i: usize,
    x: &Tensor,
    eps: &Tensor,
    old_denoised: Option<&Tensor>,
) -> (Tensor, Tensor) {
    let (alpha_s, sigma_s) = alpha_sigma(sigmas[i]);
    // The data prediction in the sample's dtype, then float32.
    let denoised = ((x - eps * sigma_s as f64) / alpha_s as f64).to_kind(Kind::Float);
    let x32 = x.to_kind(Kind::Float);
    let (alpha_t, sigma_t) = alpha_sigma(sigmas[i + 1]);
    let lambda_t = lambda(alpha_t, sigma_t);
    let lambda_s = lambda(alpha_s, sigma_s);
    let h = lambda_t - lambda_s;
    let coef = alpha_t * ((-h).exp() - 1.0);
    let ratio = sigma_t / sigma_s;
    let last = i + 2 == sigmas.len();
    let x_next = match old_denoised.filter(|_| !last) {
        // First order (DPM-Solver++ 1, i.e. DDIM).
        None => x32 * ratio as f64 - &denoised * coef as f64,
        Some(old_denoised) => {
            let (alpha_u, sigma_u) = alpha_sigma(sigmas[i - 1]);
            let h_last = lambda_s - lambda(alpha_u, sigma_u);
            let r = h_last / h;
            let d = (&denoised - old_denoised) * (1.0 / r) as f64;
            x32 * ratio as f64 - &denoised * coef as f64 - d * (0.5 * coef) as f64
        }
    };
    (x_next.to_kind(eps.kind()), denoised)
}
