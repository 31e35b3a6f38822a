//! The encryption of a port-forwarded link: TLS 1.3 (RFC 8446, through rustls)
//! between graft and an agent in a pod, with the agent's certificate pinned.
//!
//! A port-forward ends on the agent's TCP listener on the pod's loopback, which
//! every container of the pod shares: a process there with the default
//! `CAP_NET_RAW` can read that traffic, and any process there can connect to
//! the port. So every transport of the link is a TLS 1.3 connection:
//!
//! 1. At start the agent makes a fresh key pair and a self-signed certificate
//!    for it ([`AgentIdentity::generate`]; the private key never leaves the
//!    agent's memory), and prints the certificate's SHA-256 ([`Fingerprint`],
//!    `link-cert sha256:HEX`) on stdout before its `ready` line. graft reads
//!    both from the container's log through the Kubernetes API, which nothing
//!    in the pod can write to.
//! 2. graft accepts exactly that certificate ([`connector`]): a verifier that
//!    compares the certificate's digest with the pin and then checks the
//!    handshake signature with its key, so only the holder of the agent's
//!    private key completes the handshake — not a process that connected to,
//!    squatted on or sits between the loopback's ends.
//! 3. Inside TLS graft proves it is the session's client with the session
//!    secret (the relink attach, [`crate::relink`]), which the agent checks
//!    against the SHA-256 in its pod spec; the spec thus carries nothing that
//!    opens a session. Relink tokens travel only inside TLS, and a recorded
//!    handshake cannot be replayed (TLS 1.3 without 0-RTT: every handshake
//!    is bound to the server's fresh random).
//!
//! Only TLS 1.3 is offered, with ring's cipher suites, and ALPN
//! [`ALPN`]: a peer that speaks anything else fails the handshake.

use std::fmt;
use std::io;
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use sha2::Digest;
use tokio::io::{AsyncRead, AsyncWrite};

pub use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The ALPN protocol (RFC 7301) both ends require.
pub const ALPN: &[u8] = b"graft-link/1";
/// The name graft asks for in its ClientHello (the pin, not the name, decides).
pub const SERVER_NAME: &str = "graft-agent.invalid";
/// The agent's stdout line that carries its certificate's fingerprint, before
/// the `ready` line: `link-cert sha256:HEX`.
pub const CERT_LINE_PREFIX: &str = "link-cert ";

/// The SHA-256 (FIPS 180-4) of a certificate's DER encoding.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of the DER-encoded certificate `der`.
    pub fn of(der: &[u8]) -> Fingerprint {
        Fingerprint(sha2::Sha256::digest(der).into())
    }
}

impl fmt::Display for Fingerprint {
    /// `sha256:` and 64 lower-case hex digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", crate::secret::hex(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Fingerprint {
    type Err = String;

    /// Parses `sha256:HEX` (64 hex digits, either case).
    fn from_str(s: &str) -> Result<Fingerprint, String> {
        let hex = s
            .trim()
            .strip_prefix("sha256:")
            .ok_or_else(|| format!("{s:?} is not a certificate fingerprint like sha256:HEX"))?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{s:?}: a SHA-256 fingerprint has 64 hex digits"));
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("checked hex digits");
        }
        Ok(Fingerprint(out))
    }
}

/// The agent's side: a fresh key pair and its self-signed certificate.
pub struct AgentIdentity {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    fingerprint: Fingerprint,
}

impl fmt::Debug for AgentIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentIdentity")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl AgentIdentity {
    /// A new ECDSA P-256 key pair (from the system's random source through
    /// ring) and a self-signed certificate for [`SERVER_NAME`].
    ///
    /// # Errors
    ///
    /// When key generation or signing fails (no random source).
    pub fn generate() -> Result<AgentIdentity, io::Error> {
        let fail = |what: &str, e: rcgen::Error| io::Error::other(format!("{what}: {e}"));
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| fail("generating the link's key pair", e))?;
        let cert = rcgen::CertificateParams::new(vec![SERVER_NAME.to_owned()])
            .and_then(|params| params.self_signed(&key))
            .map_err(|e| fail("signing the link's certificate", e))?;
        let cert = cert.der().clone();
        Ok(AgentIdentity {
            fingerprint: Fingerprint::of(&cert),
            cert,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        })
    }

    /// The certificate's fingerprint, which graft pins.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The line the agent prints before `ready`: `link-cert sha256:HEX`.
    pub fn cert_line(&self) -> String {
        format!("{CERT_LINE_PREFIX}{}", self.fingerprint)
    }

    /// A TLS 1.3 acceptor that presents this identity and requires [`ALPN`].
    ///
    /// # Errors
    ///
    /// When rustls refuses the key (it does not: it made it).
    pub fn acceptor(&self) -> Result<TlsAcceptor, io::Error> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(io::Error::other)?
            .with_no_client_auth()
            .with_single_cert(
                vec![self.cert.clone()],
                PrivateKeyDer::Pkcs8(self.key.clone_key()),
            )
            .map_err(io::Error::other)?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        // No session tickets or resumption: every transport is a full handshake.
        config.send_tls13_tickets = 0;
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS 1.3 connector that accepts only the certificate whose fingerprint is
/// `pin` (and a handshake signed with its key), with [`ALPN`].
pub fn connector(pin: Fingerprint) -> TlsConnector {
    TlsConnector::from(client_config(pin))
}

