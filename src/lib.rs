//! r2f: Rare-to-Frequent text-to-image generation on libtorch.

pub mod bench;
pub mod bench_e2e;
pub mod bench_model;
pub mod bench_service;
pub mod cli;
pub mod config;
pub mod device;
pub mod enqueue;
pub mod generate;
pub mod image;
pub mod job;
pub mod metrics;
pub mod models;
pub mod parity;
pub mod pipelines;
pub mod plan;
pub mod r2f;
pub mod redis_store;
pub mod schedulers;
pub mod schema;
pub mod status;
pub mod storage;
pub mod webhook;
pub mod worker;

// The R2F method's vocabulary at the crate root: `r2f::PromptSchedule`, not `r2f::r2f::...`.
pub use crate::r2f::{step_prompts, PromptSchedule, StopStepMap};
