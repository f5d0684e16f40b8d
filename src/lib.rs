//! r2f: Rare-to-Frequent text-to-image generation on libtorch.
//!
//! The modules by layer, from the bottom; a module imports only from its own layer or below
//! (docs/architecture.md; `tests/architecture.rs` keeps it so).

// Core: tensors to images, no I/O beyond model files.
pub mod c2pa_sign;
pub mod device;
pub mod generate;
pub mod image;
pub mod models;
pub mod names;
pub mod pipelines;
pub mod plan;
pub mod r2f;
pub mod schedulers;

// The contract clients build against, and the settings.
pub mod config;
pub mod job;

// Services, the daemon, and the tools and commands on top.
pub mod bench;
pub mod cli;
pub mod gateway;
pub mod service;
pub mod worker;

// The R2F method's vocabulary at the crate root: `r2f::PromptSchedule`, not `r2f::r2f::...`.
pub use crate::r2f::{step_prompts, PromptSchedule, StopStepMap};
