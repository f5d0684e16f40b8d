//! Noise schedulers, matched to diffusers.

pub mod discrete;
pub mod flow_match;
