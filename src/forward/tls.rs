//! TLS for the uplink: rustls with the `ring` provider (no aws-lc C build; cross-compiles).

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::ForwardError;
use crate::config::UplinkTlsConfig;

/// Builds the rustls client configuration (ring provider) for an `mqtts://` uplink: the given CA
/// bundle or the system's roots, and a client certificate for mutual TLS when configured.
pub fn tls_config(t: &UplinkTlsConfig) -> Result<Arc<rustls::ClientConfig>, ForwardError> {
    let tls_err = |what: String| ForwardError::Tls(what);
    let mut roots = rustls::RootCertStore::empty();
    match &t.ca_file {
        Some(ca) => {
            let iter = CertificateDer::pem_file_iter(ca)
                .map_err(|e| tls_err(format!("cannot read CA file {}: {e}", ca.display())))?;
            for cert in iter {
                let cert =
                    cert.map_err(|e| tls_err(format!("bad certificate in {}: {e}", ca.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| tls_err(format!("unusable CA in {}: {e}", ca.display())))?;
            }
            if roots.is_empty() {
                return Err(tls_err(format!("no certificate found in {}", ca.display())));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(tls_err(
                    "no system CA certificates found (install ca-certificates or set uplink.tls.ca_file)"
                        .to_string(),
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(e.to_string()))?
        .with_root_certificates(roots);
    let config = match (&t.cert_file, &t.key_file) {
        (Some(cert), Some(key)) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .map_err(|e| tls_err(format!("cannot read {}: {e}", cert.display())))?
                .collect::<Result<_, _>>()
                .map_err(|e| tls_err(format!("bad certificate in {}: {e}", cert.display())))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| tls_err(format!("cannot read private key {}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| tls_err(format!("client certificate and key do not fit: {e}")))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}
