//! TLS for the broker's listener: the server certificate, and optionally the CA that client
//! certificates must chain to (mutual TLS). rustls with the ring provider does the work.

use std::path::Path;

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::config::SecurityConfig;

/// The TLS settings for `security`, or None when the broker serves plaintext.
///
/// # Errors
/// A message naming the flag whose file cannot be read.
pub fn server_config(security: &SecurityConfig) -> Result<Option<ServerTlsConfig>, String> {
    let (Some(cert), Some(key)) = (&security.tls_cert, &security.tls_key) else {
        if security.tls_client_ca.is_some() {
            return Err("--tls-client-ca needs --tls-cert and --tls-key".into());
        }
        return Ok(None);
    };
    let identity = Identity::from_pem(read_pem("--tls-cert", cert)?, read_pem("--tls-key", key)?);
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &security.tls_client_ca {
        config = config
            .client_ca_root(Certificate::from_pem(read_pem("--tls-client-ca", ca)?))
            .client_auth_optional(false);
    }
    Ok(Some(config))
}

fn read_pem(flag: &str, path: &Path) -> Result<Vec<u8>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    if !pem.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(format!("{flag} {}: not a PEM file", path.display()));
    }
    Ok(pem)
}
