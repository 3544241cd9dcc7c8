//! Admission of connections: at most `--max-connections` at once, each with the handshake
//! deadline, and the [`Peer`] every request finds in its extensions.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Sleep,
};
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TlsConnectInfo};

use super::ConnectionLimits;

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
    pub(super) budget: Arc<Semaphore>,
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
