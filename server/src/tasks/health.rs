//! The standard `grpc.health.v1` service, driven by whether Redis answers: the overall status
//! (service `""`), `wq.v1.WorkQueueService` and `wq.v1.QueueAdminService` are SERVING only while a PING succeeds, and
//! NOT_SERVING from start-up until Redis has answered once.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::store::Store;

/// The service names whose status follows Redis.
pub const SERVICES: [&str; 3] = ["", "wq.v1.WorkQueueService", "wq.v1.QueueAdminService"];

/// Sets every tracked service to `status`.
pub async fn set_all(reporter: &HealthReporter, status: ServingStatus) {
    for service in SERVICES {
        reporter.set_service_status(service, status).await;
    }
}

/// Pings Redis every `interval` and reports the outcome until `stop`.
pub async fn monitor(
    store: Arc<Store>,
    reporter: HealthReporter,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut serving = None;
    loop {
        let up = store.ping().await.is_ok();
        if serving != Some(up) {
            if up {
                tracing::info!("redis answers; serving");
            } else {
                tracing::warn!("redis does not answer; health is NOT_SERVING");
            }
            let status = if up {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            set_all(&reporter, status).await;
            serving = Some(up);
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}
