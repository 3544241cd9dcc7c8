//! Idle connections at `--max-connections`: a new connection evicts the one idle the longest,
//! so idle peers cannot lock real clients out; only when every connection has a call open is
//! the newcomer refused. And what an idle connection costs, measured.

use super::*;

/// A plaintext channel that has made one health check and then sits idle, answering pings.
async fn idle_channel(address: SocketAddr) -> Channel {
    idle_channel_with(address, None).await
}

/// A channel (over TLS trusting `pki`'s CA, with `pki`) that has made one health check and
/// then sits idle.
async fn idle_channel_with(address: SocketAddr, pki: Option<&Pki>) -> Channel {
    let endpoint = match pki {
        None => Channel::from_shared(format!("http://{address}")).expect("a url"),
        Some(pki) => {
            let ca = std::fs::read(pki.path("ca.pem")).expect("the CA");
            Channel::from_shared(format!("https://localhost:{}", address.port()))
                .expect("a url")
                .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
                .expect("a TLS configuration")
        }
    };
    let channel = endpoint.connect().await.expect("connecting");
    tonic_health_client(channel.clone())
        .check(health::HealthCheckRequest::default())
        .await
        .expect("a health check");
    channel
}

/// Eight connections fill a broker's eight slots with one health check each and then sit
/// idle; a worker that connects after them is served (an idle one is evicted for it), and
/// every idle client's next call succeeds too (the client reconnects, evicting another).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_cannot_lock_a_real_client_out() {
    let redis = redis().await;
    let server = Server::start(&redis.url(), &[("WQ_MAX_CONNECTIONS", "8")]).await;
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(idle_channel(server.address).await);
    }
    let worker = server.client(WORKER).await;
    let served = worker.queue_state("batch-1").await;
    served.expect("a worker connecting to a broker full of idle connections is served");
    for channel in idle {
        let mut health = tonic_health_client(channel);
        let check = || health::HealthCheckRequest::default();
        // Each reconnect evicts another idle client, and eviction sends no GOAWAY: a call that
        // races its connection's close fails at the transport (documented), and the client's
        // next call reconnects.
        let first = health.check(check()).await;
        if let Err(status) = &first {
            assert!(
                matches!(status.code(), Code::Unknown | Code::Unavailable),
                "a call on an evicted connection fails at the transport only: {status:?}"
            );
            health
                .check(check())
                .await
                .expect("an evicted idle client reconnects on its next call");
        }
    }
    let log = server.log();
    assert!(
        log.contains("evicted the connection idle the longest"),
        "{log}"
    );
}

/// The same over TLS, where an evicted connection's end of stream reaches rustls first: idle
/// TLS clients at the limit make room for a newcomer and reconnect on their next call. And
/// what an idle TLS connection costs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tls_connections_make_room_and_reconnect() {
    const CONNECTIONS: u64 = 200;
    let redis = redis().await;
    let pki = Pki::generate();
    let limit = (CONNECTIONS + 5).to_string();
    let server = Server::start_with(
        &redis.url(),
        Setup {
            env: &[("WQ_MAX_CONNECTIONS", &limit)],
            pki: Some(&pki),
            ..Setup::default()
        },
    )
    .await;
    let before = server.memory_kib("VmRSS");
    let mut idle = Vec::new();
    for _ in 0..CONNECTIONS {
        idle.push(idle_channel_with(server.address, Some(&pki)).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown = server.memory_kib("VmRSS").saturating_sub(before);
    eprintln!(
        "hostile: {CONNECTIONS} idle TLS connections: grown={grown}KiB per_connection={}KiB",
        grown / CONNECTIONS
    );
    // Ten more than the limit leaves room for: each evicts one of the idle ones.
    for _ in 0..10 {
        idle.push(idle_channel_with(server.address, Some(&pki)).await);
    }
    for channel in idle.iter().take(20) {
        tonic_health_client(channel.clone())
            .check(health::HealthCheckRequest::default())
            .await
            .expect("an evicted idle TLS client reconnects on its next call");
    }
    assert!(
        grown / CONNECTIONS < 40,
        "{} KiB per idle TLS connection",
        grown / CONNECTIONS
    );
}

/// Four connections each with a waiting Lease fill a broker's four slots: a fifth connection
/// is closed at once, and the four keep their calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_at_its_limit_with_every_connection_busy_refuses_the_newcomer() {
    let redis = redis().await;
    let server = Server::start(&redis.url(), &[("WQ_MAX_CONNECTIONS", "4")]).await;
    let mut leases = Vec::new();
    let mut busy = 0;
    // The start-up health check's connection may still hold a slot: it is idle, so the first
    // of these evicts it.
    while busy < 4 {
        let client = server.client(WORKER).await;
        leases.push(tokio::spawn(async move {
            client
                .lease(pb::LeaseRequest {
                    queue: "batch-busy".into(),
                    max_items: 1,
                    max_wait: Some(duration(Duration::from_secs(30))),
                    ..pb::LeaseRequest::default()
                })
                .await
        }));
        busy += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut newcomer = TcpStream::connect(server.address)
        .await
        .expect("connecting");
    let closed = closed_within(&mut newcomer, Duration::from_secs(5)).await;
    assert!(closed.is_some(), "a fifth connection is closed at once");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        leases.iter().all(|l| !l.is_finished()),
        "the busy connections keep their waiting Leases"
    );
    let log = server.log();
    assert!(log.contains("every connection has a call open"), "{log}");
}

/// What an idle connection costs: 500 connections that made a health check and sit idle grow
/// the broker by less than the 40 KiB per connection the stated bound counts for buffers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_costs_less_than_the_stated_buffers() {
    const CONNECTIONS: u64 = 500;
    let redis = redis().await;
    let server = Server::start(&redis.url(), &[]).await;
    let before = server.memory_kib("VmRSS");
    let mut idle = Vec::new();
    for _ in 0..CONNECTIONS {
        idle.push(idle_channel(server.address).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown = server.memory_kib("VmRSS").saturating_sub(before);
    let per_connection = grown / CONNECTIONS;
    eprintln!(
        "hostile: {CONNECTIONS} idle connections: rss_before={}KiB grown={grown}KiB \
         per_connection={per_connection}KiB",
        before
    );
    assert!(
        per_connection < 40,
        "{per_connection} KiB per idle connection"
    );
    drop(idle);
}
