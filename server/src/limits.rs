//! Limits against hostile callers: how many connections the broker keeps, how long a new one
//! may take to carry its first call, how many calls one connection runs at once, and how many
//! bytes of requests all calls together may hold.
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
//! its call is refused. The charges are released when the call has ended (the handler returned
//! and the request body was dropped). Each connection may hold
//! `--max-buffered-bytes-per-connection` of the `--max-buffered-bytes` of the whole broker, so
//! one connection cannot starve the rest.
//!
//! # What callers can make the broker hold
//!
//! At most `--max-buffered-bytes` (96 MiB) for calls, plus per connection its flow-control
//! window (`--connection-window`, 256 KiB) and its own buffers (16 KiB measured, 32 KiB counted
//! for TLS), for up to `--max-connections` (256): 96 MiB + 256 × 288 KiB ≈ 168 MiB by default
//! ([`ConnectionLimits::stated_bound`]), within a 256 MiB pod with the broker's own ~20 MiB.
//! Replies are not metered: a Lease or ListItems reply stops before `--max-reply-bytes`, and is
//! sent as the caller reads it (docs/RELIABILITY.md, "What a hostile caller can do").
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

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use clap::Args;
use http_body::Frame;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Notify, OwnedSemaphorePermit, Semaphore},
    time::Sleep,
};
use tokio_stream::Stream;
use tonic::{
    Status,
    body::Body,
    transport::server::{Connected, TcpConnectInfo, TlsConnectInfo},
};

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
    /// Most TCP connections at once; more are closed as soon as they are accepted. Each costs
    /// up to --connection-window plus about 32 KiB besides what --max-buffered-bytes meters.
    #[arg(long, env = "WQ_MAX_CONNECTIONS", default_value_t = 256)]
    pub max_connections: usize,

    /// Most calls (HTTP/2 streams) at once on one connection; clients queue the rest.
    #[arg(long, env = "WQ_MAX_STREAMS_PER_CONNECTION", default_value_t = 100)]
    pub max_streams_per_connection: u32,

    /// Most bytes of calls (headers, a fixed overhead per call, announced request messages)
    /// the broker holds at once. A new call past it answers RESOURCE_EXHAUSTED; a message
    /// past it waits for room, its sender held back by flow control.
    #[arg(long, env = "WQ_MAX_BUFFERED_BYTES", default_value_t = 96 << 20)]
    pub max_buffered_bytes: usize,

    /// The share of --max-buffered-bytes one connection may hold; at least --max-message-bytes
    /// plus 64 KiB, so that any one valid message fits.
    #[arg(long, env = "WQ_MAX_BUFFERED_BYTES_PER_CONNECTION", default_value_t = 24 << 20)]
    pub max_buffered_bytes_per_connection: usize,

    /// Largest message of the services open to every caller (health, and reflection): their
    /// requests are tiny, and a token is not needed to send them.
    #[arg(long, env = "WQ_MAX_OPEN_MESSAGE_BYTES", default_value_t = 64 << 10)]
    pub max_open_message_bytes: usize,

    /// HTTP/2 flow-control window of each stream, in bytes: how much a sender may have in
    /// flight on one call before the broker reads it.
    #[arg(long, env = "WQ_STREAM_WINDOW", default_value_t = 64 << 10)]
    pub stream_window: u32,

    /// HTTP/2 flow-control window of each connection, in bytes: what a connection's unread
    /// data can cost at most.
    #[arg(long, env = "WQ_CONNECTION_WINDOW", default_value_t = 256 << 10)]
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

    /// Most Lease calls waiting for work at once from one connection (see --max-waiting-leases).
    /// By default as many as the connection's streams; lower it to keep streams free for a
    /// connection's other calls.
    #[arg(
        long,
        env = "WQ_MAX_WAITING_LEASES_PER_CONNECTION",
        default_value_t = 100
    )]
    pub max_waiting_leases_per_connection: usize,

    /// Most Lease calls waiting for work at once under one grant of the token file (all
    /// callers without a token count as one grant, "anonymous"); keep it below
    /// --max-waiting-leases so that one grant cannot take every slot.
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
        // A message's charge is taken from a semaphore in one piece, at most u32::MAX permits.
        let most = (u32::MAX as usize).min(Semaphore::MAX_PERMITS);
        if self.max_buffered_bytes > most || self.max_connections > Semaphore::MAX_PERMITS {
            return Err("--max-buffered-bytes or --max-connections is too large".into());
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
    /// (module documentation), without waiting Leases' own cost and replies.
    pub fn stated_bound(&self) -> u64 {
        // An idle HTTP/2 connection measured 16 KiB; TLS adds its record buffers.
        const PER_CONNECTION_BUFFERS: u64 = 32 << 10;
        let per_connection = u64::from(self.connection_window) + PER_CONNECTION_BUFFERS;
        (self.max_buffered_bytes as u64)
            .saturating_add((self.max_connections as u64).saturating_mul(per_connection))
    }
}

