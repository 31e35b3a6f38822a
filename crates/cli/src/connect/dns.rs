//! The connected machine's DNS server: UDP and TCP on port 53 of the tun's
//! address (RFC 1035 §4.2; TCP messages carry a two-byte length, RFC 7766).
//!
//! A question whose name is the cluster's ([`Domains::is_remote`]: under a
//! cluster domain or search domain, a namespace as the last label, a name of the
//! target's hosts file, or a single label) is answered by the agent with the
//! target's resolver (`RemoteRequest::Resolve`, which applies the target's
//! search list and `ndots`). Every other question is relayed unchanged to the
//! machine's original name servers, so the rest of the world resolves as before.
//!
//! A name with an address of the other family only is answered NOERROR with no
//! records (NODATA), so resolvers asking both families keep the answer they got.
//! Malformed messages get FORMERR when their header is readable, nothing
//! otherwise; at most [`MAX_IN_FLIGHT`] questions are worked on at once, later
//! ones are dropped (the asker retries), so a flood cannot exhaust the daemon.

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use graft_protocol::remote::{AddressFamily, RemoteError, RemoteRequest, RemoteResponse};
use graft_proxy::Session;
use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, ResponseCode},
    rr::{RData, Record, RecordType, rdata},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::Semaphore,
};

/// The TTL of graft's answers, in seconds: short, the target's own are unknown.
const TTL: u32 = 5;
/// The largest UDP answer to a query without EDNS (RFC 1035 §4.2.1).
const CLASSIC_UDP_LIMIT: usize = 512;
/// The UDP payload size graft advertises with EDNS (DNS flag day 2020).
const EDNS_PAYLOAD: u16 = 1232;
/// How long a relayed question waits for one original name server.
const RELAY_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a TCP connection may idle between questions.
const TCP_IDLE: Duration = Duration::from_secs(30);
/// Questions worked on at once (UDP and TCP together).
pub const MAX_IN_FLIGHT: usize = 256;

/// Which names are the cluster's.
#[derive(Debug, Clone, Default)]
pub struct Domains {
    /// Names under these (lower case, no trailing dot) are the cluster's and are
    /// complete as they are (the target's search domains, the cluster domain).
    pub absolute: Vec<String>,
    /// A name whose last label is one of these (namespaces, `svc`) is the
    /// cluster's and is resolved with the target's search list (`web.shop`).
    pub last_labels: HashSet<String>,
    /// Names the target's hosts file knows.
    pub exact: HashSet<String>,
    /// `[dns] local` / `--dns-local`: names this machine's resolvers answer even
    /// when they look like the cluster's (they win over everything else).
    pub local: Vec<graft_config::NamePattern>,
    /// `[dns] remote` / `--dns-remote`: names the target's resolver answers
    /// besides the cluster's (a company domain only the cluster's DNS knows).
    /// Unlike `graft run`, where these are the only remote names, the cluster's
    /// own names stay remote here: resolving them is what `connect` is for.
    pub remote: Vec<graft_config::NamePattern>,
}

impl Domains {
    /// Whether `name` (any case, trailing dot or not) is the cluster's, and if so
    /// the name to ask the target's resolver: with a trailing dot when complete,
    /// without when the target's search list should apply.
    pub fn is_remote(&self, name: &str) -> Option<String> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if name.is_empty() || self.local.iter().any(|p| p.matches(&name)) {
            return None;
        }
        if self.remote.iter().any(|p| p.matches(&name)) {
            return Some(if name.contains('.') {
                format!("{name}.")
            } else {
                name
            });
        }
        if self.exact.contains(&name) {
            return Some(name);
        }
        if self
            .absolute
            .iter()
            .any(|d| name == *d || name.ends_with(&format!(".{d}")))
        {
            return Some(format!("{name}."));
        }
        let last = name.rsplit('.').next().unwrap_or(&name);
        if !name.contains('.') || self.last_labels.contains(last) {
            return Some(name);
        }
        None
    }
}

/// Answers questions: the cluster's through the session, the rest relayed.
pub struct DnsServer {
    /// The session whose target resolves the cluster's names.
    pub session: Arc<Session>,
    /// Which names are the cluster's.
    pub domains: Domains,
    /// The machine's original name servers (port 53), in order.
    pub upstreams: Vec<SocketAddr>,
    limit: Semaphore,
}

impl DnsServer {
    /// A server for `session`.
    pub fn new(session: Arc<Session>, domains: Domains, upstreams: Vec<SocketAddr>) -> DnsServer {
        DnsServer {
            session,
            domains,
            upstreams,
            limit: Semaphore::new(MAX_IN_FLIGHT),
        }
    }

