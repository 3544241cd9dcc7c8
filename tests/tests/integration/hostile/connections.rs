//! The connection limit and the time limits: eviction at `--max-connections`, peers that
//! do not start within `--handshake-timeout`, stop answering pings, or stop halfway through a
//! request.

use super::*;

/// An empty SETTINGS frame.
const SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];

/// At `--max-connections`, connections that never made a call are idle: a new connection
/// evicts the one idle the longest (here the first of four silent ones) instead of being
/// refused, and it is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_limit_a_new_connection_evicts_the_one_idle_the_longest() {
    let redis = redis().await;
    let server = Server::start(
        &redis.url(),
        &[
            ("WQ_MAX_CONNECTIONS", "4"),
            ("WQ_HANDSHAKE_TIMEOUT", "120s"),
        ],
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(
            TcpStream::connect(server.address)
                .await
                .expect("connecting"),
        );
        // Apart in time, so that which one is idle the longest is clear.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The start-up health check's connection, if still held, is the oldest: evicted first.
    let status = health_of(&server.url(), None).await;
    assert_eq!(status, Some(ServingStatus::Serving), "a newcomer is served");
    let status = health_of(&server.url(), None).await;
    assert_eq!(status, Some(ServingStatus::Serving), "and the next one");
    let first = closed_within(&mut held[0], Duration::from_secs(2)).await;
    assert!(first.is_some(), "the connection idle the longest is closed");
    for tcp in &mut held[2..] {
        assert!(
            closed_within(tcp, Duration::from_millis(100))
                .await
                .is_none(),
            "the connections idle for less time stay open"
        );
    }
    let log = server.log();
    assert!(
        log.contains("evicted the connection idle the longest"),
        "{log}"
    );
}

/// A connection that carries no call within `--handshake-timeout` is closed, whatever it
/// stopped at; one that has made a call is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_do_not_start_within_the_handshake_timeout_are_closed() {
    let redis = redis().await;
    let env = [("WQ_HANDSHAKE_TIMEOUT", "1s")];
    let server = Server::start(&redis.url(), &env).await;
    let pki = Pki::generate();
    let tls_server = Server::start_with(
        &redis.url(),
        Setup {
            env: &env,
            pki: Some(&pki),
            ..Setup::default()
        },
    )
    .await;
    // A TLS ClientHello record header and the start of its body, then nothing.
    let half_hello = [0x16, 0x03, 0x01, 0x00, 0xc8, 0x01, 0x00, 0x00, 0xc4, 0x03];
    let mut preface_and_settings = PREFACE.to_vec();
    preface_and_settings.extend_from_slice(&SETTINGS);
    let cases: [(&str, SocketAddr, &[u8]); 4] = [
        ("a silent TCP peer", server.address, &[]),
        ("half an HTTP/2 preface", server.address, &PREFACE[..10]),
        (
            "an HTTP/2 handshake without a call",
            server.address,
            &preface_and_settings,
        ),
        ("half a TLS ClientHello", tls_server.address, &half_hello),
    ];
    let closings =
        futures_util::future::join_all(cases.iter().map(|(name, address, bytes)| async move {
            let mut tcp = TcpStream::connect(address).await.expect("connecting");
            tcp.write_all(bytes).await.expect("writing");
            (*name, closed_within(&mut tcp, Duration::from_secs(8)).await)
        }))
        .await;
    // A connection that made a call within the timeout outlives it.
    let mut client = Client::new(
        Channel::from_shared(server.url())
            .expect("a url")
            .connect()
            .await
            .expect("connecting"),
    );
    let state = pb::QueueStateRequest {
        queue: "batch-1".into(),
    };
    let mut request = tonic::Request::new(state.clone());
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {WORKER}").parse().expect("ascii"),
    );
    client.queue_state(request).await.expect("a first call");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut request = tonic::Request::new(state);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {WORKER}").parse().expect("ascii"),
    );
    let again = client.queue_state(request).await;
    eprintln!("hostile: handshake timeout 1s: {closings:?}");
    for (name, closed) in closings {
        let closed = closed.unwrap_or_else(|| panic!("{name}: still open after 8 s"));
        assert!(
            closed >= Duration::from_millis(900),
            "{name}: closed after {closed:?}, before the timeout"
        );
    }
    again.expect("a connection that made a call is kept past the handshake timeout");
}

