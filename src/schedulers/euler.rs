//! The Euler step of diffusers' `EulerDiscreteScheduler` (k-diffusion's `sample_euler` without
//! churn): from the noise prediction to the denoised sample, to the ODE derivative, one step of
//! size `dt = sigma_next - sigma`.

use tch::{Kind, Tensor};

/// The model input at sigma `sigma`: `x / sqrt(sigma^2 + 1)`.
pub fn scale_model_input(x: &Tensor, sigma: f32) -> Tensor {
    x / ((sigma * sigma + 1.0).sqrt() as f64)
}

/// One step from `x` at `sigmas[i]` to `sigmas[i + 1]` with the (guided) noise prediction `eps`;
/// the arithmetic in float32, the result in `eps`'s dtype.
pub fn step(sigmas: &[f32], i: usize, x: &Tensor, eps: &Tensor) -> Tensor {
    let x = x.to_kind(Kind::Float);
    let sigma = sigmas[i] as f64;
    let denoised = &x - eps.to_kind(Kind::Float) * sigma;
    let d = (&x - denoised) / sigma;
    let dt = (sigmas[i + 1] - sigmas[i]) as f64;
    (x + d * dt).to_kind(eps.kind())
}