    /// Serves UDP and TCP on `addr` until the task is aborted.
    ///
    /// # Errors
    ///
    /// The sockets cannot be bound (the address is not this machine's, or port 53
    /// is taken on it).
    pub async fn serve(self: Arc<Self>, addr: SocketAddr) -> std::io::Result<()> {
        let udp = Arc::new(UdpSocket::bind(addr).await?);
        let tcp = TcpListener::bind(addr).await?;
        let udp_task = {
            let server = self.clone();
            async move {
                let mut buf = vec![0u8; 65_535];
                loop {
                    let Ok((n, from)) = udp.recv_from(&mut buf).await else {
                        continue;
                    };
                    let Ok(permit) = server.limit.try_acquire() else {
                        tracing::debug!(%from, "DNS: too many questions in flight, one dropped");
                        continue;
                    };
                    permit.forget();
                    let query = buf[..n].to_vec();
                    let server = server.clone();
                    let udp = udp.clone();
                    tokio::spawn(async move {
                        if let Some(answer) = server.answer_udp(&query).await {
                            let _ = udp.send_to(&answer, from).await;
                        }
                        server.limit.add_permits(1);
                    });
                }
            }
        };
        let tcp_task = {
            let server = self.clone();
            async move {
                loop {
                    let Ok((stream, _)) = tcp.accept().await else {
                        continue;
                    };
                    let Ok(permit) = server.limit.try_acquire() else {
                        continue;
                    };
                    permit.forget();
                    let server = server.clone();
                    tokio::spawn(async move {
                        server.serve_tcp(stream).await;
                        server.limit.add_permits(1);
                    });
                }
            }
        };
        tokio::join!(udp_task, tcp_task);
        Ok(())
    }

    /// Serves one TCP connection until it closes, idles or sends garbage.
    async fn serve_tcp(&self, mut stream: TcpStream) {
        loop {
            let mut len = [0u8; 2];
            match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
                Ok(Ok(_)) => {}
                _ => break,
            }
            let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
            match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query)).await {
                Ok(Ok(_)) => {}
                _ => break,
            }
            let Some(answer) = self.answer(&query, true).await else {
                break;
            };
            let Ok(answer_len) = u16::try_from(answer.len()) else {
                break;
            };
            let mut framed = answer_len.to_be_bytes().to_vec();
            framed.extend_from_slice(&answer);
            if stream.write_all(&framed).await.is_err() {
                break;
            }
        }
    }

    /// Answers one UDP question, truncated (TC) when it does not fit what the
    /// asker takes; it then asks again over TCP.
    pub async fn answer_udp(&self, query: &[u8]) -> Option<Vec<u8>> {
        let answer = self.answer(query, false).await?;
        let limit = Message::from_vec(query)
            .ok()
            .and_then(|m| m.edns.map(|e| usize::from(e.max_payload().max(512))))
            .unwrap_or(CLASSIC_UDP_LIMIT);
        if answer.len() <= limit {
            return Some(answer);
        }
        Message::from_vec(&answer).ok()?.truncate().to_vec().ok()
    }

    /// The answer to one message, or `None` when it deserves none.
    async fn answer(&self, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
        let request = match Message::from_vec(query) {
            Ok(m) => m,
            Err(_) => {
                if query.len() < 12 || query[2] & 0x80 != 0 {
                    return None;
                }
                let id = u16::from_be_bytes([query[0], query[1]]);
                return Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
                    .to_vec()
                    .ok();
            }
        };
        // A response sent here is never answered (no reflection loops).
        if request.metadata.message_type != MessageType::Query {
            return None;
        }
        let remote = match request.queries.as_slice() {
            [question] if request.metadata.op_code == OpCode::Query => {
                self.domains.is_remote(&question.name().to_ascii())
            }
            _ => None,
        };
        match remote {
            Some(host) => self.resolve(&request, host).await,
            None => self.relay(query, request.metadata.id, tcp).await,
        }
    }

    /// Answers a cluster name with the target's resolver.
    async fn resolve(&self, request: &Message, host: String) -> Option<Vec<u8>> {
        let mut response = Message::response(request.metadata.id, request.metadata.op_code);
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        response.metadata.recursion_available = true;
        response.add_queries(request.queries.iter().cloned());
        if request.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(EDNS_PAYLOAD);
            response.set_edns(edns);
        }
        let question = &request.queries[0];
        let answer = self
            .session
            .remote(RemoteRequest::Resolve {
                host,
                family: AddressFamily::Any,
            })
            .await;
        match answer {
            Ok(RemoteResponse::Resolved { addrs, .. }) => {
                let name = question.name().clone();
                for ip in addrs {
                    let data = match (ip, question.query_type()) {
                        (IpAddr::V4(v4), RecordType::A) => RData::A(rdata::A(v4)),
                        (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(rdata::AAAA(v6)),
                        _ => continue,
                    };
                    response.add_answer(Record::from_rdata(name.clone(), TTL, data));
                }
            }
            Ok(RemoteResponse::Error(RemoteError::NoName)) => {
                response.metadata.response_code = ResponseCode::NXDomain;
            }
            Ok(other) => {
                tracing::debug!(?other, "DNS: the agent could not resolve a name");
                response.metadata.response_code = ResponseCode::ServFail;
            }
            Err(e) => {
                tracing::debug!(error = %e, "DNS: the link failed during a lookup");
                response.metadata.response_code = ResponseCode::ServFail;
            }
        }
        response.to_vec().ok()
    }

    /// Relays a message to the original name servers, first answer wins; SERVFAIL
    /// when none answers.
    async fn relay(&self, query: &[u8], id: u16, tcp: bool) -> Option<Vec<u8>> {
        for upstream in &self.upstreams {
            let answer = if tcp {
                tokio::time::timeout(RELAY_TIMEOUT, relay_tcp(*upstream, query)).await
            } else {
                tokio::time::timeout(RELAY_TIMEOUT, relay_udp(*upstream, query, id)).await
            };
            match answer {
                Ok(Ok(answer)) => return Some(answer),
                Ok(Err(e)) => tracing::debug!(%upstream, error = %e, "DNS: relay failed"),
                Err(_) => tracing::debug!(%upstream, "DNS: relay timed out"),
            }
        }
        Message::error_msg(id, OpCode::Query, ResponseCode::ServFail)
            .to_vec()
            .ok()
    }
}

