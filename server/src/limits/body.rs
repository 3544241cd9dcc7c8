//! The metered request body: each message its gRPC prefix announces is charged before tonic
//! sees a byte of it, and the request must arrive within `--receive-timeout`.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use http_body::Frame;
use tokio::time::Sleep;
use tonic::{Status, body::Body};

use super::{
    account::Charge,
    budget::{Acquiring, Budget, Ledger},
};

/// Where a request body stands in its gRPC framing: a 5-byte prefix (flag, big-endian length),
/// then that many bytes, repeated.
#[derive(Debug, Default)]
pub(super) struct Framing {
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
    pub(super) fn scan(&mut self, mut data: &[u8], limit: usize) -> usize {
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
pub(super) struct MeteredBody {
    pub(super) inner: Body,
    pub(super) ledger: Arc<Ledger>,
    pub(super) budget: Arc<Budget>,
    /// [`RECEIVE_OVERHEAD_BYTES`], until the request has ended.
    pub(super) receiving: Option<Charge>,
    pub(super) framing: Framing,
    /// The method's message limit: what one message may be charged.
    pub(super) limit: usize,
    /// A streaming request: charge only the latest message; time each message on its own.
    pub(super) streaming: bool,
    /// A frame that waits for its charge.
    pub(super) held: Option<Frame<Bytes>>,
    pub(super) acquiring: Option<Acquiring>,
    /// When the request (or, streaming, the current message) must have arrived.
    pub(super) deadline: Option<Pin<Box<Sleep>>>,
    pub(super) receive_timeout: Duration,
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
}
