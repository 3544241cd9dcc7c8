//! The metered reply body: it keeps its call's [`Ledger`] (so a call ends when its reply has
//! been sent or dropped, not when its handler returned), and charges the encoded bytes of its
//! reply while they wait to be sent.
//!
//! A server-streaming handler (health `Watch`, reflection) returns at once and its stream
//! lives on: before this body held the ledger, such calls were free. And a reply the caller
//! does not read (its receive window shut) waits in the broker: a Lease grant up to
//! `--max-reply-bytes` per stream. So the body takes each data frame from the inner body as
//! soon as it can (the first one before the headers are even sent, see [`MeteredReply::prime`]),
//! charges its bytes — past the budget if need be, since a reply that exists cannot be
//! refused; new calls are refused while the budget is over — and hands it to the transport in
//! chunks of [`CHUNK_BYTES`], giving back what each chunk held when the transport asks for
//! the next (it asks only once the last one has window to go).
//!
//! The chunks also serve [`crate::grpc::delivery`]: an unread Lease reply is not finished until its
//! last chunk is handed over, so a caller that resets the stream first has its items released.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use tonic::{Status, body::Body};

use super::{account::Charge, budget::Ledger};

/// Largest piece of a reply handed to the transport at once: what the transport may hold of
/// a stream's reply beyond its window, uncharged.
pub const CHUNK_BYTES: usize = 16 * 1024;

/// A reply body metered against its call's budget (module documentation).
pub(super) struct MeteredReply {
    inner: Body,
    /// The call's charges, for as long as the reply lives.
    _ledger: Arc<Ledger>,
    /// The rest of a data frame, being handed over in chunks.
    pending: Bytes,
    /// A non-data frame (trailers) taken while priming, handed over after `pending`.
    next: Option<Frame<Bytes>>,
    /// The inner body has ended (or failed, with `failed` to hand over).
    ended: bool,
    failed: Option<Status>,
    /// The bytes of `pending` plus the chunk handed over last.
    charge: Charge,
}

impl MeteredReply {
    pub(super) fn new(inner: Body, ledger: Arc<Ledger>) -> Self {
        let charge = ledger.force(0);
        Self {
            inner,
            _ledger: ledger,
            pending: Bytes::new(),
            next: None,
            ended: false,
            failed: None,
            charge,
        }
    }

    /// Takes the first frame of the reply if it is ready (a unary reply is: tonic encodes it
    /// when first polled), so that a reply whose caller never opens its window is charged
    /// too. Called once, before the response goes to the transport.
    pub(super) fn prime(&mut self, cx: &mut Context<'_>) {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            self.take(frame);
        }
    }

    /// Records a frame from the inner body.
    fn take(&mut self, frame: Option<Result<Frame<Bytes>, Status>>) {
        match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    self.pending = data;
                    self.charge.set(self.pending.len());
                }
                Err(frame) => self.next = Some(frame),
            },
            Some(Err(status)) => {
                self.ended = true;
                self.failed = Some(status);
            }
            None => self.ended = true,
        }
    }
}

impl http_body::Body for MeteredReply {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        // Asked for more: the chunk handed over last has gone to the transport's window.
        this.charge.set(this.pending.len());
        loop {
            if !this.pending.is_empty() {
                let chunk = this.pending.split_to(this.pending.len().min(CHUNK_BYTES));
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            if let Some(frame) = this.next.take() {
                return Poll::Ready(Some(Ok(frame)));
            }
            if this.ended {
                return Poll::Ready(this.failed.take().map(Err));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(frame) => this.take(frame),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_empty()
            && self.next.is_none()
            && self.failed.is_none()
            && (self.ended || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        // What is pending is not in the inner body's hint; unknown is always right.
        SizeHint::default()
    }
}

impl std::fmt::Debug for MeteredReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeteredReply")
            .field("pending", &self.pending.len())
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{ConnectionLimits, budget::Budget};

    fn budget() -> Arc<Budget> {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            limits: ConnectionLimits,
        }
        let mut limits = <Flags as clap::Parser>::parse_from(["wq-server"]).limits;
        limits.max_buffered_bytes = 64 << 10;
        Arc::new(Budget::new(&limits, 16 << 20))
    }

    #[tokio::test]
    async fn an_unread_reply_is_charged_past_the_budget_and_released_as_it_is_sent() {
        let budget = budget();
        let (ledger, receiving) = budget.admit(None, 100, false, false).expect("admitted");
        drop(receiving);
        let ledger = Arc::new(ledger);
        let reply = Bytes::from(vec![1u8; 100 << 10]);
        let mut body = MeteredReply::new(Body::new(http_body_util_full(reply)), ledger);
        std::future::poll_fn(|cx| {
            body.prime(cx);
            Poll::Ready(())
        })
        .await;
        assert_eq!(
            budget.held_bytes(),
            100 + (100 << 10),
            "charged past the 64 KiB budget"
        );
        assert!(
            budget.admit(None, 100, false, false).is_err(),
            "new calls refused"
        );
        let mut sent = 0;
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            let chunk = frame.expect("a frame").into_data().expect("data");
            assert!(chunk.len() <= CHUNK_BYTES);
            sent += chunk.len();
            // What is still held: the rest and the chunk just handed over.
            assert_eq!(budget.held_bytes(), 100 + (100 << 10) - sent + chunk.len());
        }
        assert_eq!(sent, 100 << 10);
        assert_eq!(
            budget.held_bytes(),
            100,
            "only the call itself, until the body is gone"
        );
        drop(body);
        assert_eq!(budget.held_bytes(), 0);
    }

    /// A body of one data frame.
    fn http_body_util_full(data: Bytes) -> impl http_body::Body<Data = Bytes, Error = Status> {
        struct Full(Option<Bytes>);
        impl http_body::Body for Full {
            type Data = Bytes;
            type Error = Status;
            fn poll_frame(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
                Poll::Ready(self.0.take().map(|d| Ok(Frame::data(d))))
            }
        }
        Full(Some(data))
    }
}
