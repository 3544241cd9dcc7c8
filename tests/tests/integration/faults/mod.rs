//! Fault injection end to end, with real processes on loopback: `wq-worker` processes SIGKILLed
//! at random, a `wq-server` replica SIGKILLed under load, Redis SIGKILLed (with `appendfsync
//! always`) and SIGSTOPped under load, thousands of idle waiters that vanish at once, and clients
//! that complete twice, use stale leases or abandon their items.
//!
//! What every scenario proves: no item is lost (each one is executed at least once and the queue
//! ends drained with nothing dead), repeats stay within what the injected faults explain, calls
//! fail fast instead of hanging, and no process needs a restart to recover. Each test prints one
//! `faults:` line with its figures. The fault schedules are random; the seed is in that line and
//! `WQ_FAULTS_SEED=<seed>` replays its random choices (the timing of a run cannot be replayed).

mod crashes;
mod fleet;
pub(crate) mod harness;
mod misbehaving;
mod redis;
mod waiters;
