//! Malformed gRPC framing over raw HTTP/2 (the `h2` client): each case must end with the exact
//! status tonic should give, within a bounded time, and write nothing to Redis.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::Bytes;
use prost::Message;
use tokio::net::TcpStream;
use tonic::Code;
use wq_tests::*;

use super::{QUEUE, assert_still_serving, counts, fuzz_config};

/// A raw exchange that has not ended by then has hung.
pub(super) const EXCHANGE_LIMIT: Duration = Duration::from_secs(5);

/// What a raw HTTP/2 client sends after the request headers.
#[derive(Debug, Clone)]
enum Step {
    /// One DATA frame.
    Data(Bytes),
    /// An empty DATA frame that ends the request.
    End,
    /// A trailers frame (empty), which ends the request.
    Trailers,
    /// RST_STREAM with CANCEL.
    Reset,
}

/// How a raw HTTP/2 request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ending {
    /// A gRPC status, from a trailers-only response or the trailers.
    Status(Code),
    /// A response that is not HTTP 200.
    Http(u16),
    /// A 200 response that ended without `grpc-status`.
    NoStatus,
    /// The stream was reset.
    Reset(h2::Reason),
    /// The connection went away.
    Closed,
}

/// One framing case: a request, what follows its headers, and the ending it must get.
struct FramingCase {
    name: String,
    request: http::Request<()>,
    steps: Vec<Step>,
    expected: Ending,
}

