//! TLS steal: a filtered port that serves HTTPS, decrypted by the agent so the
//! HTTP filters can read its requests.
//!
//! A session that subscribes with a certificate and key
//! ([`graft_protocol::incoming::TlsTermination`]) gets a [`TlsSetup`] attached to
//! its subscriber ([`TlsSubscriber`]). When a connection on a filtered port opens
//! with a TLS ClientHello ([`detect`]), the oldest such subscription's setup
//! terminates it ([`serve`]):
//!
//! 1. the ClientHello is read ([`tokio_rustls::LazyConfigAcceptor`]); a malformed
//!    one, or none within [`HANDSHAKE_TIMEOUT`], ends that connection only;
//! 2. the agent opens a TLS connection to the target's own server offering the
//!    client's ALPN protocols among `h2` and `http/1.1` (RFC 7301), and offers
//!    the client what the target chose, so each request can go on to the target
//!    in the version it came in; that first connection serves the first request
//!    for the target (when the target does not answer, the client's own choice is
//!    offered);
//! 3. the decrypted connection is served by [`super::http::serve`], which routes
//!    each request by the filters exactly as on a plain port; the [`Hops`] of the
//!    connection open its upstream connections: to the target over TLS (checked
//!    by [`super::tls_verify`]), to a session as plain HTTP or, with
//!    `--tls-local`, over TLS again.
//!
//! Versions on the way to a session: the program usually runs without TLS and
//! speaks HTTP/1.1 only (Go's and Python's plain servers do), so an HTTP/2
//! request goes to it as HTTP/1.1, except gRPC (`content-type: application/grpc`,
//! which needs HTTP/2: it goes with prior knowledge, as gRPC servers accept). Under
//! `--tls-local` the program's ALPN choice decides.
//!
//! Without a certificate, a filtered port that receives a ClientHello cannot read
//! its requests: each filtered subscription of the port is refused with
//! [`refusal`] (naming the port and the flags to add) and the connection is
//! passed on whole as on an unfiltered port. An unfiltered steal never looks at
//! the bytes, so TLS passes through it unchanged.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::http::{HeaderMap, Request, Uri, Version};
use graft_protocol::incoming::TlsTermination;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::Acceptor;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, ServerConfig};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::{LazyConfigAcceptor, TlsConnector};
use tokio_util::task::TaskTracker;
use zeroize::Zeroize;

use super::tls_verify::{AnyCert, GivenCert};
use super::{BoxFuture, BoxIo, ConnMeta, DETECT_TIMEOUT, PortSubs, Sub, Subscriber, http, tee};

/// How long a client may take to send its ClientHello and finish the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the first connection to the target's server may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// The ALPN names of HTTP/2 over TLS and HTTP/1.1 (RFC 7301, RFC 9113 §3.2).
const H2: &[u8] = b"h2";
const H1: &[u8] = b"http/1.1";

/// A compiled [`TlsTermination`]: what the agent presents to clients and how it
/// connects on.
pub struct TlsSetup {
    /// Presents the session's certificate; ALPN is set per connection.
    server: Arc<ServerConfig>,
    /// To the target's server, checked by [`GivenCert`] (or [`AnyCert`]).
    upstream: Arc<ClientConfig>,
    /// To the session's program under `--tls-local`.
    local: Option<Arc<ClientConfig>>,
}

impl std::fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSetup")
            .field("local", &self.local.is_some())
            .finish_non_exhaustive()
    }
}

/// Why a session's TLS termination (`--tls-cert`, `--tls-key`) cannot be set
/// up; the message goes to the client (`SubscribeError::Tls`).
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The certificate is not PEM.
    #[error("the TLS certificate (--tls-cert) is not PEM: {0}")]
    CertNotPem(rustls::pki_types::pem::Error),
    /// The PEM holds no certificate.
    #[error("the TLS certificate (--tls-cert) holds no CERTIFICATE block")]
    NoCertificate,
    /// The key file holds no private key rustls reads.
    #[error(
        "the TLS key (--tls-key) holds no readable private key (PKCS#8, PKCS#1 or SEC1 PEM): {0}"
    )]
    NoKey(rustls::pki_types::pem::Error),
    /// The key is of a type rustls cannot sign with.
    #[error("the TLS key (--tls-key) cannot sign: {0}")]
    CannotSign(rustls::Error),
    /// The key is not the certificate's.
    #[error("the TLS key (--tls-key) is not the key of the certificate (--tls-cert): {0}")]
    KeyMismatch(rustls::Error),
    /// rustls refused the configuration.
    #[error("the TLS configuration is refused: {0}")]
    Config(rustls::Error),
}

