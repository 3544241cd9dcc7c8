//! Where the broker is and how to prove who we are: the URL, TLS (`https://`, a CA file, a
//! client certificate for mutual TLS) and the bearer token sent with every call; and how the
//! connection behaves: the largest message, the per-call deadline, HTTP/2 keepalive.
//!
//! [`ConnectOptions`] doubles as a clap argument group, so `wq`, `wq-worker` and `wq-bench`
//! take the same flags and `WQ_*` environment variables.

use std::{
    fmt,
    net::ToSocketAddrs as _,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::{
    Request, Status,
    metadata::{AsciiMetadataValue, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

use crate::{Error, error::tls_failure};

/// The broker URL used when none is given.
pub const DEFAULT_BROKER: &str = "http://127.0.0.1:50051";

/// The largest message sent or received by default: the broker's own default
/// `--max-message-bytes`, so any reply a default broker may send (a Lease of many large
/// items) can be read. tonic's default of 4 MiB is below what a broker sends.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// How long a call may take by default (a Lease: its `max_wait` plus this). Generous next to
/// the broker's own Redis timeout (2 s), short enough that a frozen broker is noticed.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection may be quiet before an HTTP/2 PING checks that the broker is alive.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// How long a PING may go unanswered before the connection counts as dead: its calls fail
/// with UNAVAILABLE and the next call reconnects.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long establishing the connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long each step of a probe (connecting, a read) may take: the probes run only after a
/// connection failed, to say why ([`speaks_tls`], [`TlsProbe`]).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The channel every stub of [`Client`](crate::Client) uses: the connection plus credentials.
pub type Transport = InterceptedService<Channel, Credentials>;

/// How to reach the broker.
#[derive(Clone, clap::Args)]
pub struct ConnectOptions {
    /// The broker's URL: http://host:port, or https://host:port for TLS (a bare host:port
    /// means http).
    #[arg(long, global = true, env = "WQ_BROKER", default_value = DEFAULT_BROKER)]
    pub broker: String,

    /// Bearer token sent with every call. Prefer WQ_TOKEN or --token-file: command lines are
    /// visible to other users of the machine.
    #[arg(
        long,
        global = true,
        env = "WQ_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,

    /// File holding the bearer token (for example a mounted Kubernetes Secret).
    #[arg(long, global = true, env = "WQ_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// PEM CA bundle to verify the broker's certificate with (https only; the system's roots
    /// otherwise).
    #[arg(long, global = true, env = "WQ_CA_FILE")]
    pub ca_file: Option<PathBuf>,

    /// PEM client certificate, for brokers that require one (needs --client-key).
    #[arg(long, global = true, env = "WQ_CLIENT_CERT", requires = "client_key")]
    pub client_cert: Option<PathBuf>,

    /// PEM private key of --client-cert.
    #[arg(long, global = true, env = "WQ_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<PathBuf>,

    /// Largest message sent or received, in bytes; match the broker's --max-message-bytes.
    #[arg(long, global = true, env = "WQ_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,

    /// How long one call may take before it fails (a Lease: its wait plus this).
    #[arg(long, global = true, env = "WQ_CALL_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub call_timeout: Duration,

    /// How long the connection may be quiet before a PING checks on the broker.
    #[arg(skip = DEFAULT_KEEPALIVE_INTERVAL)]
    pub keepalive_interval: Duration,

    /// How long a PING may go unanswered before the connection is given up.
    #[arg(skip = DEFAULT_KEEPALIVE_TIMEOUT)]
    pub keepalive_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            broker: DEFAULT_BROKER.to_owned(),
            token: None,
            token_file: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
        }
    }
}

impl fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("broker", &self.broker)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("ca_file", &self.ca_file)
            .field("client_cert", &self.client_cert)
            .field("client_key", &self.client_key)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("call_timeout", &self.call_timeout)
            .field("keepalive_interval", &self.keepalive_interval)
            .field("keepalive_timeout", &self.keepalive_timeout)
            .finish()
    }
}

