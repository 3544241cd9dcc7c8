//! Lease and Complete as the handlers call them: concurrent calls on one queue are combined
//! into one script call (see [`crate::store::coalesce`]) and each caller gets its own share back.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;

use crate::{error::Result, lease_id::LeaseId, model::LeaseBatch, store::Store};

impl Store {
    /// Leases up to `max_items` items for `lease`, in one script call with the other Lease
    /// calls on `queue` (and the same duration) that arrive while one is in flight. Items go
    /// to the callers in arrival order, each up to its `max_items` and the reply budget.
    ///
    /// # Errors
    /// UNAVAILABLE when Redis does not answer.
    pub async fn lease_combined(
        self: &Arc<Self>,
        queue: &str,
        max_items: u32,
        lease: Duration,
    ) -> Result<LeaseBatch> {
        let store = Arc::clone(self);
        let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
        self.lease_line
            .call(
                (queue.to_owned(), lease_ms),
                max_items as usize,
                max_items,
                move |(queue, _), wanted: Vec<u32>| {
                    let store = Arc::clone(&store);
                    async move {
                        // A random token per call makes every grant's token unique across
                        // calls and replicas.
                        let token = format!("{:016x}", rand::random::<u64>());
                        store.lease_many(&queue, &wanted, lease, &token).await
                    }
                },
            )
            .await
    }

    /// Completes live leases, in one script call with the other Complete calls on `queue`
    /// that arrive while one is in flight; returns which of this call's leases were live.
    ///
    /// # Errors
    /// UNAVAILABLE when Redis does not answer.
    pub async fn complete_combined(
        self: &Arc<Self>,
        queue: &str,
        completions: Vec<(LeaseId, Bytes)>,
    ) -> Result<Vec<bool>> {
        let store = Arc::clone(self);
        let weight = completion_weight(
            &completions,
            self.config().max_batch,
            self.config().max_message_bytes,
        );
        self.complete_line
            .call(
                queue.to_owned(),
                weight,
                completions,
                move |queue, calls: Vec<Vec<(LeaseId, Bytes)>>| {
                    let store = Arc::clone(&store);
                    async move {
                        let sizes: Vec<usize> = calls.iter().map(Vec::len).collect();
                        let all: Vec<(LeaseId, Bytes)> = calls.into_iter().flatten().collect();
                        let mut live = store.complete(&queue, &all).await?.into_iter();
                        Ok(sizes
                            .into_iter()
                            .map(|size| live.by_ref().take(size).collect())
                            .collect())
                    }
                },
            )
            .await
    }
}

/// A Complete call's weight in lease ids, counting its results' bytes too: a call carrying a
/// whole message's worth of results weighs a whole batch, so combined calls stay within about
/// twice what one call may carry.
fn completion_weight(
    completions: &[(LeaseId, Bytes)],
    max_batch: usize,
    max_message_bytes: usize,
) -> usize {
    let bytes: usize = completions.iter().map(|(_, result)| result.len()).sum();
    let bytes_weight = (bytes as u128 * max_batch as u128 / max_message_bytes.max(1) as u128)
        .try_into()
        .unwrap_or(usize::MAX);
    completions.len().saturating_add(bytes_weight)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_weigh_their_count_and_their_bytes() {
        let lease = LeaseId {
            queue: "q".into(),
            item_id: "i".into(),
            token: "t".into(),
        };
        let small = vec![(lease.clone(), Bytes::new()); 3];
        assert_eq!(completion_weight(&small, 1000, 4 << 20), 3);
        let large = vec![(lease, Bytes::from(vec![0u8; 2 << 20]))];
        assert_eq!(completion_weight(&large, 1000, 4 << 20), 1 + 500);
    }
}
