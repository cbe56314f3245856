//! The broker's own TLS listener (`[tls]`): certificate loading, reloading on SIGHUP, and
//! serving each TLS connection to the session layer as a plain socket.
//!
//! The session (`conn`) reads and writes its socket through `&self` from two tasks, which a TLS
//! stream cannot do; so each TLS connection is terminated by a small task that shuttles bytes
//! between the TLS stream and one end of a Unix socket pair, and the session gets the other end
//! (as a `ws::Socket`). This module imports neither `conn` nor `server`.
//!
//! Reloading swaps the `rustls::ServerConfig` used for new handshakes; connections already
//! established keep theirs, so nothing is dropped. A reload that fails keeps the previous
//! certificate and says why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpStream, UnixStream};

/// Per-direction buffer of the byte shuttle of one TLS connection.
const SHUTTLE_BUFFER: usize = 16 * 1024;

/// The current certificate, for new handshakes.
pub struct Tls {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Arc<ServerConfig>>,
}

/// Reads the certificate chain and key into a server configuration.
pub fn load(cert_file: &Path, key_file: &Path) -> Result<ServerConfig, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| format!("tls.cert_file {}: {e}", cert_file.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls.cert_file {}: {e}", cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "tls.cert_file {}: no CERTIFICATE in it (a PEM file, server certificate first)",
            cert_file.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
        format!(
            "tls.key_file {}: {e} (a PEM private key: PKCS#8, RSA or EC)",
            key_file.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            format!(
                "tls.cert_file {} and tls.key_file {} do not go together: {e}",
                cert_file.display(),
                key_file.display()
            )
        })
}

impl Tls {
    /// Loads the files; fails with a message naming the file.
    pub fn new(cert_file: &Path, key_file: &Path) -> Result<Tls, String> {
        let config = load(cert_file, key_file)?;
        Ok(Tls {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            current: RwLock::new(Arc::new(config)),
        })
    }

    /// Reads the files again; on failure the previous certificate stays.
    pub fn reload(&self) -> Result<(), String> {
        let config = load(&self.cert_file, &self.key_file)?;
        if let Ok(mut c) = self.current.write() {
            *c = Arc::new(config);
        }
        Ok(())
    }

    fn config(&self) -> Option<Arc<ServerConfig>> {
        self.current.read().ok().map(|c| Arc::clone(&c))
    }

    /// The TLS handshake within `timeout`; then the plain socket the session uses, served by a
    /// task until either side closes.
    pub async fn accept(&self, tcp: TcpStream, timeout: Duration) -> Result<UnixStream, String> {
        let _ = tcp.set_nodelay(true);
        let config = self.config().ok_or("TLS configuration unavailable")?;
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let mut tls = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(format!("TLS handshake failed: {e}")),
            Err(_) => return Err(format!("TLS handshake not done within {timeout:?}")),
        };
        let (session_end, mut ours) =
            UnixStream::pair().map_err(|e| format!("cannot make a socket pair: {e}"))?;
        tokio::spawn(async move {
            let _ = tokio::io::copy_bidirectional_with_sizes(
                &mut tls,
                &mut ours,
                SHUTTLE_BUFFER,
                SHUTTLE_BUFFER,
            )
            .await;
        });
        Ok(session_end)
    }
}
