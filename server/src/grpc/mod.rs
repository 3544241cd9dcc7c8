//! The gRPC face: where a request enters and is checked. No Redis here; the handlers call
//! [`crate::store`].
//!
//! # Layout
//!
//! - [`service`]: the `wq.v1.WorkQueueService` handlers (validate, call the store, respond);
//!   [`admin`]: the `wq.v1.QueueAdminService` handlers.
//! - [`validate`]: request checks; errors name the field.
//! - [`auth`]: bearer tokens, roles and queue patterns; [`tls`]: the listener's TLS settings.
//! - [`lease`]: Lease's waiting and release-on-cancel logic; [`waiting`]: fair limits on
//!   waiting Lease calls; [`delivery`]: release of items whose Lease reply was not delivered.

pub mod admin;
pub mod auth;
pub mod delivery;
pub mod lease;
pub mod service;
pub mod tls;
pub mod validate;
pub mod waiting;
