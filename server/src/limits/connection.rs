//! Admission of connections: at most `--max-connections` at once, a newcomer at the limit
//! evicting the connection idle the longest, each with the handshake deadline; and the
//! [`Peer`] every request finds in its extensions.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, LazyLock, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Instant,
};

use futures_util::task::AtomicWaker;

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    time::Sleep,
};
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TlsConnectInfo};

use super::{ConnectionLimits, account::Account};

/// One accepted connection's identity and budget share. Requests find it in their extensions
/// ([`Peer::of`]); it lives as long as the connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The peer's address and port: together unique among open connections.
    pub remote: Option<SocketAddr>,
    /// The broker's own address of this connection.
    pub local: Option<SocketAddr>,
    pub(super) state: Arc<PeerState>,
}

#[derive(Debug)]
pub(super) struct PeerState {
    pub(super) id: u64,
    /// Set by the first call; lifts the handshake deadline.
    pub(super) started: AtomicBool,
    /// This connection's share of the budget.
    pub(super) budget: Arc<Account>,
    /// Calls in progress that keep the connection from being evicted (any call but the open
    /// services', which need no token and so cannot be allowed to hold a slot).
    calls: AtomicUsize,
    /// When `calls` last fell to zero (or the connection was accepted), in milliseconds since
    /// [`EPOCH`]: the connection idle the longest is evicted first.
    idle_since: AtomicU64,
    /// Set when a newcomer evicted this connection: its next read ends it.
    evicted: AtomicBool,
    /// The connection's pending read, woken on eviction.
    reader: AtomicWaker,
}

/// The clock of `idle_since`.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn now_ms() -> u64 {
    u64::try_from(EPOCH.elapsed().as_millis()).unwrap_or(u64::MAX)
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

    /// Marks the connection busy until the guard is dropped.
    pub(super) fn busy(&self) -> Busy {
        self.state.calls.fetch_add(1, Ordering::AcqRel);
        Busy(Arc::clone(&self.state))
    }
}

/// A call in progress on a connection (see [`Peer::busy`]).
#[derive(Debug)]
pub(super) struct Busy(Arc<PeerState>);

impl Drop for Busy {
    fn drop(&mut self) {
        // Stamped before the count falls, so an evictor never sees an idle connection with a
        // stale stamp.
        self.0.idle_since.store(now_ms(), Ordering::Release);
        self.0.calls.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The connections the broker holds, by id.
#[derive(Debug, Default)]
struct Registry {
    live: Mutex<HashMap<u64, Arc<PeerState>>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<PeerState>>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes room for one more connection under `max`: evicts the connection idle the
    /// longest when all slots are taken. False when every connection is busy.
    fn admit(&self, state: &Arc<PeerState>, max: usize) -> bool {
        let mut live = self.lock();
        if live.len() >= max {
            let idle = live
                .values()
                .filter(|p| p.calls.load(Ordering::Acquire) == 0)
                .min_by_key(|p| p.idle_since.load(Ordering::Acquire))
                .map(Arc::clone);
            let Some(victim) = idle else {
                return false;
            };
            live.remove(&victim.id);
            victim.evicted.store(true, Ordering::Release);
            victim.reader.wake();
            tracing::debug!(
                idle_ms = now_ms().saturating_sub(victim.idle_since.load(Ordering::Acquire)),
                "evicted the connection idle the longest to admit a new one"
            );
        }
        live.insert(state.id, Arc::clone(state));
        true
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }
}

/// Accepted connections, each with the handshake deadline. At `limits.max_connections`, a new
/// connection evicts the one idle the longest (no call open but the open services'); only
/// when every connection has a call open is the newcomer closed at once (the first of a run of
/// them is logged).
pub fn incoming(
    listener: TcpListener,
    limits: &ConnectionLimits,
) -> impl Stream<Item = io::Result<Connection>> + Send + 'static {
    let registry = Arc::new(Registry::default());
    let max_connections = limits.max_connections;
    let handshake = limits.handshake_timeout;
    let per_connection = limits.max_buffered_bytes_per_connection;
    let next_id = AtomicU64::new(1);
    let refusing = AtomicBool::new(false);
    let evicting = AtomicBool::new(false);
    tokio_stream::StreamExt::filter_map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        move |accepted| {
            let stream = match accepted {
                Ok(stream) => stream,
                Err(error) => return Some(Err(error)),
            };
            let state = Arc::new(PeerState {
                id: next_id.fetch_add(1, Ordering::Relaxed),
                started: AtomicBool::new(false),
                budget: Account::new(per_connection),
                calls: AtomicUsize::new(0),
                idle_since: AtomicU64::new(now_ms()),
                evicted: AtomicBool::new(false),
                reader: AtomicWaker::new(),
            });
            let full = registry.lock().len() >= max_connections;
            if !registry.admit(&state, max_connections) {
                if !refusing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        max_connections,
                        "connection limit reached (--max-connections) and every connection has \
                         a call open: closing new connections until one is idle or ends"
                    );
                }
                tracing::debug!(peer = ?stream.peer_addr().ok(), "connection refused: limit reached");
                return None;
            }
            if full {
                if !evicting.swap(true, Ordering::Relaxed) {
                    tracing::info!(
                        max_connections,
                        "connection limit reached (--max-connections): evicted the connection \
                         idle the longest for a new one (clients reconnect on their next call)"
                    );
                }
            } else {
                evicting.store(false, Ordering::Relaxed);
            }
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
                state,
            };
            Some(Ok(Connection {
                stream,
                peer,
                deadline: Some(Box::pin(tokio::time::sleep(handshake))),
                registry: Arc::clone(&registry),
            }))
        },
    )
}

/// An accepted TCP connection that holds its slot of `--max-connections`, fails its reads
/// once the handshake deadline passes without a call, and ends (its reads see the end of the
/// stream) when a newcomer evicts it.
#[derive(Debug)]
pub struct Connection {
    stream: TcpStream,
    peer: Peer,
    /// Until the first call: when to give up on this connection.
    deadline: Option<Pin<Box<Sleep>>>,
    registry: Arc<Registry>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.registry.remove(self.peer.state.id);
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let state = &this.peer.state;
        // Hyper and rustls always have a read pending, so an eviction's wake-up reaches here.
        state.reader.register(cx.waker());
        if state.evicted.load(Ordering::Acquire) {
            // The end of the stream: an idle HTTP/2 connection then closes without error, and
            // the peer's client reconnects on its next call.
            return Poll::Ready(Ok(()));
        }
        if let Some(deadline) = &mut this.deadline {
            if state.started.load(Ordering::Relaxed) {
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
