//! Batch calls that fit whatever batch limit the broker has.
//!
//! The worker sends completions, heartbeats and releases in batches sized for the broker's
//! default `--max-batch` (1000). A broker configured lower refuses a larger batch with
//! INVALID_ARGUMENT; the batch is then halved and sent again, and the smaller size is kept for
//! the calls that follow, so such a broker slows the worker down instead of breaking it.

use std::future::Future;

use tonic::Code;
use wq_client::pb;

/// Sends `items` through `call`, at most `*size` per call, halving `*size` whenever a call of
/// more than one item is refused with INVALID_ARGUMENT. Returns one result per item sent, in
/// order, and the error that stopped the rest, if any (its items have no result).
pub(crate) async fn send<T, F, Fut>(
    items: Vec<T>,
    size: &mut usize,
    mut call: F,
) -> (Vec<pb::LeaseResult>, Option<wq_client::Error>)
where
    T: Clone,
    F: FnMut(Vec<T>) -> Fut,
    Fut: Future<Output = wq_client::Result<Vec<pb::LeaseResult>>>,
{
    let mut results = Vec::with_capacity(items.len());
    let mut rest = items.as_slice();
    while !rest.is_empty() {
        let (chunk, after) = rest.split_at(rest.len().min((*size).max(1)));
        match call(chunk.to_vec()).await {
            Ok(answers) => {
                results.extend(answers);
                rest = after;
            }
            Err(error) if error.code() == Some(Code::InvalidArgument) && chunk.len() > 1 => {
                *size = chunk.len() / 2;
                tracing::debug!(%error, size = *size, "batch refused by the broker; halving it");
            }
            Err(error) => return (results, Some(error)),
        }
    }
    (results, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> pb::LeaseResult {
        pb::LeaseResult {
            outcome: pb::LeaseOutcome::Ok as i32,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn halves_the_batch_until_the_broker_takes_it_and_keeps_that_size() {
        let mut size = 8;
        let mut calls = Vec::new();
        let (results, error) = send((0..8).collect::<Vec<u32>>(), &mut size, |chunk| {
            calls.push(chunk.len());
            let answer = if chunk.len() > 2 {
                Err(
                    tonic::Status::invalid_argument("lease_ids: must hold at most 2 entries")
                        .into(),
                )
            } else {
                Ok(chunk.iter().map(|_| ok()).collect())
            };
            async move { answer }
        })
        .await;
        assert!(error.is_none());
        assert_eq!(results.len(), 8);
        assert_eq!(size, 2);
        assert_eq!(calls, [8, 4, 2, 2, 2, 2]);
    }

    #[tokio::test]
    async fn another_error_stops_and_says_how_far_it_got() {
        let mut size = 2;
        let mut sent = 0;
        let (results, error) = send(vec![1, 2, 3, 4], &mut size, |chunk| {
            sent += 1;
            let answer = if sent == 1 {
                Ok(chunk.iter().map(|_| ok()).collect())
            } else {
                Err(tonic::Status::unavailable("down").into())
            };
            async move { answer }
        })
        .await;
        assert_eq!(results.len(), 2);
        assert_eq!(error.and_then(|e| e.code()), Some(Code::Unavailable));
    }
}
