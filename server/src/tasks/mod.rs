//! The background tasks that serve the whole broker rather than one call, from start-up until
//! shutdown. Two more live beside what they keep up: the token file's reload in
//! [`crate::grpc::auth`] and the sentinel watch in [`crate::store::connection::sentinel`].
//!
//! - [`notify`]: the in-process registry of who waits on which queue, and their wake-ups.
//! - [`wakeups`]: the shard-channel subscriptions that feed it from Redis.
//! - [`reaper`]: the reclaim loop driven by the queue index.
//! - [`health`]: the `grpc.health.v1` status, driven by whether Redis answers.

pub mod health;
pub mod notify;
pub mod reaper;
pub mod wakeups;
