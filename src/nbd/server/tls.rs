//! TLS for the NBD server (rustls): QEMU's `tls-creds-x509` objects with
//! `endpoint=server`. The directory holds QEMU's file names:
//! `server-cert.pem` (the server's certificate, then its chain),
//! `server-key.pem`, and `ca-cert.pem` (the CA that client certificates
//! must chain to, when `verify-peer` is on, QEMU's default).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;

/// Loaded server credentials.
#[derive(Clone)]
pub struct TlsCreds {
    pub id: String,
    pub dir: PathBuf,
    pub verify_peer: bool,
    pub config: Arc<ServerConfig>,
}

impl std::fmt::Debug for TlsCreds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsCreds")
            .field("id", &self.id)
            .field("dir", &self.dir)
            .field("verify_peer", &self.verify_peer)
            .finish()
    }
}

/// ring: a small build with no C toolchain beyond cc (aws-lc-rs, rustls'
/// default, needs cmake and adds minutes to the build); it lacks only the
/// post-quantum key exchange, which NBD clients (GnuTLS) do not offer yet.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("Unable to read certificate file '{}': {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("Unable to parse certificate file '{}': {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("No certificates in file '{}'", path.display()));
    }
    Ok(certs)
}

impl TlsCreds {
    /// Loads `dir` (QEMU's tls-creds-x509 with endpoint=server).
    pub fn load(id: &str, dir: &Path, verify_peer: bool) -> Result<TlsCreds, String> {
        let chain = certs(&dir.join("server-cert.pem"))?;
        let key_path = dir.join("server-key.pem");
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| {
            format!(
                "Unable to read private key file '{}': {e}",
                key_path.display()
            )
        })?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?;
        let builder = if verify_peer {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs(&dir.join("ca-cert.pem"))? {
                roots
                    .add(c)
                    .map_err(|e| format!("Unable to use CA certificate: {e}"))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| format!("TLS client verification: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder
            .with_single_cert(chain, key)
            .map_err(|e| format!("Unable to use the server certificate and key: {e}"))?;
        Ok(TlsCreds {
            id: id.to_string(),
            dir: dir.to_path_buf(),
            verify_peer,
            config: Arc::new(config),
        })
    }
}
