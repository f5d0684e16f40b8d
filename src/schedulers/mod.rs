//! Noise schedulers, matched to diffusers.

pub mod flow_match;