impl TlsSetup {
    /// Parses and checks a session's termination. The PEM key is read into a
    /// buffer that is zeroed before this returns; the signing key lives inside
    /// rustls from then on.
    ///
    /// # Errors
    ///
    /// [`TlsSetupError`] naming what is wrong: no certificate in the PEM, no or
    /// an unreadable private key, or a key that is not the certificate's.
    pub fn new(tls: &TlsTermination) -> Result<TlsSetup, TlsSetupError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = CertificateDer::pem_slice_iter(tls.cert_chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(TlsSetupError::CertNotPem)?;
        if chain.is_empty() {
            return Err(TlsSetupError::NoCertificate);
        }
        let mut key =
            PrivateKeyDer::from_pem_slice(&tls.key_pem.0).map_err(TlsSetupError::NoKey)?;
        let signing = rustls::crypto::ring::sign::any_supported_type(&key);
        wipe(&mut key);
        let signing = signing.map_err(TlsSetupError::CannotSign)?;
        let certified = CertifiedKey::new(chain.clone(), signing);
        certified.keys_match().map_err(TlsSetupError::KeyMismatch)?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsSetupError::Config)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
        let client = |verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>| {
            ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map(|b| {
                    Arc::new(
                        b.dangerous()
                            .with_custom_certificate_verifier(verifier)
                            .with_no_client_auth(),
                    )
                })
                .map_err(TlsSetupError::Config)
        };
        let upstream = if tls.insecure_upstream {
            client(Arc::new(AnyCert::new(&provider)))?
        } else {
            client(Arc::new(GivenCert::new(&chain, &provider)))?
        };
        let local = if tls.local {
            Some(client(Arc::new(AnyCert::new(&provider)))?)
        } else {
            None
        };
        Ok(TlsSetup {
            server: Arc::new(server),
            upstream,
            local,
        })
    }
}

/// Zeroes the DER bytes of a private key in place.
fn wipe(key: &mut PrivateKeyDer<'static>) {
    key.zeroize();
}

/// A session's subscriber whose subscription carries a [`TlsSetup`].
pub struct TlsSubscriber {
    /// The session.
    pub inner: Arc<dyn Subscriber>,
    /// Its termination.
    pub setup: Arc<TlsSetup>,
}

impl Subscriber for TlsSubscriber {
    fn open(self: Arc<Self>, meta: ConnMeta) -> BoxFuture<io::Result<BoxIo>> {
        self.inner.clone().open(meta)
    }

    fn hand_over(self: Arc<Self>, meta: ConnMeta, stream: TcpStream) -> BoxFuture<io::Result<()>> {
        self.inner.clone().hand_over(meta, stream)
    }

    fn tls(&self) -> Option<Arc<TlsSetup>> {
        Some(self.setup.clone())
    }

    fn refuse(self: Arc<Self>, port: u16, reason: String) {
        self.inner.clone().refuse(port, reason);
    }

    fn watches_routes(&self) -> bool {
        self.inner.watches_routes()
    }

    fn tap_times(&self) -> bool {
        self.inner.tap_times()
    }

    fn routed(&self, record: graft_protocol::incoming::RoutedRequest) {
        self.inner.routed(record);
    }
}

/// What the first bytes of a connection on a filtered port are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    /// A TLS handshake record: a ClientHello.
    Tls,
    /// An HTTP/1.x request line or the HTTP/2 preface.
    Http,
    /// Something else, or nothing within [`DETECT_TIMEOUT`].
    Other,
}

/// Whether `first` opens a TLS handshake: a record of content type 22
/// (handshake) with protocol major version 3 (RFC 8446 §5.1; every TLS and SSL 3
/// record). `None`: not enough bytes.
pub fn is_client_hello(first: &[u8]) -> Option<bool> {
    match first {
        [] => None,
        [0x16] => None,
        [0x16, 0x03, ..] => Some(true),
        _ => Some(false),
    }
}