/// One accepted connection's identity and budget share. Requests find it in their extensions
/// ([`Peer::of`]); it lives as long as the connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The peer's address and port: together unique among open connections.
    pub remote: Option<SocketAddr>,
    /// The broker's own address of this connection.
    pub local: Option<SocketAddr>,
    state: Arc<PeerState>,
}

#[derive(Debug)]
struct PeerState {
    id: u64,
    /// Set by the first call; lifts the handshake deadline.
    started: AtomicBool,
    /// This connection's share of the budget.
    budget: Arc<Semaphore>,
}

impl Peer {
    /// A number unique to this connection within this broker process.
    pub fn id(&self) -> u64 {
        self.state.id
    }

    /// The connection a request arrived on, when it came through [`incoming`].
    pub fn of(extensions: &http::Extensions) -> Option<&Self> {
        extensions.get::<Self>().or_else(|| {
            extensions
                .get::<TlsConnectInfo<Self>>()
                .map(|i| i.get_ref())
        })
    }
}

/// Accepted connections, at most `limits.max_connections` at once (a connection past it is
/// closed at once, and the first of a run of them is logged), each with the handshake deadline.
pub fn incoming(
    listener: TcpListener,
    limits: &ConnectionLimits,
) -> impl Stream<Item = io::Result<Connection>> + Send + 'static {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let max_connections = limits.max_connections;
    let handshake = limits.handshake_timeout;
    let per_connection = limits.max_buffered_bytes_per_connection;
    let next_id = AtomicU64::new(1);
    let refusing = AtomicBool::new(false);
    tokio_stream::StreamExt::filter_map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        move |accepted| {
            let stream = match accepted {
                Ok(stream) => stream,
                Err(error) => return Some(Err(error)),
            };
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                if !refusing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        max_connections,
                        "connection limit reached (--max-connections): closing new connections \
                         until others end"
                    );
                }
                tracing::debug!(peer = ?stream.peer_addr().ok(), "connection refused: limit reached");
                return None;
            };
            if refusing.swap(false, Ordering::Relaxed) {
                tracing::info!("connections accepted again");
            }
            // Nagle's algorithm with delayed ACKs holds small gRPC replies for up to 40 ms: off.
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "cannot disable Nagle on a connection");
            }
            let peer = Peer {
                remote: stream.peer_addr().ok(),
                local: stream.local_addr().ok(),
                state: Arc::new(PeerState {
                    id: next_id.fetch_add(1, Ordering::Relaxed),
                    started: AtomicBool::new(false),
                    budget: Arc::new(Semaphore::new(per_connection)),
                }),
            };
            Some(Ok(Connection {
                stream,
                peer,
                deadline: Some(Box::pin(tokio::time::sleep(handshake))),
                _slot: slot,
            }))
        },
    )
}

