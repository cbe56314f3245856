//! TLS clients (the agent's `wss://` link to the broker, the broker's `https://` webhook calls):
//! which certificates are trusted (the public roots, plus a PEM file `ca_file`, whose
//! certificates are also pinned so that a server's own self-signed certificate works).
//! Configuration checks use [`trust_store`] to refuse an unreadable `ca_file` at start.

use std::path::Path;
use std::sync::Arc;

/// The certificates of `ca_file` (PEM); `key` names the setting in errors.
fn pem_certificates(
    ca_file: &std::path::Path,
    key: &str,
) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let pem = std::fs::read(ca_file).map_err(|e| format!("{key} {}: {e}", ca_file.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{key} {}: {e}", ca_file.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{key} {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            ca_file.display()
        ));
    }
    Ok(certs)
}

/// The certificates a client trusts: the public roots (webpki-roots) plus those of `ca_file`,
/// if given (`key` names the setting in errors).
pub fn trust_store(ca_file: &Path, key: &str) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if !ca_file.as_os_str().is_empty() {
        for cert in pem_certificates(ca_file, key)? {
            // A self-signed end-entity certificate is not a valid anchor; it is pinned below.
            let _ = roots.add(cert);
        }
    }
    Ok(roots)
}

/// Standard verification (public roots + `ca_file` as anchors), and besides: a server whose
/// certificate is exactly one of `ca_file` (a broker's own self-signed certificate, which
/// WebPKI refuses as an end entity) is accepted. Signatures are always checked.
#[derive(Debug)]
struct PinnedOrWebPki {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    pinned: Vec<rustls_pki_types::CertificateDer<'static>>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedOrWebPki {
    fn verify_server_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        intermediates: &[rustls_pki_types::CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if self
            .pinned
            .iter()
            .any(|p| p.as_ref() == end_entity.as_ref())
        {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        }
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A client configuration (ring provider, TLS 1.2 and 1.3) trusting the public roots and
/// `ca_file` (anchors, and pinned end-entity certificates).
pub fn client_config(ca_file: &Path, key: &str) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = trust_store(ca_file, key)?;
    let pinned = if ca_file.as_os_str().is_empty() {
        Vec::new()
    } else {
        pem_certificates(ca_file, key)?
    };
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::clone(&provider),
    )
    .build()
    .map_err(|e| format!("TLS set-up: {e}"))?;
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedOrWebPki { inner, pinned }))
        .with_no_client_auth())
}
