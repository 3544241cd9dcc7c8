//! Raw HTTP/2 attackers: half-sent messages on every stream a connection may open, and calls
//! kept open with their replies unread.

use super::*;

/// One attacking HTTP/2 connection: its streams stay open (each with half a message) until it
/// is dropped.
pub(super) struct Attack {
    pub(super) streams: Vec<h2::SendStream<Bytes>>,
    pub(super) driver: JoinHandle<()>,
    /// Message bytes the broker took in, over all streams.
    pub(super) sent: usize,
    /// Streams the broker ended (answered, reset) before they had sent everything.
    pub(super) ended: usize,
}

impl Drop for Attack {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// How long a stream may wait for flow-control window before the attacker counts it as stalled:
/// long enough that a slow broker on a loaded machine is not mistaken for one that stopped
/// reading.
pub(super) const STALL: Duration = Duration::from_secs(5);

/// Opens one connection and on it `streams` calls to `path` (with `token` as bearer token, if
/// any), each a gRPC prefix announcing `declared` bytes and then up to `per_stream` of them,
/// sent only as fast as the broker's flow-control window allows. Returns once every stream has
/// sent its share, been ended by the broker, or stalled for [`STALL`].
pub(super) async fn half_sent_messages(
    address: SocketAddr,
    path: &str,
    token: Option<&str>,
    streams: usize,
    declared: u32,
    per_stream: usize,
) -> Attack {
    let tcp = TcpStream::connect(address).await.expect("connecting");
    let (mut send, connection) = h2::client::handshake(tcp)
        .await
        .expect("HTTP/2 handshake with the broker");
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut pushes = Vec::new();
    for _ in 0..streams {
        // A broker that limits streams per connection makes this wait: count the stream as
        // never opened after a stall.
        send = match tokio::time::timeout(STALL, send.ready()).await {
            Ok(Ok(send)) => send,
            Ok(Err(_)) | Err(_) => break,
        };
        let mut request = http::Request::post(format!("http://{address}{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request.body(()).expect("valid request headers");
        let Ok((response, stream)) = send.send_request(request, false) else {
            break;
        };
        pushes.push(tokio::spawn(push(stream, response, declared, per_stream)));
    }
    let mut attack = Attack {
        streams: Vec::new(),
        driver,
        sent: 0,
        ended: 0,
    };
    for push in pushes {
        let (stream, sent, ended) = push.await.expect("a push task");
        attack.sent += sent;
        attack.ended += usize::from(ended);
        attack.streams.extend(stream);
    }
    attack
}

/// Sends the prefix and then zeros while the window allows; returns the stream (unless the
/// broker ended it), the bytes sent, and whether the broker ended it early.
pub(super) async fn push(
    mut stream: h2::SendStream<Bytes>,
    response: h2::client::ResponseFuture,
    declared: u32,
    total: usize,
) -> (Option<h2::SendStream<Bytes>>, usize, bool) {
    const CHUNK: usize = 256 * 1024;
    let zeros = Bytes::from(vec![0u8; CHUNK]);
    let mut prefix = vec![0u8];
    prefix.extend_from_slice(&declared.to_be_bytes());
    if stream.send_data(prefix.into(), false).is_err() {
        return (None, 0, true);
    }
    // Dropping the response future would not end the stream; polling it shows an early answer.
    tokio::pin!(response);
    let mut sent = 0;
    while sent < total {
        stream.reserve_capacity((total - sent).min(CHUNK));
        let capacity = tokio::select! {
            capacity = futures_util::future::poll_fn(|cx| stream.poll_capacity(cx)) => capacity,
            _ = &mut response => return (None, sent, true),
            () = tokio::time::sleep(STALL) => break,
        };
        match capacity {
            Some(Ok(0)) => continue,
            Some(Ok(n)) => {
                let n = n.min(total - sent);
                if stream.send_data(zeros.slice(..n), false).is_err() {
                    return (None, sent, true);
                }
                sent += n;
            }
            Some(Err(_)) | None => return (None, sent, true),
        }
    }
    (Some(stream), sent, false)
}

/// Reads until the broker closes `tcp` or `limit` passes: how long it took to close, or None.
pub(super) async fn closed_within(tcp: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buffer = [0; 4096];
    loop {
        match tokio::time::timeout_at((started + limit).into(), tcp.read(&mut buffer)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// One HTTP/2 connection's calls, made one after another and kept open (their replies unread)
/// until it is dropped.
pub(super) struct OpenCalls {
    /// The calls the broker answered with response headers, kept open.
    pub(super) kept: Vec<(h2::SendStream<Bytes>, h2::RecvStream)>,
    /// The calls answered with a status at once (trailers only), by code.
    pub(super) refused: Vec<Code>,
    /// Why the connection stopped before making all its calls.
    pub(super) stopped: Option<String>,
    pub(super) driver: JoinHandle<()>,
}

impl Drop for OpenCalls {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl OpenCalls {
    pub(super) fn refused_with(&self, code: Code) -> usize {
        self.refused.iter().filter(|c| **c == code).count()
    }
}

/// Opens one connection whose receive window per stream is `window` bytes, and on it up to
/// `calls` calls to `path`, one after another, each sending `message` as its whole request
/// and waiting for the response headers before the next one starts. Reply bodies are never
/// read.
pub(super) async fn open_calls(
    address: SocketAddr,
    path: &str,
    token: Option<&str>,
    message: &[u8],
    calls: usize,
    window: u32,
) -> OpenCalls {
    let tcp = TcpStream::connect(address).await.expect("connecting");
    let (mut send, connection) = h2::client::Builder::new()
        .initial_window_size(window)
        .handshake(tcp)
        .await
        .expect("HTTP/2 handshake with the broker");
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut framed = vec![0u8];
    framed.extend_from_slice(&u32::try_from(message.len()).expect("small").to_be_bytes());
    framed.extend_from_slice(message);
    let framed = Bytes::from(framed);
    let mut open = OpenCalls {
        kept: Vec::new(),
        refused: Vec::new(),
        stopped: None,
        driver,
    };
    for _ in 0..calls {
        send = match tokio::time::timeout(STALL, send.ready()).await {
            Ok(Ok(send)) => send,
            Ok(Err(error)) => {
                open.stopped = Some(format!("no stream: {error}"));
                break;
            }
            Err(_) => {
                open.stopped = Some("no stream within the stall time".into());
                break;
            }
        };
        let mut request = http::Request::post(format!("http://{address}{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request.body(()).expect("valid request headers");
        let (response, mut stream) = match send.send_request(request, false) {
            Ok(sent) => sent,
            Err(error) => {
                open.stopped = Some(format!("request: {error}"));
                break;
            }
        };
        if let Err(error) = stream.send_data(framed.clone(), true) {
            open.stopped = Some(format!("data: {error}"));
            break;
        }
        let response = match tokio::time::timeout(STALL, response).await {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => {
                open.stopped = Some(format!("response: {error}"));
                break;
            }
            Err(_) => {
                open.stopped = Some("no response within the stall time".into());
                break;
            }
        };
        match response.headers().get("grpc-status") {
            Some(code) => {
                let code = code.to_str().ok().and_then(|c| c.parse::<i32>().ok());
                open.refused.push(code.map_or(Code::Unknown, Code::from));
            }
            None => open.kept.push((stream, response.into_body())),
        }
    }
    open
}