/// An accepted TCP connection that holds its slot of `--max-connections` and fails its reads
/// once the handshake deadline passes without a call.
#[derive(Debug)]
pub struct Connection {
    stream: TcpStream,
    peer: Peer,
    /// Until the first call: when to give up on this connection.
    deadline: Option<Pin<Box<Sleep>>>,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(deadline) = &mut this.deadline {
            // Hyper and rustls always have a read pending, so the timer's wake-up reaches here.
            if this.peer.state.started.load(Ordering::Relaxed) {
                this.deadline = None;
            } else if deadline.as_mut().poll(cx).is_ready() {
                tracing::debug!(peer = ?this.peer.remote, "closing a connection that carried no call within --handshake-timeout");
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no call within --handshake-timeout",
                )));
            }
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl Connected for Connection {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

/// The broker-wide budget of call bytes and the message limits it meters against.
#[derive(Debug)]
pub struct Budget {
    global: Arc<Semaphore>,
    /// Notified whenever a charge is released, for calls waiting for room.
    released: Arc<Notify>,
    global_bytes: usize,
    per_connection_bytes: usize,
    message_bytes: usize,
    open_message_bytes: usize,
    receive_timeout: Duration,
}

impl Budget {
    /// The budget of `limits`; `max_message_bytes` caps what one announced message is charged.
    pub fn new(limits: &ConnectionLimits, max_message_bytes: usize) -> Self {
        Self {
            global: Arc::new(Semaphore::new(limits.max_buffered_bytes)),
            released: Arc::new(Notify::new()),
            global_bytes: limits.max_buffered_bytes,
            per_connection_bytes: limits.max_buffered_bytes_per_connection,
            message_bytes: max_message_bytes,
            open_message_bytes: limits.open_message_bytes(max_message_bytes),
            receive_timeout: limits.receive_timeout,
        }
    }

    /// Takes a new call's charges at once, or explains why not: `base` for the whole call,
    /// and [`RECEIVE_OVERHEAD_BYTES`] while its request is being received.
    fn admit(&self, peer: Option<&Peer>, base: usize) -> Result<(Ledger, Charge), Status> {
        let connection = peer.map(|p| Arc::clone(&p.state.budget));
        let take = |bytes| {
            take(connection.as_ref(), &self.global, bytes, &self.released)
                .map_err(|short| self.refusal(short))
        };
        let base = take(base)?;
        let receiving = take(RECEIVE_OVERHEAD_BYTES)?;
        let ledger = Ledger {
            connection,
            global: Arc::clone(&self.global),
            released: Arc::clone(&self.released),
            held: Mutex::new(Held {
                _base: base,
                messages: None,
            }),
        };
        Ok((ledger, receiving))
    }
}

impl Budget {
    fn refusal(&self, short: Short) -> Status {
        match short {
            Short::Connection => Status::resource_exhausted(format!(
                "this connection's calls hold too many bytes \
                 (--max-buffered-bytes-per-connection {}); retry when some have ended, or \
                 spread calls over more connections",
                self.per_connection_bytes
            )),
            Short::Broker => Status::resource_exhausted(format!(
                "the broker's calls hold too many bytes (--max-buffered-bytes {}); retry later \
                 or on another replica",
                self.global_bytes
            )),
        }
    }
}

/// Which share had too few bytes left.
enum Short {
    Connection,
    Broker,
}

/// Takes `bytes` from the connection's share and the broker's budget, both or neither.
///
/// Only ever `try_acquire`: a waiter queued inside a tokio semaphore takes every free permit
/// while it waits for the rest, so one large message waiting would refuse every small call.
/// Waiters wait on `released` instead and try again.
fn take(
    connection: Option<&Arc<Semaphore>>,
    global: &Arc<Semaphore>,
    bytes: usize,
    released: &Arc<Notify>,
) -> Result<Charge, Short> {
    // Checked at start-up: every charge fits u32.
    let permits = u32::try_from(bytes).unwrap_or(u32::MAX);
    let local = match connection {
        Some(share) => Some(
            Arc::clone(share)
                .try_acquire_many_owned(permits)
                .map_err(|_| Short::Connection)?,
        ),
        None => None,
    };
    // Giving the connection's bytes back wakes nobody: waking the other waiters here would
    // have them wake each other for ever. A waiter of this connection that found its share short
    // meanwhile is woken by the next release, or refused after ROOM_WAIT.
    let global = Arc::clone(global)
        .try_acquire_many_owned(permits)
        .map_err(|_| Short::Broker)?;
    Ok(Charge {
        connection: local,
        global: Some(global),
        released: Arc::clone(released),
    })
}

/// Permits taken from a connection's share and from the broker's budget; dropping them wakes
/// the calls waiting for room.
#[derive(Debug)]
struct Charge {
    connection: Option<OwnedSemaphorePermit>,
    global: Option<OwnedSemaphorePermit>,
    released: Arc<Notify>,
}

impl Charge {
    fn merge(&mut self, mut other: Self) {
        for (mine, theirs) in [
            (&mut self.connection, other.connection.take()),
            (&mut self.global, other.global.take()),
        ] {
            match (mine.as_mut(), theirs) {
                (Some(mine), Some(theirs)) => mine.merge(theirs),
                (None, theirs) => *mine = theirs,
                (Some(_), None) => {}
            }
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        let freed = self.connection.take().is_some() | self.global.take().is_some();
        if freed {
            self.released.notify_waiters();
        }
    }
}

#[derive(Debug)]
struct Held {
    /// Headers and overhead, for the whole call (held for its drop).
    _base: Charge,
    /// The request messages announced so far (only the latest one for streaming requests).
    messages: Option<Charge>,
}

/// Everything one call holds; released when the last of its request body and its response
/// future is gone.
#[derive(Debug)]
struct Ledger {
    connection: Option<Arc<Semaphore>>,
    global: Arc<Semaphore>,
    released: Arc<Notify>,
    held: Mutex<Held>,
}

type Acquiring = Pin<Box<dyn Future<Output = Result<Charge, Status>> + Send>>;

impl Ledger {
    /// Waits up to [`ROOM_WAIT`] until `bytes` can be taken from the connection's share and
    /// the broker's budget.
    fn acquire(&self, bytes: usize, shares: Arc<Budget>) -> Acquiring {
        let connection = self.connection.clone();
        let global = Arc::clone(&self.global);
        let released = Arc::clone(&self.released);
        Box::pin(async move {
            let give_up = tokio::time::sleep(ROOM_WAIT);
            tokio::pin!(give_up);
            loop {
                // Registered before trying, so a release in between is not missed.
                let notified = released.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                match take(connection.as_ref(), &global, bytes, &released) {
                    Ok(charge) => return Ok(charge),
                    Err(short) => {
                        tokio::select! {
                            () = &mut notified => {}
                            () = &mut give_up => return Err(shares.refusal(short)),
                        }
                    }
                }
            }
        })
    }

    fn record(&self, charge: Charge, replace: bool) {
        let mut held = match self.held.lock() {
            Ok(held) => held,
            Err(poisoned) => poisoned.into_inner(),
        };
        match (&mut held.messages, replace) {
            (Some(messages), false) => messages.merge(charge),
            (slot, _) => *slot = Some(charge),
        }
    }
}

/// The services every caller reaches without a token: their messages get the small limit.
fn is_open(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
        || path.starts_with("/grpc.reflection.v1.ServerReflection/")
        || path.starts_with("/grpc.reflection.v1alpha.ServerReflection/")
}

/// Methods whose request is a stream of messages (server reflection): only the message being
/// received is charged, so a long session does not pile up charges.
fn has_streaming_request(path: &str) -> bool {
    path.ends_with("ServerReflection/ServerReflectionInfo")
}

/// What a header list counts against the HTTP/2 `SETTINGS_MAX_HEADER_LIST_SIZE` (RFC 9113
/// §6.5.2: name and value lengths plus 32 per field), the path included.
fn header_bytes<B>(request: &http::Request<B>) -> usize {
    let fields: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum();
    fields + request.uri().path().len() + 32
}

/// Meters every call against the [`Budget`] (module documentation).
#[derive(Debug, Clone)]
pub struct MeterLayer {
    budget: Arc<Budget>,
}

impl MeterLayer {
    /// Meters calls against `budget`.
    pub fn new(budget: Arc<Budget>) -> Self {
        Self { budget }
    }
}

impl<S> tower::Layer<S> for MeterLayer {
    type Service = Meter<S>;

    fn layer(&self, inner: S) -> Meter<S> {
        Meter {
            inner,
            budget: Arc::clone(&self.budget),
        }
    }
}

/// The service [`MeterLayer`] builds.
#[derive(Debug, Clone)]
pub struct Meter<S> {
    inner: S,
    budget: Arc<Budget>,
}

impl<S> tower::Service<http::Request<Body>> for Meter<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let peer = Peer::of(request.extensions()).cloned();
        if let Some(peer) = &peer {
            peer.state.started.store(true, Ordering::Relaxed);
            // Handlers find the connection as a plain `Peer`, and `remote_addr()` keeps working.
            let tcp = TcpConnectInfo {
                local_addr: peer.local,
                remote_addr: peer.remote,
            };
            request.extensions_mut().insert(tcp);
            request.extensions_mut().insert(peer.clone());
        }
        let path = request.uri().path();
        let (open, streaming) = (is_open(path), has_streaming_request(path));
        let base = CALL_OVERHEAD_BYTES + header_bytes(&request);
        let (ledger, receiving) = match self.budget.admit(peer.as_ref(), base) {
            Ok((ledger, receiving)) => (Arc::new(ledger), receiving),
            Err(status) => {
                tracing::debug!(path, "call refused: byte budget exhausted");
                return Box::pin(std::future::ready(Ok(status.into_http())));
            }
        };
        let limit = if open {
            self.budget.open_message_bytes
        } else {
            self.budget.message_bytes
        };
        let receive_timeout = self.budget.receive_timeout;
        let ledger_for_body = Arc::clone(&ledger);
        let request = request.map(|inner| {
            Body::new(MeteredBody {
                inner,
                ledger: ledger_for_body,
                budget: Arc::clone(&self.budget),
                receiving: Some(receiving),
                framing: Framing::default(),
                limit,
                streaming,
                held: None,
                acquiring: None,
                deadline: Some(Box::pin(tokio::time::sleep(receive_timeout))),
                receive_timeout,
            })
        });
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            // The handler is done with the request's messages (a unary handler holds them
            // until here); the body, if still alive, keeps its own reference.
            drop(ledger);
            response
        })
    }
}