/// Peeks at a connection's first bytes, for at most [`DETECT_TIMEOUT`].
pub async fn detect(stream: &TcpStream) -> Sniffed {
    let deadline = Instant::now() + DETECT_TIMEOUT;
    let mut buf = [0u8; 24];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => return Sniffed::Other,
        };
        if n == 0 {
            return Sniffed::Other;
        }
        let first = &buf[..n];
        match (is_client_hello(first), http::classify(first)) {
            (Some(true), _) => return Sniffed::Tls,
            (_, Some(true)) => return Sniffed::Http,
            (Some(false), Some(false)) => return Sniffed::Other,
            _ if n == buf.len() || Instant::now() >= deadline => return Sniffed::Other,
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// What a session is told when its filtered `port` receives TLS and no session
/// gave a certificate for it.
pub fn refusal(port: u16) -> String {
    format!(
        "port {port} received a TLS connection (a ClientHello), and a filter cannot read \
         encrypted requests: the filtered steal of port {port} is refused and its traffic goes \
         on as before. To filter its HTTPS requests give the server's certificate: \
         --tls-cert FILE --tls-key FILE (or --tls-cert secret/NAME, a kubernetes.io/tls Secret \
         of the target's namespace); to take every connection as it is, drop the filter"
    )
}

/// Tells every filtered subscription of `subs` that its port serves TLS and
/// none of them can decrypt it.
pub fn refuse_filters(subs: &PortSubs, port: u16) {
    tracing::warn!(port, "TLS on a filtered port without a certificate");
    for sub in subs.subs.iter().filter(|s| s.filter.is_some()) {
        sub.to.clone().refuse(port, refusal(port));
    }
}

/// The ALPN protocol `name` speaks, when it is one of HTTP's.
fn version_of(name: Option<&[u8]>) -> Option<Version> {
    match name {
        Some(H2) => Some(Version::HTTP_2),
        Some(H1) => Some(Version::HTTP_11),
        _ => None,
    }
}

/// Terminates TLS on the client connection `stream` with `setup` and serves its
/// requests with [`http::serve`]; a bad or slow handshake ends this connection
/// only (said in the debug log, without the client's bytes).
pub async fn serve(
    stream: TcpStream,
    meta: ConnMeta,
    subs: Arc<PortSubs>,
    in_flight: TaskTracker,
    setup: Arc<TlsSetup>,
) {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let accept = LazyConfigAcceptor::new(Acceptor::default(), stream);
    let start = match tokio::time::timeout_at(deadline, accept).await {
        Ok(Ok(start)) => start,
        Ok(Err(e)) => {
            tracing::debug!(peer = %meta.peer, port = meta.port, "bad ClientHello: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!(peer = %meta.peer, port = meta.port, "no ClientHello in time");
            return;
        }
    };
    let hello = start.client_hello();
    let server_name = hello
        .server_name()
        .and_then(|n| ServerName::try_from(n.to_owned()).ok())
        .unwrap_or_else(|| ServerName::IpAddress(meta.local.ip().into()));
    let offered: Vec<Vec<u8>> = hello
        .alpn()
        .map(|names| {
            names
                .filter(|n| *n == H2 || *n == H1)
                .map(<[u8]>::to_vec)
                .collect()
        })
        .unwrap_or_default();
    let hops = Hops {
        setup: setup.clone(),
        server_name,
        alpn: Vec::new(),
        first_target: Mutex::new(None),
    };
    let probe = tokio::time::timeout(PROBE_TIMEOUT, hops.connect_target(meta, offered.clone()));
    let alpn = match probe.await {
        Ok(Ok(target)) => {
            let chosen = target.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            *hops
                .first_target
                .lock()
                .expect("first target lock poisoned") = Some(target);
            chosen.into_iter().collect()
        }
        Ok(Err(e)) => {
            tracing::debug!(target = %meta.local, "the target's TLS server did not answer: {e}");
            offered
        }
        Err(_) => {
            tracing::debug!(target = %meta.local, "the target's TLS server is slow; not waited for");
            offered
        }
    };
    let mut config = (*setup.server).clone();
    config.alpn_protocols = alpn;
    let tls = match tokio::time::timeout_at(deadline, start.into_stream(Arc::new(config))).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(peer = %meta.peer, port = meta.port, "TLS handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!(peer = %meta.peer, port = meta.port, "TLS handshake too slow");
            return;
        }
    };
    let negotiated = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let hops = Hops {
        alpn: negotiated.into_iter().collect(),
        ..hops
    };
    http::serve(tls, meta, subs, in_flight, Some(Arc::new(hops))).await;
}

/// The TLS stream to the target's server.
type TargetStream = tokio_rustls::client::TlsStream<TcpStream>;

/// How one decrypted client connection reaches its destinations.
pub struct Hops {
    setup: Arc<TlsSetup>,
    /// The name the client asked for (SNI), else the target's address.
    server_name: ServerName<'static>,
    /// The protocol the client and the agent agreed on (empty: none).
    alpn: Vec<Vec<u8>>,
    /// The connection opened while the client's handshake waited, for the first
    /// request to the target.
    first_target: Mutex<Option<TargetStream>>,
}

impl Hops {
    /// A new TLS connection to the target's server at `meta.local`, offering `alpn`.
    async fn connect_target(&self, meta: ConnMeta, alpn: Vec<Vec<u8>>) -> io::Result<TargetStream> {
        let tcp = tee::connect_target(meta.local, meta.peer).await?;
        let mut config = (*self.setup.upstream).clone();
        config.alpn_protocols = alpn;
        TlsConnector::from(Arc::new(config))
            .connect(self.server_name.clone(), tcp)
            .await
    }

    /// A connection to the target's server and the HTTP version its ALPN fixed.
    ///
    /// # Errors
    ///
    /// The connect or the handshake failed (a certificate that is not the given
    /// one is `InvalidData`).
    pub async fn open_target(&self, meta: ConnMeta) -> io::Result<(BoxIo, Option<Version>)> {
        let first = self
            .first_target
            .lock()
            .expect("first target lock poisoned")
            .take();
        let stream = match first {
            Some(stream) => stream,
            None => self.connect_target(meta, self.alpn.clone()).await?,
        };
        let version = version_of(stream.get_ref().1.alpn_protocol());
        Ok((Box::new(stream), version))
    }

    /// Wraps `io`, a new connection to the session of `sub`, in TLS when that
    /// session asked for `--tls-local`; returns the HTTP version its ALPN fixed.
    ///
    /// # Errors
    ///
    /// The program's TLS handshake failed.
    pub async fn open_session(&self, sub: &Sub, io: BoxIo) -> io::Result<(BoxIo, Option<Version>)> {
        let Some(local) = sub.to.tls().and_then(|s| s.local.clone()) else {
            return Ok((io, None));
        };
        let mut config = (*local).clone();
        config.alpn_protocols = if self.alpn.iter().any(|p| p == H2) {
            vec![H2.to_vec(), H1.to_vec()]
        } else {
            vec![H1.to_vec()]
        };
        let stream = TlsConnector::from(Arc::new(config))
            .connect(self.server_name.clone(), io)
            .await?;
        let version = version_of(stream.get_ref().1.alpn_protocol());
        Ok((Box::new(stream), version))
    }

    /// The HTTP version a request of `version` with `headers` is sent in to the
    /// target (`to_target`) or to a session, unless the hop's ALPN fixes it.
    pub fn wanted(&self, to_target: bool, version: Version, headers: &HeaderMap) -> Version {
        if to_target || version != Version::HTTP_2 || is_grpc(headers) {
            version
        } else {
            Version::HTTP_11
        }
    }
}

/// Whether a request is gRPC (`content-type: application/grpc[+proto|...]`, gRPC
/// over HTTP/2 spec).
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Rewrites an HTTP/2 request as HTTP/1.1 when `version` says so: the
/// `:authority` becomes the `Host` header (RFC 9113 §8.3.1) and the target the
/// origin form (RFC 9112 §3.2.1). Other requests are left as they are.
pub fn adapt_version<B>(req: &mut Request<B>, version: Version) {
    if version >= Version::HTTP_2 || req.version() < Version::HTTP_2 {
        return;
    }
    if !req.headers().contains_key(::http::header::HOST)
        && let Some(host) = req
            .uri()
            .authority()
            .and_then(|a| ::http::HeaderValue::from_str(a.as_str()).ok())
    {
        req.headers_mut().insert(::http::header::HOST, host);
    }
    let origin = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse::<Uri>()
        .unwrap_or_else(|_| Uri::from_static("/"));
    *req.uri_mut() = origin;
    *req.version_mut() = version;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_hellos_are_told_by_their_record_header() {
        assert_eq!(is_client_hello(b""), None);
        assert_eq!(is_client_hello(b"\x16"), None);
        assert_eq!(is_client_hello(b"\x16\x03\x01\x02\x00"), Some(true));
        assert_eq!(is_client_hello(b"GET / HTTP/1.1"), Some(false));
        assert_eq!(is_client_hello(b"\x16\x01"), Some(false));
    }

    #[test]
    fn h2_requests_become_h1_with_a_host() {
        let mut req = Request::builder()
            .version(Version::HTTP_2)
            .uri("https://api.example:8443/a/b?c=1")
            .body(())
            .unwrap();
        adapt_version(&mut req, Version::HTTP_11);
        assert_eq!(req.version(), Version::HTTP_11);
        assert_eq!(req.uri(), "/a/b?c=1");
        assert_eq!(req.headers()[::http::header::HOST], "api.example:8443");
    }

    #[test]
    fn grpc_stays_h2_on_the_way_to_a_session() {
        let hops_version = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(::http::header::CONTENT_TYPE, ct.parse().unwrap());
            is_grpc(&h)
        };
        assert!(hops_version("application/grpc"));
        assert!(hops_version("application/grpc+proto"));
        assert!(!hops_version("application/json"));
    }
}
