//! The tower layer that charges every call against the [`Budget`] before tonic reads it, and
//! keeps the charges until its reply body has been sent or dropped.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll},
};

use tonic::{body::Body, transport::server::TcpConnectInfo};

use super::{
    Budget, CALL_OVERHEAD_BYTES, Peer,
    body::{Framing, MeteredBody},
    reply::MeteredReply,
};

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

/// Calls that live on after their handler returned (a reply stream): on the open services
/// they are charged to the open services' own share, so that callers without a token cannot
/// hold the whole budget with them.
fn is_long_lived(path: &str) -> bool {
    path == "/grpc.health.v1.Health/Watch" || has_streaming_request(path)
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
        let open_stream = open && is_long_lived(path);
        let base = CALL_OVERHEAD_BYTES + header_bytes(&request);
        let (ledger, receiving) = match self.budget.admit(peer.as_ref(), base, open_stream, open) {
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
            let (parts, body) = response.await?.into_parts();
            // The reply keeps the call's charges: a streaming handler has returned at once,
            // and a unary reply may wait long for its caller to read it.
            let mut reply = MeteredReply::new(body, ledger);
            std::future::poll_fn(|cx| {
                reply.prime(cx);
                Poll::Ready(())
            })
            .await;
            Ok(http::Response::from_parts(parts, Body::new(reply)))
        })
    }
}