/// Where a request body stands in its gRPC framing: a 5-byte prefix (flag, big-endian length),
/// then that many bytes, repeated.
#[derive(Debug, Default)]
struct Framing {
    prefix: [u8; 5],
    /// Prefix bytes seen of the message being started.
    have: usize,
    /// Body bytes still to come of the current message.
    remaining: u64,
}

impl Framing {
    /// Walks `data`; returns the bytes to charge for messages announced in it: each prefix, and
    /// the length it announces when that is within `limit` (tonic refuses longer ones from the
    /// prefix alone).
    fn scan(&mut self, mut data: &[u8], limit: usize) -> usize {
        let mut charge = 0;
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = data
                    .len()
                    .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                self.remaining -= n as u64;
                data = &data[n..];
                continue;
            }
            let n = data.len().min(5 - self.have);
            self.prefix[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 5 {
                self.have = 0;
                let [_, a, b, c, d] = self.prefix;
                let length = u32::from_be_bytes([a, b, c, d]);
                self.remaining = u64::from(length);
                let length = usize::try_from(length).unwrap_or(usize::MAX);
                charge += 5 + if length <= limit { length } else { 0 };
            }
        }
        charge
    }

    /// Between messages: no prefix byte or body byte outstanding.
    fn between_messages(&self) -> bool {
        self.have == 0 && self.remaining == 0
    }
}