/// HPACK "literal header field without indexing, new name" for short names and values.
fn literal_header(block: &mut Vec<u8>, name: &str, value: &str) {
    block.push(0);
    block.push(u8::try_from(name.len()).expect("short name"));
    block.extend_from_slice(name.as_bytes());
    block.push(u8::try_from(value.len()).expect("short value"));
    block.extend_from_slice(value.as_bytes());
}

/// An HTTP/2 frame: 3-byte length, type, flags, stream 1.
fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len())
        .expect("small frame")
        .to_be_bytes();
    let mut out = vec![length[1], length[2], length[3], kind, flags, 0, 0, 0, 1];
    out.extend_from_slice(payload);
    out
}

/// A peer that makes one call over raw HTTP/2 and then never answers again (no PING
/// acknowledgements) is closed by the keepalive pings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_answering_pings_is_closed() {
    let redis = redis().await;
    let server = Server::start(
        &redis.url(),
        &[
            ("WQ_KEEPALIVE_INTERVAL", "1s"),
            ("WQ_KEEPALIVE_TIMEOUT", "1s"),
        ],
    )
    .await;
    let mut headers = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", HEALTH),
        (":authority", "wq"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        literal_header(&mut headers, name, value);
    }
    let mut bytes = PREFACE.to_vec();
    bytes.extend_from_slice(&SETTINGS);
    bytes.extend(frame(1, 0x4, &headers)); // HEADERS, END_HEADERS
    bytes.extend(frame(0, 0x1, &[0, 0, 0, 0, 0])); // DATA, END_STREAM: an empty request
    let mut tcp = TcpStream::connect(server.address)
        .await
        .expect("connecting");
    tcp.write_all(&bytes).await.expect("writing the call");
    // Reads everything (the reply, the pings) and answers nothing.
    let closed = closed_within(&mut tcp, Duration::from_secs(10)).await;
    eprintln!("hostile: unresponsive peer closed after {closed:?} (keepalive 1s + 1s)");
    assert!(closed.is_some(), "a peer that answers no ping is closed");
}

/// A call whose request stops halfway, or never sends a body, ends with DEADLINE_EXCEEDED at
/// `--receive-timeout`, and its share is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_stops_halfway_ends_at_the_receive_timeout() {
    let redis = redis().await;
    let server = Server::start(&redis.url(), &[("WQ_RECEIVE_TIMEOUT", "2s")]).await;
    let tcp = TcpStream::connect(server.address)
        .await
        .expect("connecting");
    let (send, connection) = h2::client::handshake(tcp).await.expect("handshake");
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut endings = Vec::new();
    for body in [&[0u8, 0, 0, 1, 0, 0x0a][..], &[]] {
        let mut send = send.clone().ready().await.expect("a stream");
        let request = http::Request::post(format!("http://{}{ENQUEUE}", server.address))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("authorization", format!("Bearer {PRODUCER}"))
            .body(())
            .expect("request headers");
        let (response, mut stream) = send.send_request(request, false).expect("sending");
        if !body.is_empty() {
            stream
                .send_data(Bytes::copy_from_slice(body), false)
                .expect("half a message");
        }
        let started = Instant::now();
        endings.push(async move {
            let response = tokio::time::timeout(Duration::from_secs(15), response)
                .await
                .expect("an answer within 15 s")
                .expect("a response");
            let status = response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .map(Code::from);
            drop(stream);
            (status, started.elapsed())
        });
    }
    let endings = futures_util::future::join_all(endings).await;
    driver.abort();
    eprintln!("hostile: half-sent requests at a 2s receive timeout: {endings:?}");
    for (status, took) in endings {
        assert_eq!(status, Some(Code::DeadlineExceeded));
        assert!(took >= Duration::from_millis(1900), "{took:?}");
    }
}
