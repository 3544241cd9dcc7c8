//! Limits against hostile callers: how many connections the broker keeps and which one makes
//! room for a newcomer, how long a new one may take to carry its first call, how many calls one
//! connection runs at once, and how many bytes of requests and unsent replies all calls
//! together may hold.
//!
//! # Why a byte budget
//!
//! HTTP/2 flow control does not bound what a half-sent message costs: hyper hands every DATA
//! frame to tonic at once and gives the window back, and tonic keeps the bytes until the whole
//! message (up to `--max-message-bytes`, 16 MiB) is there. One connection with 100 streams, each
//! 4 MiB into a 16 MiB Enqueue, grew the broker by 400 MiB. So every call is metered here
//! ([`MeterLayer`]): on arrival its header bytes plus [`CALL_OVERHEAD_BYTES`] (and
//! [`RECEIVE_OVERHEAD_BYTES`] until its request has arrived), taken at once or refused with
//! RESOURCE_EXHAUSTED; and when a message's 5-byte gRPC prefix arrives, the whole length it
//! announces, before tonic sees a byte of it. A message that finds no room waits up to
//! [`ROOM_WAIT`] (its stream unread, so it holds no more than its flow-control window), then
//! its call is refused. Each connection may hold `--max-buffered-bytes-per-connection` of the
//! `--max-buffered-bytes` of the whole broker, so one connection cannot starve the rest.
//!
//! The charges last until the call has ended: its handler returned, its request body was
//! dropped, *and its reply body was sent or dropped* ([`reply`]). A server-streaming call
//! (health `Watch`, reflection) returns from its handler at once and lives on; before its
//! reply held the charges, 250 connections × 100 Watch streams without a token grew the broker
//! by 143–230 MiB. The open services' long-lived calls are charged to their own share too,
//! `--max-open-stream-bytes` (16 MiB, ~1 900 Watch streams), so that callers without a token
//! cannot hold the budget the other calls need. A reply's encoded bytes are charged while they
//! wait to be sent (a caller that does not read them holds them): past the limits if need
//! be, since a reply that exists cannot be refused, and new calls are refused until the
//! accounts are back under their limits.
//!
//! # What callers can make the broker hold
//!
//! At most `--max-buffered-bytes` (96 MiB) for calls and unsent replies, plus per connection
//! its flow-control window (`--connection-window`, 64 KiB) and its own buffers (an idle
//! connection measured 22 KiB in plaintext, 30 KiB over TLS; 40 KiB counted), for up to
//! `--max-connections` (1024): 96 MiB + 1024 × 104 KiB = 200 MiB by default
//! ([`ConnectionLimits::stated_bound`]), within a 256 MiB pod with the broker's own ~20 MiB.
//! Beyond it only the replies of calls that were already in progress when their accounts ran
//! out (each at most `--max-reply-bytes` for Lease and ListItems, an item otherwise), and what
//! the transport holds of each stream's reply beyond its window ([`CHUNK_BYTES`]).
//!
//! # Idle connections at the limit
//!
//! At `--max-connections`, a new connection evicts the connection idle the longest — no call
//! open, other than the open services' (they need no token) — which sees the end of its
//! stream and closes; a tonic (or any gRPC) client reconnects on its next call. Only when every
//! connection has a call open is the newcomer closed at once. So idle peers answering pings
//! cannot lock real clients out, and a Job's workers, idle between calls, share the slots.
//!
//! # Slow and silent peers
//!
//! A connection that has not carried a call within `--handshake-timeout` is closed (a silent TCP
//! peer, one that stops in the TLS or HTTP/2 handshake, or one that only opens a connection):
//! [`Connection`] fails its next read. After the first call, HTTP/2 keepalive pings
//! (`--keepalive-interval`, `--keepalive-timeout`) close peers that stop answering. A request
//! must arrive whole within `--receive-timeout` of its headers (a streaming request: each
//! message within that time of its first byte), or the call ends with DEADLINE_EXCEEDED and its
//! charges are released.
//!
//! # Layout
//!
//! - [`connection`]: admission and eviction of connections ([`incoming`], [`Peer`],
//!   [`Connection`]).
//! - [`account`]: byte accounts and the charges taken from them.
//! - [`budget`]: the byte budget and what one call holds of it ([`Budget`]).
//! - [`meter`]: the tower layer that charges every call ([`MeterLayer`]).
//! - [`body`]: the metered request body and its gRPC framing; [`reply`]: the metered reply.

mod account;
mod body;
mod budget;
mod connection;
mod meter;
mod reply;

use std::time::Duration;

use clap::Args;

pub use budget::Budget;
pub use connection::{Connection, Peer, incoming};
pub use meter::{Meter, MeterLayer};
pub use reply::CHUNK_BYTES;

