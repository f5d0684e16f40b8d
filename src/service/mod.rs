//! The services a worker and the client commands talk to, each behind one module: metrics and
//! health endpoints, Redis (plan cache, job locks, status records), object storage, the LLM
//! planner, webhook deliveries, the TLS configuration of every client, and the backoff they
//! share. They know the job contract ([`crate::job`]) and the settings ([`crate::config`]); the
//! core knows none of them.

pub mod amqp;
pub mod backoff;
pub mod metrics;
pub mod planner;
pub mod redis_store;
pub mod status;
pub mod storage;
pub mod telemetry;
pub mod tenancy;
pub mod tls;
pub mod webhook;
