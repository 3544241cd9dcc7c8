//! The RPCs the storm fuzzes, each with realistic requests (the seeds of the mutations) and
//! prost's decoder as the oracle, and the raw codec that sends a body's exact bytes as one call.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use tonic::{
    Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::Channel,
};
use wq_tests::{duration, item, item_with_id, pb};

use super::{QUEUE, SEALABLE_QUEUE};

/// One RPC to fuzz.
pub(super) struct Method {
    /// The gRPC path, `/package.Service/Method`.
    pub(super) path: &'static str,
    /// Whether prost decodes a body as this method's request: the oracle for the broker's answer.
    pub(super) decodes: fn(&[u8]) -> bool,
    /// Realistic encoded requests, the seeds of the mutations.
    pub(super) samples: Vec<Vec<u8>>,
}

fn decodes<M: Message + Default>(body: &[u8]) -> bool {
    M::decode(body).is_ok()
}

fn method<M: Message + Default>(path: &'static str, samples: &[M]) -> Method {
    Method {
        path,
        decodes: decodes::<M>,
        samples: samples.iter().map(Message::encode_to_vec).collect(),
    }
}

/// Every RPC of both services, each with a few realistic requests on [`QUEUE`] that use the live
/// `lease_ids` and the stored item ids.
pub(super) fn methods(lease_ids: &[String]) -> Vec<Method> {
    let queue = || QUEUE.to_owned();
    let seconds = |seconds| Some(duration(Duration::from_secs(seconds)));
    let full_item = pb::EnqueueItem {
        payload: Bytes::from_static(b"{\"task\":\"resize\",\"size\":[640,480]}"),
        id: "job-new".into(),
        priority: 5,
        delay: seconds(1),
        not_before: None,
        max_attempts: 3,
        headers: [("trace".to_owned(), "abc123".to_owned())].into(),
    };
    let dated_item = pb::EnqueueItem {
        not_before: Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 5,
        }),
        ..item("dated")
    };
    let state = |state: pb::ItemState| state as i32;
    vec![
        method(
            "/wq.v1.WorkQueueService/Enqueue",
            &[
                pb::EnqueueRequest {
                    queue: queue(),
                    items: vec![full_item, dated_item],
                },
                pb::EnqueueRequest {
                    queue: SEALABLE_QUEUE.into(),
                    items: vec![item("a"), item_with_id("job-1", "b"), item("c")],
                },
            ],
        ),
        method(
            "/wq.v1.WorkQueueService/Lease",
            &[
                pb::LeaseRequest {
                    queue: queue(),
                    max_items: 2,
                    lease_duration: seconds(60),
                    max_wait: None,
                    worker_id: "worker-1".into(),
                    return_if_drained: false,
                    return_if_sealed_and_drained: true,
                },
                pb::LeaseRequest {
                    queue: queue(),
                    return_if_drained: true,
                    ..Default::default()
                },
            ],
        ),
        method(
            "/wq.v1.WorkQueueService/ExtendLease",
            &[pb::ExtendLeaseRequest {
                queue: queue(),
                lease_ids: lease_ids.to_vec(),
                lease_duration: seconds(30),
            }],
        ),
        method(
            "/wq.v1.WorkQueueService/Complete",
            &[pb::CompleteRequest {
                queue: queue(),
                completions: lease_ids
                    .iter()
                    .map(|lease_id| pb::Completion {
                        lease_id: lease_id.clone(),
                        result: Bytes::from_static(b"done"),
                    })
                    .collect(),
            }],
        ),
        method(
            "/wq.v1.WorkQueueService/Fail",
            &[
                pb::FailRequest {
                    queue: queue(),
                    lease_id: lease_ids[0].clone(),
                    error: "connection refused".into(),
                    retry_delay: seconds(0),
                    dead_letter: false,
                },
                pb::FailRequest {
                    queue: queue(),
                    lease_id: lease_ids[1].clone(),
                    error: "bad input".into(),
                    retry_delay: None,
                    dead_letter: true,
                },
            ],
        ),
        method(
            "/wq.v1.WorkQueueService/Release",
            &[pb::ReleaseRequest {
                queue: queue(),
                lease_ids: lease_ids.to_vec(),
            }],
        ),
        method(
            "/wq.v1.WorkQueueService/QueueState",
            &[pb::QueueStateRequest { queue: queue() }],
        ),
        method(
            "/wq.v1.WorkQueueService/GetItem",
            &[pb::GetItemRequest {
                queue: queue(),
                id: "job-3".into(),
            }],
        ),
        method(
            "/wq.v1.QueueAdminService/ListQueues",
            &[pb::ListQueuesRequest {
                page_size: 10,
                page_token: "fuzz".into(),
            }],
        ),
        method(
            "/wq.v1.QueueAdminService/ListItems",
            &[pb::ListItemsRequest {
                queue: queue(),
                state: state(pb::ItemState::Leased),
                page_size: 5,
                page_token: String::new(),
                include_payloads: true,
            }],
        ),
        method(
            "/wq.v1.QueueAdminService/RequeueDead",
            &[
                pb::RequeueDeadRequest {
                    queue: queue(),
                    ids: vec!["job-1".into(), "job-2".into()],
                    all: false,
                },
                pb::RequeueDeadRequest {
                    queue: queue(),
                    ids: Vec::new(),
                    all: true,
                },
            ],
        ),
        method(
            "/wq.v1.QueueAdminService/PurgeQueue",
            &[pb::PurgeQueueRequest {
                queue: queue(),
                states: vec![state(pb::ItemState::Dead), state(pb::ItemState::Delayed)],
            }],
        ),
        method(
            "/wq.v1.QueueAdminService/PauseQueue",
            &[pb::PauseQueueRequest { queue: queue() }],
        ),
        method(
            "/wq.v1.QueueAdminService/ResumeQueue",
            &[pb::ResumeQueueRequest { queue: queue() }],
        ),
        method(
            "/wq.v1.QueueAdminService/SealQueue",
            &[pb::SealQueueRequest {
                queue: SEALABLE_QUEUE.into(),
            }],
        ),
        method(
            "/wq.v1.QueueAdminService/DeleteQueue",
            &[pb::DeleteQueueRequest { queue: queue() }],
        ),
    ]
}

/// The deadline every fuzz call carries. A mutated Lease may ask to wait up to 60 s; the broker
/// caps the wait by the caller's deadline (documented), so such a call ends OK and empty in
/// about 2 s instead of stalling the run.
const CALL_DEADLINE: Duration = Duration::from_secs(2);

/// One unary call whose request body is `body` exactly, correctly framed.
pub(super) async fn call_raw(
    channel: Channel,
    path: &'static str,
    body: Bytes,
) -> Result<Bytes, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|error| Status::unknown(format!("the channel is not ready: {error}")))?;
    let mut request = tonic::Request::new(body);
    request.set_timeout(CALL_DEADLINE);
    grpc.unary(
        request,
        http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

/// A codec that passes message bodies through untouched, so the test chooses every byte the
/// broker's decoder sees.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Self;
    type Decoder = Self;

    fn encoder(&mut self) -> Self {
        Self
    }

    fn decoder(&mut self) -> Self {
        Self
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}