/// What a call costs the broker besides its headers and messages (h2 stream state, its task
/// and futures, its span), charged for the whole call. A waiting Lease measured 7.6 KiB with its
/// headers (docs/RELIABILITY.md).
pub const CALL_OVERHEAD_BYTES: usize = 8 * 1024;

/// What a call costs in addition while its request is being received: tonic's decode buffer
/// (8 KiB). A half-sent call measured 10.8 KiB in all.
pub const RECEIVE_OVERHEAD_BYTES: usize = 8 * 1024;

/// Largest header list a call may send (hyper's default, stated here because the budget counts
/// it).
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// How long a message that finds no room in the budget waits for calls to end before its call
/// is refused with RESOURCE_EXHAUSTED. Short, because a waiting stream's unread data holds part
/// of its connection's flow-control window: waiting for long could stall the connection's other
/// calls, including the one whose room it waits for.
pub const ROOM_WAIT: Duration = Duration::from_secs(1);

/// Limits against hostile callers, and how the broker treats a vanished token file. Every
/// value has a `WQ_…` environment fallback; the defaults suit a broker pod with 256 MiB.
#[derive(Debug, Clone, Args)]
pub struct ConnectionLimits {
    /// Most TCP connections at once. At the limit a new connection evicts the one idle the
    /// longest (no call open but health or reflection; its client reconnects on its next
    /// call); only when every connection has a call open is the new one closed at once. Each
    /// costs up to --connection-window plus about 40 KiB besides what --max-buffered-bytes
    /// meters.
    #[arg(long, env = "WQ_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,

    /// Most calls (HTTP/2 streams) at once on one connection; clients queue the rest.
    #[arg(long, env = "WQ_MAX_STREAMS_PER_CONNECTION", default_value_t = 100)]
    pub max_streams_per_connection: u32,

    /// Most bytes of calls (headers, a fixed overhead per call, announced request messages,
    /// replies waiting to be sent) the broker holds at once. A new call past it answers
    /// RESOURCE_EXHAUSTED; a message past it waits for room, its sender held back by flow
    /// control; a reply is charged even past it (it exists already), refusing new calls.
    #[arg(long, env = "WQ_MAX_BUFFERED_BYTES", default_value_t = 96 << 20)]
    pub max_buffered_bytes: usize,

    /// The share of --max-buffered-bytes one connection may hold; at least --max-message-bytes
    /// plus 64 KiB, so that any one valid message fits.
    #[arg(long, env = "WQ_MAX_BUFFERED_BYTES_PER_CONNECTION", default_value_t = 24 << 20)]
    pub max_buffered_bytes_per_connection: usize,

    /// The share of --max-buffered-bytes that the long-lived calls of the open services
    /// (health Watch, reflection sessions) may hold, about 8.5 KiB per Watch stream; their
    /// other calls (health Check) get as much again. Past it they answer RESOURCE_EXHAUSTED, so
    /// callers without a token never take the budget from callers with one.
    #[arg(long, env = "WQ_MAX_OPEN_STREAM_BYTES", default_value_t = 16 << 20)]
    pub max_open_stream_bytes: usize,

    /// Largest message of the services open to every caller (health, and reflection): their
    /// requests are tiny, and a token is not needed to send them.
    #[arg(long, env = "WQ_MAX_OPEN_MESSAGE_BYTES", default_value_t = 64 << 10)]
    pub max_open_message_bytes: usize,

    /// HTTP/2 flow-control window of each stream, in bytes: how much a sender may have in
    /// flight on one call before the broker reads it.
    #[arg(long, env = "WQ_STREAM_WINDOW", default_value_t = 64 << 10)]
    pub stream_window: u32,

    /// HTTP/2 flow-control window of each connection, in bytes: what a connection's unread
    /// data can cost at most (times --max-connections in the memory bound).
    #[arg(long, env = "WQ_CONNECTION_WINDOW", default_value_t = 64 << 10)]
    pub connection_window: u32,

    /// How long a new connection may take to carry its first call (TCP, TLS and HTTP/2
    /// handshakes included) before it is closed.
    #[arg(long, env = "WQ_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,

    /// How long a request may take to arrive whole after its headers (each message of a
    /// streaming request: after its first byte); then the call ends with DEADLINE_EXCEEDED.
    #[arg(long, env = "WQ_RECEIVE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub receive_timeout: Duration,

    /// How often the broker pings each connection (HTTP/2 PING) to find dead peers.
    #[arg(long, env = "WQ_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub keepalive_interval: Duration,

    /// How long a ping may go unanswered before the connection is closed.
    #[arg(long, env = "WQ_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub keepalive_timeout: Duration,