/// A gRPC request for `path` with the usual headers, minus or plus some.
pub(super) fn grpc_request(address: SocketAddr, path: &str) -> http::request::Builder {
    http::Request::post(format!("http://{address}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
}

pub(super) fn build(builder: http::request::Builder) -> http::Request<()> {
    builder
        .body(())
        .expect("the test's request headers are valid")
}

/// A gRPC frame: the compressed flag, the big-endian length, the body.
fn frame(flag: u8, declared_len: u32, body: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(flag);
    out.extend_from_slice(&declared_len.to_be_bytes());
    out.extend_from_slice(body);
    out.into()
}

pub(super) fn message(body: &[u8]) -> Bytes {
    frame(0, u32::try_from(body.len()).expect("small body"), body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_grpc_framing_gets_a_status_and_writes_nothing() {
    let started = Instant::now();
    let redis = redis().await;
    let broker = Broker::start_with(&redis.url(), fuzz_config()).await;
    let address = broker.address();
    let before = redis_dump(&redis).await;

    // Bodies that would write if the broker handled them, and a valid read-only one for the
    // cases whose framing is legal.
    let enqueue_path = "/wq.v1.WorkQueueService/Enqueue";
    let enqueue_body = pb::EnqueueRequest {
        queue: QUEUE.into(),
        items: vec![item("must not be stored")],
    }
    .encode_to_vec();
    let state_path = "/wq.v1.WorkQueueService/QueueState";
    let state_body = pb::QueueStateRequest {
        queue: QUEUE.into(),
    }
    .encode_to_vec();
    let enqueue = || grpc_request(address, enqueue_path);
    let state = || grpc_request(address, state_path);
    let data = Step::Data;
    let limit = u32::try_from(fuzz_config().max_message_bytes).expect("a limit under 4 GiB");

    let mut cases = vec![
        FramingCase {
            name: "length prefix longer than the body, then END_STREAM".into(),
            request: build(enqueue()),
            steps: vec![data(frame(0, 100, &enqueue_body)), Step::End],
            // tonic: "Unexpected EOF decoding stream."
            expected: Ending::Status(Code::Internal),
        },
        FramingCase {
            name: "length prefix of 4 GiB, stream left open".into(),
            request: build(enqueue()),
            steps: vec![data(frame(0, u32::MAX, &enqueue_body))],
            // Refused from the prefix alone, without waiting for 4 GiB: over the message limit.
            expected: Ending::Status(Code::ResourceExhausted),
        },
        FramingCase {
            name: "length prefix just over the broker's message limit, then END_STREAM".into(),
            request: build(enqueue()),
            steps: vec![data(frame(0, limit + 1, &enqueue_body)), Step::End],
            expected: Ending::Status(Code::ResourceExhausted),
        },
        FramingCase {
            name: "compressed flag without grpc-encoding".into(),
            request: build(enqueue()),
            steps: vec![
                data(frame(1, enqueue_body.len() as u32, &enqueue_body)),
                Step::End,
            ],
            expected: Ending::Status(Code::Internal),
        },
        FramingCase {
            name: "compressed flag with grpc-encoding gzip, which the broker does not accept"
                .into(),
            request: build(enqueue().header("grpc-encoding", "gzip")),
            steps: vec![
                data(frame(1, enqueue_body.len() as u32, &enqueue_body)),
                Step::End,
            ],
            expected: Ending::Status(Code::Unimplemented),
        },
        FramingCase {
            name: "unknown grpc-encoding".into(),
            request: build(enqueue().header("grpc-encoding", "x-bogus")),
            steps: vec![data(message(&enqueue_body)), Step::End],
            expected: Ending::Status(Code::Unimplemented),
        },
        FramingCase {
            name: "valid body, one byte per DATA frame".into(),
            request: build(state()),
            steps: message(&state_body)
                .iter()
                .map(|byte| data(Bytes::copy_from_slice(&[*byte])))
                .chain([Step::End])
                .collect(),
            expected: Ending::Status(Code::Ok),
        },
        FramingCase {
            name: "valid body with zero-length DATA frames around every byte".into(),
            request: build(state()),
            steps: message(&state_body)
                .iter()
                .flat_map(|byte| [data(Bytes::new()), data(Bytes::copy_from_slice(&[*byte]))])
                .chain([data(Bytes::new()), Step::End])
                .collect(),
            expected: Ending::Status(Code::Ok),
        },
        FramingCase {
            name: "only zero-length DATA frames".into(),
            request: build(enqueue()),
            steps: vec![data(Bytes::new()), data(Bytes::new()), Step::End],
            // tonic: "Missing request message."
            expected: Ending::Status(Code::Internal),
        },
        FramingCase {
            name: "headers with END_STREAM, no body".into(),
            request: build(enqueue()),
            steps: Vec::new(),
            expected: Ending::Status(Code::Internal),
        },
        FramingCase {
            name: "headers then trailers, no body".into(),
            request: build(enqueue()),
            steps: vec![Step::Trailers],
            expected: Ending::Status(Code::Internal),
        },
        FramingCase {
            name: "valid message ended by trailers".into(),
            request: build(state()),
            steps: vec![data(message(&state_body)), Step::Trailers],
            expected: Ending::Status(Code::Ok),
        },
        FramingCase {
            name: "half a gRPC prefix, then END_STREAM".into(),
            request: build(enqueue()),
            steps: vec![data(Bytes::from_static(&[0, 0])), Step::End],
            expected: Ending::Status(Code::Internal),
        },
        FramingCase {
            name: "valid message followed by garbage bytes".into(),
            request: build(enqueue()),
            steps: vec![
                data(message(&enqueue_body)),
                data(Bytes::from_static(b"\xff\xff\xff")),
                Step::End,
            ],
            // The unary handler reads the body to its end before it runs.
            expected: Ending::Status(Code::Internal),
        },
        FramingCase {
            name: "valid message followed by an undecodable second message".into(),
            request: build(enqueue()),
            steps: vec![
                data(message(&enqueue_body)),
                data(message(&[0x0a, 0xff])),
                Step::End,
            ],
            expected: Ending::Status(Code::Internal),
        },
        FramingCase {
            name: "two valid messages in a unary call".into(),
            request: build(state()),
            steps: vec![
                data(message(&state_body)),
                data(message(&state_body)),
                Step::End,
            ],
            // tonic reads and drops extra messages of a unary request; only the first is
            // handled (grpc-go would refuse the call). Harmless: QueueState only reads.
            expected: Ending::Status(Code::Ok),
        },
        // tonic routes by path alone and checks neither content-type nor method: these bodies
        // are decoded as usual (and do not decode), so a lenient server, not a crash.
        FramingCase {
            name: "wrong content-type".into(),
            request: build(
                http::Request::post(format!("http://{address}{enqueue_path}"))
                    .header("content-type", "text/plain")
                    .header("te", "trailers"),
            ),
            steps: vec![data(message(&[0x0a, 0xff])), Step::End],
            expected: Ending::Status(Code::Internal),
        },
        FramingCase {
            name: "no content-type".into(),
            request: build(
                http::Request::post(format!("http://{address}{enqueue_path}"))
                    .header("te", "trailers"),
            ),
            steps: vec![data(message(&[0x0a, 0xff])), Step::End],
            expected: Ending::Status(Code::Internal),
        },
        FramingCase {
            name: "GET instead of POST".into(),
            request: build(
                http::Request::get(format!("http://{address}{enqueue_path}"))
                    .header("content-type", "application/grpc"),
            ),
            steps: vec![data(message(&[0x0a, 0xff])), Step::End],
            expected: Ending::Status(Code::Internal),
        },
        FramingCase {
            name: "reset mid-message".into(),
            request: build(enqueue()),
            steps: vec![
                data(message(&enqueue_body).slice(..enqueue_body.len() / 2)),
                Step::Reset,
            ],
            // Our own reset ends the stream; the broker must neither write nor break.
            expected: Ending::Reset(h2::Reason::CANCEL),
        },
    ];
    for path in [
        "/wq.v1.WorkQueueService/NoSuchMethod",
        "/wq.v1.NoSuchService/Enqueue",
        "/wq.v1.workqueueservice/enqueue",
        "/wq.v1.WorkQueueService/Enqueue/extra",
        "/wq.v1.WorkQueueService",
        "/",
        "/%00%ff",
        &format!("/{}", "x".repeat(4_000)),
    ] {
        cases.push(FramingCase {
            name: format!("wrong path {path:.40}"),
            request: build(grpc_request(address, path)),
            steps: vec![data(message(&enqueue_body)), Step::End],
            expected: Ending::Status(Code::Unimplemented),
        });
    }
    for flag in 2..=u8::MAX {
        cases.push(FramingCase {
            name: format!("compressed flag byte {flag}"),
            request: build(enqueue()),
            steps: vec![
                data(frame(flag, enqueue_body.len() as u32, &enqueue_body)),
                Step::End,
            ],
            expected: Ending::Status(Code::Internal),
        });
    }

    let mut endings: BTreeMap<String, usize> = BTreeMap::new();
    let mut mismatches = Vec::new();
    let case_count = cases.len();
    for case in cases {
        let ending = tokio::time::timeout(
            EXCHANGE_LIMIT,
            h2_exchange(address, case.request, case.steps),
        )
        .await
        .unwrap_or_else(|_| panic!("{}: no ending within {EXCHANGE_LIMIT:?}", case.name));
        *endings.entry(format!("{ending:?}")).or_default() += 1;
        if ending != case.expected {
            mismatches.push(format!(
                "{}: expected {:?}, got {ending:?}",
                case.name, case.expected
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "framing cases ended unexpectedly:\n{}",
        mismatches.join("\n")
    );
    assert_eq!(
        redis_dump(&redis).await,
        before,
        "malformed framing changed Redis"
    );
    assert_still_serving(&broker, "after-framing").await;
    broker.stop().await;
    eprintln!(
        "fuzz framing: cases={case_count} endings={} elapsed={:.1}s",
        counts(&endings),
        started.elapsed().as_secs_f64()
    );
}

/// Sends one request with `steps` on a fresh HTTP/2 connection and reports how it ended.
async fn h2_exchange(address: SocketAddr, request: http::Request<()>, steps: Vec<Step>) -> Ending {
    let tcp = TcpStream::connect(address)
        .await
        .expect("connecting to the broker");
    let (send, connection) = h2::client::handshake(tcp)
        .await
        .expect("HTTP/2 handshake with the broker");
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let ending = exchange(send, request, steps).await;
    driver.abort();
    ending
}

async fn exchange(
    send: h2::client::SendRequest<Bytes>,
    request: http::Request<()>,
    steps: Vec<Step>,
) -> Ending {
    let mut send = match send.ready().await {
        Ok(send) => send,
        Err(error) => return ending_of(&error),
    };
    let (response, mut stream) = match send.send_request(request, steps.is_empty()) {
        Ok(sent) => sent,
        Err(error) => return ending_of(&error),
    };
    for step in steps {
        let sent = match step {
            Step::Data(bytes) => stream.send_data(bytes, false),
            Step::End => stream.send_data(Bytes::new(), true),
            Step::Trailers => stream.send_trailers(http::HeaderMap::new()),
            Step::Reset => {
                stream.send_reset(h2::Reason::CANCEL);
                Ok(())
            }
        };
        // The broker may answer (and close the stream) before the request is complete.
        if sent.is_err() {
            break;
        }
    }
    match response.await {
        Ok(response) => read_ending(response).await,
        Err(error) => ending_of(&error),
    }
}

async fn read_ending(response: http::Response<h2::RecvStream>) -> Ending {
    if response.status() != http::StatusCode::OK {
        return Ending::Http(response.status().as_u16());
    }
    if let Some(code) = grpc_status(response.headers()) {
        return Ending::Status(code);
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        match chunk {
            Ok(bytes) => {
                let _ = body.flow_control().release_capacity(bytes.len());
            }
            Err(error) => return ending_of(&error),
        }
    }
    match body.trailers().await {
        Ok(trailers) => trailers
            .as_ref()
            .and_then(grpc_status)
            .map_or(Ending::NoStatus, Ending::Status),
        Err(error) => ending_of(&error),
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<Code> {
    let code: i32 = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    Some(Code::from(code))
}

fn ending_of(error: &h2::Error) -> Ending {
    match error.reason() {
        Some(reason) if error.is_reset() => Ending::Reset(reason),
        _ => Ending::Closed,
    }
}