/// A request body whose announced messages are charged before tonic sees them.
struct MeteredBody {
    inner: Body,
    ledger: Arc<Ledger>,
    budget: Arc<Budget>,
    /// [`RECEIVE_OVERHEAD_BYTES`], until the request has ended.
    receiving: Option<Charge>,
    framing: Framing,
    /// The method's message limit: what one message may be charged.
    limit: usize,
    /// A streaming request: charge only the latest message; time each message on its own.
    streaming: bool,
    /// A frame that waits for its charge.
    held: Option<Frame<Bytes>>,
    acquiring: Option<Acquiring>,
    /// When the request (or, streaming, the current message) must have arrived.
    deadline: Option<Pin<Box<Sleep>>>,
    receive_timeout: Duration,
}

impl MeteredBody {
    /// The request has ended (or failed): nothing more to time, wait for or receive.
    fn end(&mut self) {
        self.deadline = None;
        self.acquiring = None;
        self.held = None;
        self.receiving = None;
    }
}

impl http_body::Body for MeteredBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        loop {
            if let Some(deadline) = &mut this.deadline
                && deadline.as_mut().poll(cx).is_ready()
            {
                this.end();
                return Poll::Ready(Some(Err(Status::deadline_exceeded(format!(
                    "the request did not arrive within --receive-timeout ({})",
                    humantime::format_duration(this.receive_timeout)
                )))));
            }
            if let Some(acquiring) = &mut this.acquiring {
                let charge = ready!(acquiring.as_mut().poll(cx));
                this.acquiring = None;
                match charge {
                    Ok(charge) => this.ledger.record(charge, this.streaming),
                    Err(status) => {
                        this.end();
                        return Poll::Ready(Some(Err(status)));
                    }
                }
                if let Some(frame) = this.held.take() {
                    return Poll::Ready(Some(Ok(frame)));
                }
                continue;
            }
            let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                other => {
                    // The end, or an error.
                    this.end();
                    return Poll::Ready(other);
                }
            };
            let Some(data) = frame.data_ref() else {
                // Trailers end the request.
                this.end();
                return Poll::Ready(Some(Ok(frame)));
            };
            let starts_message = this.framing.between_messages() && !data.is_empty();
            let charge = this.framing.scan(data, this.limit);
            if this.streaming {
                if this.framing.between_messages() {
                    this.deadline = None;
                } else if starts_message && this.deadline.is_none() {
                    this.deadline = Some(Box::pin(tokio::time::sleep(this.receive_timeout)));
                }
            }
            if charge == 0 {
                return Poll::Ready(Some(Ok(frame)));
            }
            this.held = Some(frame);
            this.acquiring = Some(this.ledger.acquire(charge, Arc::clone(&this.budget)));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(length: u32) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&length.to_be_bytes());
        out
    }

    #[test]
    fn framing_charges_each_announced_message_once_across_chunk_boundaries() {
        let mut framing = Framing::default();
        let mut stream = prefix(10);
        stream.extend_from_slice(&[7; 10]);
        stream.extend(prefix(3));
        stream.extend_from_slice(&[7; 3]);
        // One byte at a time: the charges arrive when each prefix is complete.
        let charges: Vec<usize> = stream.iter().map(|b| framing.scan(&[*b], 100)).collect();
        assert_eq!(charges.iter().sum::<usize>(), 15 + 8);
        assert_eq!(charges[4], 15);
        assert_eq!(charges[19], 8);
        assert!(framing.between_messages());
        // All at once.
        let mut framing = Framing::default();
        assert_eq!(framing.scan(&stream, 100), 23);
    }

    #[test]
    fn framing_does_not_charge_a_length_over_the_limit() {
        let mut framing = Framing::default();
        assert_eq!(framing.scan(&prefix(u32::MAX), 1 << 20), 5);
        assert!(!framing.between_messages());
    }

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
        assert!(bound <= 168 << 20, "{} MiB", bound >> 20);
    }
}
