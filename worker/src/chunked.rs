//! Batch calls that fit whatever batch limit the broker has.
//!
//! The worker sends completions, heartbeats and releases in batches sized for the broker's
//! default `--max-batch` (1000), and of at most [`MAX_CALL_BYTES`] (completion results can be
//! large). A broker configured lower refuses a larger batch with INVALID_ARGUMENT, or one past
//! its message limit with RESOURCE_EXHAUSTED; the batch is then halved and sent again, and the
//! smaller size is kept for the calls that follow, so such a broker slows the worker down
//! instead of breaking it (or repeating items whose completions never arrive).

use std::future::Future;

use wq_client::pb;

/// Most bytes of items (lease ids, results) one batch call carries: the client's batch bound
/// (gRPC's usual 4 MiB message limit, well within the broker's 16 MiB).
pub(crate) use wq_client::batch::MAX_BATCH_BYTES as MAX_CALL_BYTES;

/// Sends `items` through `call`, at most `*size` items and [`MAX_CALL_BYTES`] (as `bytes_of`
/// weighs them; the first item of a call always goes) per call, halving `*size` whenever a call
/// of more than one item is refused for its size. Returns one result per item sent, in order,
/// and the error that stopped the rest, if any (its items have no result).
pub(crate) async fn send<T, F, Fut>(
    items: Vec<T>,
    size: &mut usize,
    bytes_of: impl Fn(&T) -> usize,
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
        let mut take = 0;
        let mut bytes = 0usize;
        for item in rest.iter().take((*size).max(1)) {
            bytes = bytes.saturating_add(bytes_of(item));
            if take > 0 && bytes > MAX_CALL_BYTES {
                break;
            }
            take += 1;
        }
        let (chunk, after) = rest.split_at(take);
        match call(chunk.to_vec()).await {
            Ok(answers) => {
                results.extend(answers);
                rest = after;
            }
            Err(error) if error.is_batch_too_large() && chunk.len() > 1 => {
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
    use tonic::Code;

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
        let (results, error) = send(
            (0..8).collect::<Vec<u32>>(),
            &mut size,
            |_| 1,
            |chunk| {
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
            },
        )
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
        let (results, error) = send(
            vec![1, 2, 3, 4],
            &mut size,
            |_| 1,
            |chunk| {
                sent += 1;
                let answer = if sent == 1 {
                    Ok(chunk.iter().map(|_| ok()).collect())
                } else {
                    Err(tonic::Status::unavailable("down").into())
                };
                async move { answer }
            },
        )
        .await;
        assert_eq!(results.len(), 2);
        assert_eq!(error.and_then(|e| e.code()), Some(Code::Unavailable));
    }

    #[tokio::test]
    async fn batches_stay_within_the_call_bytes_and_halve_at_the_message_limit() {
        let mut size = 100;
        let mut calls = Vec::new();
        let item = MAX_CALL_BYTES / 3;
        let (results, error) = send(
            vec![item; 7],
            &mut size,
            |n| *n,
            |chunk| {
                calls.push(chunk.len());
                let answer = if chunk.len() > 2 {
                    Err(tonic::Status::resource_exhausted(
                        "decoded message length too large: found 5000000 bytes",
                    )
                    .into())
                } else {
                    Ok(chunk.iter().map(|_| ok()).collect())
                };
                async move { answer }
            },
        )
        .await;
        assert!(error.is_none());
        assert_eq!(results.len(), 7);
        // Three items weigh a full call's bytes, so calls start at three, not 100.
        assert_eq!(calls, [3, 1, 1, 1, 1, 1, 1, 1]);
    }

    #[tokio::test]
    async fn a_busy_broker_is_not_mistaken_for_a_size_limit() {
        let mut size = 4;
        let (results, error) = send(
            vec![1, 2, 3, 4],
            &mut size,
            |_| 1,
            |_| async { Err(tonic::Status::resource_exhausted("the broker is busy").into()) },
        )
        .await;
        assert!(results.is_empty());
        assert_eq!(size, 4);
        assert_eq!(error.and_then(|e| e.code()), Some(Code::ResourceExhausted));
    }

    #[tokio::test]
    async fn a_refusal_of_one_items_content_does_not_shrink_the_batches() {
        let mut size = 4;
        let (results, error) = send(
            vec![1, 2, 3, 4],
            &mut size,
            |_| 1,
            |_| async {
                Err(tonic::Status::invalid_argument(
                    "completions[2].result: must be at most 16384 bytes",
                )
                .into())
            },
        )
        .await;
        assert!(results.is_empty());
        assert_eq!(size, 4);
        assert_eq!(error.and_then(|e| e.code()), Some(Code::InvalidArgument));
    }
}
