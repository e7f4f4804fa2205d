//! TLS on the front's device-facing listener, with the settings of `broker.tls`: our certificate
//! and key, and client certificates required, signed by `client_ca_file` (as rumqttd's TLS
//! listener required them). rustls with the `ring` provider, like the uplink.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::BrokerTlsConfig;

/// Builds the acceptor; the error names the file and what is wrong with it.
pub fn acceptor(t: &BrokerTlsConfig) -> Result<TlsAcceptor, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let ca = &t.client_ca_file;
    for cert in CertificateDer::pem_file_iter(ca)
        .map_err(|e| format!("cannot read client CA file {}: {e}", ca.display()))?
    {
        let cert = cert.map_err(|e| format!("bad certificate in {}: {e}", ca.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("unusable CA in {}: {e}", ca.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("no certificate found in {}", ca.display()));
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| format!("client CA {}: {e}", ca.display()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&t.cert_file)
        .map_err(|e| format!("cannot read {}: {e}", t.cert_file.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad certificate in {}: {e}", t.cert_file.display()))?;
    let key = PrivateKeyDer::from_pem_file(&t.key_file)
        .map_err(|e| format!("cannot read private key {}: {e}", t.key_file.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key do not fit: {e}"))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