/// The rustls client configuration of [`connector`], for blocking clients
/// (`rustls::StreamOwned`).
pub fn client_config(pin: Fingerprint) -> Arc<rustls::ClientConfig> {
    let provider = provider();
    let verifier = PinnedCert {
        pin,
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring offers TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// The client end of a TLS transport.
pub type ClientStream<T> = tokio_rustls::client::TlsStream<T>;
/// The agent's end of a TLS transport.
pub type ServerStream<T> = tokio_rustls::server::TlsStream<T>;

/// Runs graft's side of the handshake on `stream`.
///
/// # Errors
///
/// `InvalidData` naming the cause when the peer's certificate is not the pinned
/// one (the message says so), the peer does not speak TLS 1.3 with [`ALPN`], or
/// the stream fails.
pub async fn connect<T>(connector: &TlsConnector, stream: T) -> io::Result<ClientStream<T>>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let name = ServerName::try_from(SERVER_NAME).expect("a valid DNS name");
    connector.connect(name, stream).await.map_err(plain_error)
}

/// A handshake error as people read it: rustls shows its "other" certificate
/// errors with `Debug`, so a certificate that is not the pinned one is said in
/// words (naming both fingerprints); other errors pass unchanged.
pub fn plain_error(e: io::Error) -> io::Error {
    let pinned = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(|tls| match tls {
            rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
                Some(other.0.to_string())
            }
            _ => None,
        });
    match pinned {
        Some(message) => io::Error::new(io::ErrorKind::InvalidData, message),
        None => e,
    }
}

/// A server certificate verifier that trusts one certificate, by its digest.
#[derive(Debug)]
struct PinnedCert {
    pin: Fingerprint,
    algorithms: WebPkiSupportedAlgorithms,
}

/// The error of a certificate that is not the pinned one.
#[derive(Debug, thiserror::Error)]
#[error(
    "the peer's certificate {got} is not the agent's {want}: something else answered on the \
     agent's port"
)]
struct NotPinned {
    got: Fingerprint,
    want: Fingerprint,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = Fingerprint::of(end_entity);
        if got == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(NotPinned {
                    got,
                    want: self.pin,
                })),
            )))
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn fingerprints_print_and_parse() {
        let f = Fingerprint::of(b"certificate");
        let text = f.to_string();
        assert!(
            text.starts_with("sha256:") && text.len() == 7 + 64,
            "{text}"
        );
        assert_eq!(text.parse::<Fingerprint>(), Ok(f));
        assert_eq!(
            text.to_uppercase().replace("SHA256", "sha256").parse(),
            Ok(f)
        );
        assert!("sha256:abc".parse::<Fingerprint>().is_err());
        assert!(text[7..].parse::<Fingerprint>().is_err());
    }

    /// Runs a handshake between an agent with `identity` and a client pinning
    /// `pin`; returns what the client read back, or its error.
    async fn exchange(identity: &AgentIdentity, pin: Fingerprint) -> io::Result<Vec<u8>> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = identity.acceptor().unwrap();
        let server = tokio::spawn(async move {
            let mut s = acceptor.accept(b).await?;
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await?;
            s.write_all(&buf).await?;
            s.flush().await?;
            io::Result::Ok(())
        });
        let client = async {
            let mut c = connect(&connector(pin), a).await?;
            c.write_all(b"hello").await?;
            c.flush().await?;
            let mut buf = vec![0u8; 5];
            c.read_exact(&mut buf).await?;
            io::Result::Ok(buf)
        };
        let got = client.await;
        let _ = server.await;
        got
    }

    #[tokio::test]
    async fn the_pinned_agent_is_reached() {
        let identity = AgentIdentity::generate().unwrap();
        let got = exchange(&identity, identity.fingerprint()).await.unwrap();
        assert_eq!(got, b"hello");
    }

    #[tokio::test]
    async fn another_certificate_is_refused_with_both_fingerprints() {
        let real = AgentIdentity::generate().unwrap();
        let impostor = AgentIdentity::generate().unwrap();
        assert_ne!(real.fingerprint(), impostor.fingerprint());
        let err = exchange(&impostor, real.fingerprint()).await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains("something else answered"), "{text}");
        assert!(text.contains(&real.fingerprint().to_string()), "{text}");
    }

    #[test]
    fn the_cert_line_carries_the_fingerprint() {
        let identity = AgentIdentity::generate().unwrap();
        let line = identity.cert_line();
        let parsed: Fingerprint = line
            .strip_prefix(CERT_LINE_PREFIX)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(parsed, identity.fingerprint());
    }
}
