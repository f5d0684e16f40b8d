//! Noise schedulers, matched to diffusers: pure noise-schedule functions ([`sigmas`]), one
//! small unit per sampler step ([`euler`], [`dpm_solver`]), the SDXL schedule and sampler state
//! ([`discrete`]) and SD3's flow matching ([`flow_match`]).

pub mod discrete;
pub mod dpm_solver;
pub mod euler;
pub mod flow_match;
pub mod sigmas;
