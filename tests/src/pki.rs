//! Certificates made at test time: a CA, a server certificate for `localhost` and 127.0.0.1,
//! a client certificate from the same CA, and one from a CA the broker does not trust.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tempfile::TempDir;

/// PEM files in a temporary directory (removed on drop).
#[derive(Debug)]
pub struct Pki {
    dir: TempDir,
}

impl Pki {
    /// Generates everything.
    pub fn generate() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let pki = Self { dir };
        let ca = pki.authority("ca");
        pki.leaf(
            &ca,
            "server",
            vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
        );
        pki.leaf(&ca, "client", vec!["wq-client".to_owned()]);
        let stranger = pki.authority("stranger-ca");
        pki.leaf(&stranger, "stranger", vec!["stranger".to_owned()]);
        pki
    }

    fn authority(&self, name: &str) -> CertifiedIssuer<'static, KeyPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = common_name(name);
        let key = KeyPair::generate().expect("a CA key");
        let ca = CertifiedIssuer::self_signed(params, key).expect("a self-signed CA");
        self.write(&format!("{name}.pem"), &ca.pem());
        ca
    }

    fn leaf(&self, ca: &CertifiedIssuer<'static, KeyPair>, name: &str, names: Vec<String>) {
        let key = KeyPair::generate().expect("a key");
        let mut params = CertificateParams::new(names).expect("certificate parameters");
        // OpenSSL (redis-server, redis-cli) takes a leaf named like its issuer for self-signed.
        params.distinguished_name = common_name(name);
        let cert = params.signed_by(&key, ca).expect("a signed certificate");
        self.write(&format!("{name}.pem"), &cert.pem());
        self.write(&format!("{name}-key.pem"), &key.serialize_pem());
    }

    fn write(&self, file: &str, pem: &str) {
        std::fs::write(self.path(file), pem).expect("writing a PEM file");
    }

    /// A file of this PKI: `ca.pem`, `server.pem`, `server-key.pem`, `client.pem`,
    /// `client-key.pem`, `stranger-ca.pem`, `stranger.pem`, `stranger-key.pem`.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn common_name(name: &str) -> rcgen::DistinguishedName {
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, format!("wq test {name}"));
    dn
}