    /// Most Lease calls waiting for work at once from one connection (see
    /// --max-waiting-leases). At most three quarters of --max-streams-per-connection whatever
    /// this says, so that a connection's Complete and ExtendLease calls always find a stream;
    /// lower it to keep more streams free.
    #[arg(
        long,
        env = "WQ_MAX_WAITING_LEASES_PER_CONNECTION",
        default_value_t = 100
    )]
    pub max_waiting_leases_per_connection: usize,

    /// Most Lease calls waiting for work at once under one grant of the token file; keep it
    /// below --max-waiting-leases so that one grant cannot take every slot. Without
    /// --auth-tokens there are no grants: callers are limited per connection and per broker.
    #[arg(long, env = "WQ_MAX_WAITING_LEASES_PER_GRANT", default_value_t = 5000)]
    pub max_waiting_leases_per_grant: usize,

    /// How long the tokens stay in force after the token file became unreadable or vanished
    /// (a Kubernetes Secret update swaps a symlink); then every call is refused until it is back.
    #[arg(long, env = "WQ_AUTH_MISSING_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub auth_missing_grace: Duration,
}

impl ConnectionLimits {
    /// Checks values that clap cannot check alone; `max_message_bytes` is the broker's
    /// `--max-message-bytes`.
    ///
    /// # Errors
    /// A message naming the flag when a value is out of range or inconsistent.
    pub fn check(&self, max_message_bytes: usize) -> Result<(), String> {
        if self.max_connections == 0 || self.max_streams_per_connection == 0 {
            return Err(
                "--max-connections and --max-streams-per-connection must be at least 1".into(),
            );
        }
        let per_connection = self.max_buffered_bytes_per_connection;
        let needed = max_message_bytes.saturating_add(64 << 10);
        if per_connection < needed {
            return Err(format!(
                "--max-buffered-bytes-per-connection must be at least --max-message-bytes + 64 KiB \
                 ({needed}), so that one valid message fits"
            ));
        }
        if self.max_buffered_bytes < per_connection {
            return Err(
                "--max-buffered-bytes must be at least --max-buffered-bytes-per-connection".into(),
            );
        }
        if self.max_open_stream_bytes == 0 || self.max_open_stream_bytes > self.max_buffered_bytes {
            return Err(
                "--max-open-stream-bytes must be at least 1 and at most --max-buffered-bytes"
                    .into(),
            );
        }
        if self.max_open_message_bytes == 0 {
            return Err("--max-open-message-bytes must be at least 1".into());
        }
        // RFC 9113 §6.5.2: windows stay within 2^31 - 1 bytes.
        if self.stream_window < 1024 || self.connection_window < self.stream_window {
            return Err(
                "--stream-window must be at least 1024 and --connection-window at least \
                 --stream-window"
                    .into(),
            );
        }
        if self.connection_window > (1 << 31) - 1 {
            return Err("--connection-window must be below 2 GiB".into());
        }
        for (flag, value) in [
            ("--handshake-timeout", self.handshake_timeout),
            ("--receive-timeout", self.receive_timeout),
            ("--keepalive-interval", self.keepalive_interval),
            ("--keepalive-timeout", self.keepalive_timeout),
        ] {
            if value.is_zero() {
                return Err(format!("{flag} must be > 0"));
            }
        }
        if self.max_waiting_leases_per_connection == 0 || self.max_waiting_leases_per_grant == 0 {
            return Err(
                "--max-waiting-leases-per-connection and --max-waiting-leases-per-grant must be \
                 at least 1"
                    .into(),
            );
        }
        Ok(())
    }

    /// The message limit of the open services: --max-open-message-bytes, or the broker's
    /// `max_message_bytes` when that is smaller.
    pub fn open_message_bytes(&self, max_message_bytes: usize) -> usize {
        self.max_open_message_bytes.min(max_message_bytes)
    }

    /// The most memory, in bytes, that callers can make the broker hold under these limits
    /// (module documentation), without waiting Leases' own cost and the replies of calls in
    /// progress when the budget ran out.
    pub fn stated_bound(&self) -> u64 {
        // An idle HTTP/2 connection measured 22 KiB in plaintext and 30 KiB over TLS (its
        // record buffers), debug build (tests, hostile::idle); counted with some room.
        const PER_CONNECTION_BUFFERS: u64 = 40 << 10;
        let per_connection = u64::from(self.connection_window) + PER_CONNECTION_BUFFERS;
        (self.max_buffered_bytes as u64)
            .saturating_add((self.max_connections as u64).saturating_mul(per_connection))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_pass_their_own_checks_and_fit_a_256_mib_pod() {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            limits: ConnectionLimits,
        }
        let limits = <Flags as clap::Parser>::parse_from(["wq-server"]).limits;
        limits.check(16 << 20).expect("the defaults are consistent");
        let bound = limits.stated_bound();
        // With the broker's own ~20 MiB and the waiting Leases' cost beyond their charge.
        assert!(bound <= 200 << 20, "{} MiB", bound >> 20);
        // A Job of 1000 worker pods, each with one connection, per broker replica.
        assert!(limits.max_connections >= 1000);
    }
}