impl ConnectOptions {
    /// Options for a plaintext, unauthenticated broker at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            broker: url.into(),
            ..Self::default()
        }
    }

    /// The broker URL with its scheme.
    pub fn full_url(&self) -> String {
        if self.broker.contains("://") {
            self.broker.clone()
        } else {
            format!("http://{}", self.broker)
        }
    }

    /// Connects, with TLS when the URL is https.
    ///
    /// # Errors
    /// [`Error::InvalidUrl`], [`Error::Credentials`], [`Error::InvalidOption`], [`Error::Tls`]
    /// or [`Error::Connect`].
    pub(crate) async fn connect(
        &self,
    ) -> Result<(Channel, Credentials, Option<Arc<TlsProbe>>), Error> {
        let url = self.full_url();
        let credentials = self.credentials()?;
        if self.max_message_bytes == 0 {
            return Err(Error::InvalidOption(
                "--max-message-bytes must be above 0".into(),
            ));
        }
        if self.call_timeout.is_zero() {
            return Err(Error::InvalidOption(
                "--call-timeout must be above 0".into(),
            ));
        }
        let invalid = |reason: String| Error::InvalidUrl {
            url: self.broker.clone(),
            reason,
        };
        let mut endpoint = Channel::from_shared(url.clone())
            .map_err(|e| invalid(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            // A broker that stops answering (frozen, or its node gone without a reset) is
            // noticed within interval + timeout even by a call that is only waiting, such as
            // a long Lease, and even between calls.
            .http2_keep_alive_interval(self.keepalive_interval)
            .keep_alive_timeout(self.keepalive_timeout)
            .keep_alive_while_idle(true);
        let mut probe = None;
        if url.starts_with("https://") {
            let files = self.tls_files()?;
            probe = TlsProbe::new(endpoint.uri(), &files).map(Arc::new);
            endpoint = endpoint
                .tls_config(files.config())
                .map_err(|e| invalid(e.to_string()))?;
        } else if self.ca_file.is_some() || self.client_cert.is_some() {
            return Err(Error::Credentials(
                "--ca-file and --client-cert need an https:// broker URL".into(),
            ));
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| match tls_failure(&source) {
                Some(reason) => Error::Tls {
                    url: url.clone(),
                    reason,
                },
                None => Error::Connect {
                    url: url.clone(),
                    source,
                },
            })?;
        Ok((channel, credentials, probe))
    }

    /// Reads and checks the TLS files: tonic would skip what it cannot parse (a CA file of
    /// garbage then trusts nothing, and looks like a broker with an unknown certificate) or
    /// notice only at the first connection, with a vaguer message.
    fn tls_files(&self) -> Result<TlsFiles, Error> {
        let ca = match &self.ca_file {
            Some(path) => {
                let pem = read("--ca-file", path)?;
                let roots = ca_roots(&pem).map_err(|problem| {
                    Error::Credentials(format!("--ca-file {}: {problem}", path.display()))
                })?;
                Some((pem, roots))
            }
            None => None,
        };
        let identity = match (&self.client_cert, &self.client_key) {
            (Some(cert_path), Some(key_path)) => {
                let cert = read("--client-cert", cert_path)?;
                let key = read("--client-key", key_path)?;
                if CertificateDer::pem_slice_iter(&cert).next().is_none() {
                    return Err(Error::Credentials(format!(
                        "--client-cert {}: holds no PEM certificate",
                        cert_path.display()
                    )));
                }
                if PrivateKeyDer::from_pem_slice(&key).is_err() {
                    return Err(Error::Credentials(format!(
                        "--client-key {}: holds no PEM private key",
                        key_path.display()
                    )));
                }
                Some((cert, key))
            }
            _ => None,
        };
        Ok(TlsFiles { ca, identity })
    }

    fn credentials(&self) -> Result<Credentials, Error> {
        let token = match (&self.token, &self.token_file) {
            (Some(token), _) => Some(token.trim().to_owned()),
            (None, Some(path)) => Some(
                String::from_utf8(read("--token-file", path)?)
                    .map_err(|_| Error::Credentials("--token-file is not UTF-8 text".into()))?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        let authorization = match token {
            None => None,
            Some(token) if token.is_empty() => {
                return Err(Error::Credentials("the bearer token is empty".into()));
            }
            Some(token) => Some(MetadataValue::try_from(format!("Bearer {token}")).map_err(
                |_| Error::Credentials("the bearer token must be printable ASCII".into()),
            )?),
        };
        Ok(Credentials { authorization })
    }
}

fn read(flag: &str, path: &std::path::Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::Credentials(format!("{flag} {}: {e}", path.display())))
}

/// The TLS files of [`ConnectOptions`], read and checked.
struct TlsFiles {
    /// The CA file's PEM and its certificates; the system's roots when absent.
    ca: Option<(Vec<u8>, rustls::RootCertStore)>,
    /// The client certificate's and key's PEM.
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl TlsFiles {
    /// tonic's TLS settings.
    fn config(&self) -> ClientTlsConfig {
        let mut tls = ClientTlsConfig::new();
        tls = match &self.ca {
            Some((pem, _)) => tls.ca_certificate(Certificate::from_pem(pem)),
            None => tls.with_native_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        tls
    }
}

/// The certificates of a CA file: at least one, and nothing unreadable.
fn ca_roots(pem: &[u8]) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| format!("not a readable PEM file ({e})"))?;
        roots
            .add(cert)
            .map_err(|e| format!("holds a certificate that cannot be a CA ({e})"))?;
    }
    if roots.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    Ok(roots)
}

/// A TLS handshake with the broker, made like the client's own, that then only listens.
///
/// TLS 1.3 lets a client finish its side of the handshake before the broker has checked the
/// client's certificate. The broker's refusal (an alert, then close) then races the client's
/// first request: the request's bytes arrive at a socket the broker has closed, the kernel
/// answers with a reset, and the client sees a broken pipe or "connection closed" instead of
/// the alert. Sending nothing after the handshake lets the alert arrive intact.
#[derive(Debug)]
pub(crate) struct TlsProbe {
    host: String,
    port: u16,
    config: Arc<rustls::ClientConfig>,
}

impl TlsProbe {
    /// The probe for `uri` with `files`; None when its settings cannot be built (tonic's
    /// connection then fails on its own, naming why).
    fn new(uri: &tonic::codegen::http::Uri, files: &TlsFiles) -> Option<Self> {
        let (host, port) = host_port(uri, 443)?;
        let roots = match &files.ca {
            Some((_, roots)) => roots.clone(),
            None => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
                roots
            }
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .ok()?
            .with_root_certificates(roots);
        let mut config = match &files.identity {
            Some((cert, key)) => {
                let chain = CertificateDer::pem_slice_iter(cert)
                    .collect::<Result<Vec<_>, _>>()
                    .ok()?;
                let key = PrivateKeyDer::from_pem_slice(key).ok()?;
                builder.with_client_auth_cert(chain, key).ok()?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Some(Self {
            host,
            port,
            config: Arc::new(config),
        })
    }

    /// What the broker refuses, in rustls' words, if it refuses the handshake within about a
    /// second of its end; None when it accepts (or when nothing can be told).
    pub(crate) async fn refusal(self: Arc<Self>) -> Option<String> {
        // rustls' own blocking I/O on a std socket: a few reads, off the async threads.
        tokio::task::spawn_blocking(move || self.listen())
            .await
            .ok()
            .flatten()
    }

    fn listen(&self) -> Option<String> {
        let address = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .ok()?
            .next()?;
        let mut socket = std::net::TcpStream::connect_timeout(&address, PROBE_TIMEOUT).ok()?;
        socket.set_read_timeout(Some(PROBE_TIMEOUT)).ok()?;
        socket.set_write_timeout(Some(PROBE_TIMEOUT)).ok()?;
        let name = ServerName::try_from(self.host.clone()).ok()?;
        let mut tls = rustls::ClientConnection::new(Arc::clone(&self.config), name).ok()?;
        let give_up = Instant::now() + 3 * PROBE_TIMEOUT;
        while Instant::now() < give_up {
            while tls.wants_write() {
                tls.write_tls(&mut socket).ok()?;
            }
            // A read timing out means the broker, after the handshake, waits for a request:
            // it accepted us.
            if tls.read_tls(&mut socket).ok()? == 0 {
                return None;
            }
            if let Err(error) = tls.process_new_packets() {
                return Some(error.to_string());
            }
        }
        None
    }
}

/// Whether the server at `url` (an http:// URL) answers the HTTP/2 preface with a TLS alert
/// record, as a TLS port does: a plaintext client then only sees a broken connection, and this
/// is what tells that apart from a broker that went away. Any doubt (no connection, no answer
/// within a second) counts as no.
pub(crate) async fn speaks_tls(url: &str) -> bool {
    let Ok(uri) = url.parse::<tonic::codegen::http::Uri>() else {
        return false;
    };
    let Some((host, port)) = host_port(&uri, 80) else {
        return false;
    };
    let probe = async move {
        let mut stream = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .ok()?;
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .ok()?;
        let mut head = [0u8; 2];
        stream.read_exact(&mut head).await.ok()?;
        // Content type 21 (alert), protocol version 3.x.
        Some(head == [0x15, 0x03])
    };
    tokio::time::timeout(PROBE_TIMEOUT, probe)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// Adds the bearer token, if any, to every call.
#[derive(Clone, Default)]
pub struct Credentials {
    authorization: Option<AsciiMetadataValue>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let token = self.authorization.as_ref().map(|_| "<redacted>");
        f.debug_struct("Credentials")
            .field("token", &token)
            .finish()
    }
}

impl Interceptor for Credentials {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(authorization) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", authorization.clone());
        }
        Ok(request)
    }
}

/// `uri`'s host (an IPv6 address without its brackets) and port, `default_port` if it names
/// none.
fn host_port(uri: &tonic::codegen::http::Uri, default_port: u16) -> Option<(String, u16)> {
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    Some((host.to_owned(), uri.port_u16().unwrap_or(default_port)))
}
