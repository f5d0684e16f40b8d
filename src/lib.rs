//! r2f: Rare-to-Frequent text-to-image generation on libtorch.

pub mod bench;
pub mod config;
pub mod device;
pub mod generate;
pub mod image;
pub mod models;
pub mod pipelines;
pub mod r2f;
pub mod schedulers;
