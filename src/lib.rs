//! r2f: Rare-to-Frequent text-to-image generation on libtorch.

pub mod bench;
pub mod bench_service;
pub mod config;
pub mod device;
pub mod enqueue;
pub mod generate;
pub mod image;
pub mod job;
pub mod metrics;
pub mod models;
pub mod pipelines;
pub mod plan;
pub mod r2f;
pub mod redis_store;
pub mod schedulers;
pub mod storage;
pub mod worker;
