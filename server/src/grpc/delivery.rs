//! Items whose Lease reply never reached the caller go back to the queue at once.
//!
//! A Lease handler's reply carries an [`Undelivered`] guard in its extensions; a layer on the
//! HTTP side moves the guard into the response body. The metering layer outside it feeds the
//! body to the transport in small chunks (`limits::CHUNK_BYTES`), and asks for the trailers,
//! which end the guard, only after the last chunk, so the body is finished only once the
//! caller's flow-control window has taken nearly all of it: a caller that refuses the reply (too large for its receive limit) or goes away resets
//! the stream first, the transport drops the unfinished body, and the guard releases the items
//! (the attempt not counted) instead of leaving them to expire and cost an attempt. A reply
//! small enough to fit the caller's window is handed over whole, so a caller that vanishes
//! after that is not seen: those leases expire (docs/RELIABILITY.md).

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::{lease_id::LeaseId, store::Store};

/// Leases to give back if their reply is not delivered.
#[derive(Debug, Clone)]
pub struct Undelivered {
    store: Arc<Store>,
    queue: String,
    leases: Vec<LeaseId>,
}

impl Undelivered {
    /// A guard for `leases` of `queue`.
    pub fn new(store: Arc<Store>, queue: String, leases: Vec<LeaseId>) -> Self {
        Self {
            store,
            queue,
            leases,
        }
    }

    fn release(self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            match self.store.release(&self.queue, &self.leases).await {
                Ok(live) => tracing::info!(
                    queue = %self.queue,
                    released = live.iter().filter(|ok| **ok).count(),
                    "a lease reply was not delivered; released its items"
                ),
                Err(error) => tracing::warn!(
                    queue = %self.queue,
                    %error,
                    "a lease reply was not delivered and releasing failed; the leases will expire"
                ),
            }
        });
    }
}

/// Moves a reply's [`Undelivered`] guard, if any, into its body (a `tower` response map).
pub fn guard_replies(
    mut response: http::Response<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    match response.extensions_mut().remove::<Undelivered>() {
        Some(guard) => response.map(|body| tonic::body::Body::new(GuardedBody::new(body, guard))),
        None => response,
    }
}

/// A reply body that releases its guard's leases when dropped before its end.
struct GuardedBody<B> {
    inner: B,
    guard: Option<Undelivered>,
}

impl<B> GuardedBody<B> {
    fn new(inner: B, guard: Undelivered) -> Self {
        Self {
            inner,
            guard: Some(guard),
        }
    }
}

impl<B> Body for GuardedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            // The trailers follow the whole message: it was handed over.
            None => this.guard = None,
            Some(Ok(frame)) if !frame.is_data() => this.guard = None,
            Some(_) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for GuardedBody<B> {
    fn drop(&mut self) {
        if let Some(guard) = self.guard.take() {
            guard.release();
        }
    }
}
