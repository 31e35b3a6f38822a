//! How the agent checks the servers it re-encrypts to under TLS steal
//! ([`super::tls`]).
//!
//! - The target's server ([`GivenCert`]): its end-entity certificate must be the
//!   one the session gave (`--tls-cert`), byte for byte, or chain to a
//!   certificate of the given chain under the usual WebPKI rules (RFC 5280, with
//!   the name the client asked for, RFC 6066 SNI). Either way the server must
//!   prove it holds the certificate's key by signing the handshake (RFC 8446
//!   §4.4.3), so only a server with the target's key passes.
//! - `--tls-insecure-upstream` and the session's own program under `--tls-local`
//!   ([`AnyCert`]): any certificate; the handshake signature is still checked
//!   against the certificate shown, which proves nothing about who it is. The
//!   program is the user's own process, reached over graft's authenticated
//!   link, and may use a certificate of its own (for `localhost`).

use std::sync::Arc;

use rustls::DigitallySignedStruct;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, RootCertStore, SignatureScheme};

/// Trusts the session's certificate (pinned) and what chains to its chain.
#[derive(Debug)]
pub struct GivenCert {
    /// The end-entity certificate the session gave.
    pinned: CertificateDer<'static>,
    /// WebPKI verification with the given chain's certificates as roots; `None`
    /// when none of them is usable as a root.
    chain: Option<Arc<WebPkiServerVerifier>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl GivenCert {
    /// A verifier for `chain` (end-entity first, not empty).
    pub fn new(chain: &[CertificateDer<'static>], provider: &Arc<CryptoProvider>) -> GivenCert {
        let mut roots = RootCertStore::empty();
        let (_added, _ignored) = roots.add_parsable_certificates(chain.iter().cloned());
        let chain_verifier = if roots.is_empty() {
            None
        } else {
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .ok()
        };
        GivenCert {
            pinned: chain[0].clone(),
            chain: chain_verifier,
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for GivenCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.pinned.as_ref() {
            return Ok(ServerCertVerified::assertion());
        }
        match &self.chain {
            Some(chain) => chain
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
                .map_err(|e| {
                    tracing::debug!("the target's certificate is not the given one: {e}");
                    rustls::Error::InvalidCertificate(
                        CertificateError::ApplicationVerificationFailure,
                    )
                }),
            None => Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Accepts any certificate (see the module docs for where).
#[derive(Debug)]
pub struct AnyCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl AnyCert {
    /// With `provider`'s signature algorithms.
    pub fn new(provider: &Arc<CryptoProvider>) -> AnyCert {
        AnyCert {
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
