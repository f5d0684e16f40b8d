//! The job contract (docs/contract.md): a job as clients write it ([`wire`]), the rules it must
//! keep ([`rules`]), its validation into a typed job ([`validate`]), the names of its states and
//! outcomes ([`state`]), the events and status records r2f writes about it ([`event`],
//! [`status`]), the HTTP API's own documents and its OpenAPI description ([`api`]), and the
//! JSON Schemas of all of these ([`schema`]).
//!
//! Everything a client sends is read here once: a message either becomes a [`ValidJob`] or a
//! [`Rejection`] with its reason.

pub mod api;
pub mod event;
pub mod rules;
pub mod schema;
pub mod state;
pub mod status;
pub mod validate;
pub mod wire;

pub use event::{EventError, OutputImage, ProgressEvent, ResultEvent, StartedEvent};
pub use rules::{valid_id, Limits, Rejection, Rules};
pub use state::{ErrorKind, JobState, Outcome};
pub use validate::{best_effort_id, validate_message, ModeSpec, ValidJob};
pub use wire::{JobMessage, JobOutput, JobParams, WebhookEvent, WebhookSpec};