/// One question to `server` over UDP; the answer with the same id.
async fn relay_udp(server: SocketAddr, query: &[u8], id: u16) -> std::io::Result<Vec<u8>> {
    let bind: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(bind).await?;
    socket.connect(server).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; 65_535];
    loop {
        let n = socket.recv(&mut buf).await?;
        if n >= 2 && buf[..2] == id.to_be_bytes() {
            return Ok(buf[..n].to_vec());
        }
    }
}

/// One question to `server` over TCP.
async fn relay_tcp(server: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(server).await?;
    let len = u16::try_from(query.len()).map_err(std::io::Error::other)?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(query);
    stream.write_all(&framed).await?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut answer).await?;
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domains() -> Domains {
        Domains {
            absolute: vec!["cluster.local".into(), "graft.test".into()],
            last_labels: ["shop".to_owned(), "svc".to_owned()].into(),
            exact: ["only-target.example".to_owned()].into(),
            local: Vec::new(),
            remote: Vec::new(),
        }
    }

    #[test]
    fn dns_rules_move_names_either_way_and_local_wins() {
        let mut d = domains();
        d.local = vec!["*.shop".parse().unwrap(), "web".parse().unwrap()];
        d.remote = vec![
            "*.corp.example".parse().unwrap(),
            "db.shop".parse().unwrap(),
        ];
        // Remote by rule, though not a cluster name: complete as given.
        assert_eq!(
            d.is_remote("Git.Corp.Example.").as_deref(),
            Some("git.corp.example.")
        );
        // Local wins over the cluster's own names and over a remote rule.
        assert_eq!(d.is_remote("cart.shop"), None);
        assert_eq!(d.is_remote("db.shop"), None);
        assert_eq!(d.is_remote("web"), None);
        // The rest is as without rules.
        assert_eq!(d.is_remote("api").as_deref(), Some("api"));
        assert_eq!(d.is_remote("corp.example"), None);
    }

    #[test]
    fn cluster_names_are_remote_and_the_rest_is_relayed() {
        let d = domains();
        assert_eq!(
            d.is_remote("web.shop.svc.cluster.local.").as_deref(),
            Some("web.shop.svc.cluster.local.")
        );
        assert_eq!(d.is_remote("Web.Shop").as_deref(), Some("web.shop"));
        assert_eq!(d.is_remote("web.svc").as_deref(), Some("web.svc"));
        assert_eq!(d.is_remote("web").as_deref(), Some("web"));
        assert_eq!(
            d.is_remote("only-target.example.").as_deref(),
            Some("only-target.example")
        );
        assert_eq!(
            d.is_remote("svc.graft.test").as_deref(),
            Some("svc.graft.test.")
        );
        assert_eq!(d.is_remote("example.com."), None);
        assert_eq!(d.is_remote("notcluster.local"), None);
        assert_eq!(d.is_remote("."), None);
    }
}
