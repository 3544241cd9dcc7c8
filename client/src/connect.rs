//! Where the broker is and how to prove who we are: the URL, TLS (`https://`, a CA file, a
//! client certificate for mutual TLS) and the bearer token sent with every call.
//!
//! [`ConnectOptions`] doubles as a clap argument group, so `wq`, `wq-worker` and `wq-bench`
//! take the same flags and `WQ_*` environment variables.

use std::{fmt, path::PathBuf, time::Duration};

use tonic::{
    Request, Status,
    metadata::{AsciiMetadataValue, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

use crate::Error;

/// The broker URL used when none is given.
pub const DEFAULT_BROKER: &str = "http://127.0.0.1:50051";

/// How long establishing the connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The channel every stub of [`Client`](crate::Client) uses: the connection plus credentials.
pub type Transport = InterceptedService<Channel, Credentials>;

/// How to reach the broker.
#[derive(Clone, Default, clap::Args)]
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
    /// [`Error::InvalidUrl`], [`Error::Credentials`] or [`Error::Connect`].
    pub(crate) async fn connect(&self) -> Result<(Channel, Credentials), Error> {
        let url = self.full_url();
        let credentials = self.credentials()?;
        let invalid = |reason: String| Error::InvalidUrl {
            url: self.broker.clone(),
            reason,
        };
        let mut endpoint = Channel::from_shared(url.clone())
            .map_err(|e| invalid(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        if url.starts_with("https://") {
            endpoint = endpoint
                .tls_config(self.tls()?)
                .map_err(|e| invalid(e.to_string()))?;
        } else if self.ca_file.is_some() || self.client_cert.is_some() {
            return Err(Error::Credentials(
                "--ca-file and --client-cert need an https:// broker URL".into(),
            ));
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| Error::Connect { url, source })?;
        Ok((channel, credentials))
    }

    fn tls(&self) -> Result<ClientTlsConfig, Error> {
        let mut tls = ClientTlsConfig::new();
        tls = match &self.ca_file {
            Some(path) => tls.ca_certificate(Certificate::from_pem(read("--ca-file", path)?)),
            None => tls.with_native_roots(),
        };
        if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
            tls = tls.identity(Identity::from_pem(
                read("--client-cert", cert)?,
                read("--client-key", key)?,
            ));
        }
        Ok(tls)
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
