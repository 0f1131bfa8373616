//! TLS of the remote API: a certificate chain and key from PEM files (what cert-manager or a
//! Secret mount provides), with rustls's ring provider (the one kube's client uses). The files
//! are read again when they change (checked at most every [`RELOAD_CHECK`], at a handshake),
//! so a renewed certificate is served without a restart; a renewal that cannot be read keeps
//! the certificate in use, logged.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

/// How often, at most, a handshake looks at the files' modification times.
const RELOAD_CHECK: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    #[error("TLS certificate {path}: {message}")]
    Certificate { path: String, message: String },
    #[error("TLS key {path}: {message}")]
    Key { path: String, message: String },
    #[error("TLS key {key} does not belong to the certificate {cert}: {message}")]
    Mismatch {
        cert: String,
        key: String,
        message: String,
    },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The certificate files and the key last read from them.
#[derive(Debug)]
struct Reloading {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: Mutex<Current>,
}

#[derive(Debug)]
struct Current {
    key: Arc<CertifiedKey>,
    modified: (Option<SystemTime>, Option<SystemTime>),
    checked: Instant,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn load(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let certificate = |message: String| TlsError::Certificate {
        path: cert.display().to_string(),
        message,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| certificate(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| certificate(e.to_string()))?;
    if chain.is_empty() {
        return Err(certificate("no CERTIFICATE in the file".into()));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.display().to_string(),
        message: e.to_string(),
    })?;
    CertifiedKey::from_der(chain, private, provider).map_err(|e| TlsError::Mismatch {
        cert: cert.display().to_string(),
        key: key.display().to_string(),
        message: e.to_string(),
    })
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.checked.elapsed() >= RELOAD_CHECK {
            current.checked = Instant::now();
            let now = (modified(&self.cert), modified(&self.key));
            if now != current.modified {
                match load(&self.cert, &self.key, &self.provider) {
                    Ok(key) => {
                        current.key = Arc::new(key);
                        current.modified = now;
                        info!(
                            cert = %self.cert.display(),
                            "remote API TLS certificate reloaded"
                        );
                    }
                    // Half-written during a renewal, say: tried again at the next check.
                    Err(error) => warn!(%error, "remote API TLS certificate not reloaded"),
                }
            }
        }
        Some(current.key.clone())
    }
}

/// An acceptor serving the certificate chain in `cert` with the key in `key` (HTTP/1.1).
pub(crate) fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let modified = (modified(cert), modified(key));
    let certified = load(cert, key, &provider)?;
    let resolver = Reloading {
        cert: cert.to_owned(),
        key: key.to_owned(),
        provider: provider.clone(),
        current: Mutex::new(Current {
            key: Arc::new(certified),
            modified,
            checked: Instant::now(),
        }),
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("tls.crt");
        let key = dir.path().join("tls.key");
        let err = acceptor(&cert, &key).err().unwrap().to_string();
        assert!(
            err.contains("TLS certificate") && err.contains("tls.crt"),
            "{err}"
        );
        std::fs::write(&cert, "not pem").unwrap();
        let err = acceptor(&cert, &key).err().unwrap().to_string();
        assert!(err.contains("no CERTIFICATE"), "{err}");
    }
}
