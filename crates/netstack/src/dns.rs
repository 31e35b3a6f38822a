//! graft's resolver for the namespace: DNS queries to the resolver address
//! ([`crate::NetstackOptions::dns`]), over UDP and TCP (RFC 1035 §4.2; TCP messages
//! carry a two-byte length prefix, RFC 7766), answered with the upstream's
//! resolver (for a session: the target's `/etc/hosts` and `/etc/resolv.conf`).
//!
//! A and AAAA questions go to [`Upstream::resolve`] with the name as asked (the
//! program's resolver already applied its search list, so the name is absolute).
//! A name with no address of the asked family but some of the other is answered
//! NOERROR with no records (NODATA), as a real server does, so resolvers that ask
//! both families (Go, glibc) keep the answer they got. Other question types are
//! relayed as they are to the target's own name server
//! ([`crate::NetstackOptions::dns_forward`]) when there is one, or refused with
//! NOTIMP. Malformed queries get FORMERR when their header can be read, nothing
//! otherwise.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use graft_protocol::remote::AddressFamily;
use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, ResponseCode},
    rr::{RData, Record, RecordType, rdata},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    tcp::TcpFlow,
    upstream::{Resolved, Upstream},
};

/// The TTL of graft's answers, in seconds: short, since the target's own TTLs are
/// not known here.
const TTL: u32 = 5;
/// The largest UDP answer to a query without EDNS (RFC 1035 §4.2.1).
const CLASSIC_UDP_LIMIT: usize = 512;
/// The UDP payload size graft advertises with EDNS (the DNS flag day 2020 value).
const EDNS_PAYLOAD: u16 = 1232;
/// How long a relayed query waits for the target's name server.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a DNS-over-TCP connection may stay idle between queries.
const TCP_IDLE: Duration = Duration::from_secs(30);

/// Answers DNS queries with an upstream.
pub(crate) struct Resolver {
    pub(crate) upstream: Arc<dyn Upstream>,
    pub(crate) forward: Option<SocketAddr>,
    /// This machine's resolver, for the names `dns_local`/`dns_remote` keep here.
    pub(crate) local: Arc<dyn Upstream>,
    pub(crate) dns_local: Vec<graft_config::NamePattern>,
    pub(crate) dns_remote: Vec<graft_config::NamePattern>,
    /// Where answers are remembered for the outgoing rules by name.
    pub(crate) names: Arc<graft_config::ResolvedNames>,
}

impl Resolver {
    /// The answer to one query message, or `None` when it deserves none (not even
    /// a readable header, or a response sent to the resolver).
    pub(crate) async fn answer(&self, query: &[u8]) -> Option<Vec<u8>> {
        let request = match Message::from_vec(query) {
            Ok(m) => m,
            Err(_) => {
                // The header alone may still be readable: tell the sender.
                if query.len() < 12 {
                    return None;
                }
                let id = u16::from_be_bytes([query[0], query[1]]);
                if query[2] & 0x80 != 0 {
                    return None;
                }
                return Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
                    .to_vec()
                    .ok();
            }
        };
        if request.metadata.message_type != MessageType::Query {
            return None;
        }
        self.respond(&request).await
    }

    /// Builds the answer to a parsed query (`None` only when it cannot be encoded).
    async fn respond(&self, request: &Message) -> Option<Vec<u8>> {
        let id = request.metadata.id;
        let mut response = Message::response(id, request.metadata.op_code);
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        response.metadata.recursion_available = true;
        response.add_queries(request.queries.iter().cloned());
        if request.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(EDNS_PAYLOAD);
            response.set_edns(edns);
        }
        if request.metadata.op_code != OpCode::Query || request.queries.len() != 1 {
            response.metadata.response_code = if request.queries.len() != 1 {
                ResponseCode::FormErr
            } else {
                ResponseCode::NotImp
            };
            return response.to_vec().ok();
        }
        let question = &request.queries[0];
        let family = match question.query_type() {
            RecordType::A => AddressFamily::V4,
            RecordType::AAAA => AddressFamily::V6,
            _ => {
                if let Some(raw) = self.relay(request).await {
                    return Some(raw);
                }
                response.metadata.response_code = ResponseCode::NotImp;
                return response.to_vec().ok();
            }
        };
        let name = question.name().clone();
        let host = name.to_ascii();
        let upstream = if graft_config::outgoing::resolves_remotely(
            &self.dns_local,
            &self.dns_remote,
            &host,
        ) {
            &self.upstream
        } else {
            &self.local
        };
        match upstream.resolve(host.clone(), family).await {
            Resolved::Addrs(addrs) => {
                self.names.record(&host, &addrs);
                for ip in addrs {
                    let data = match (ip, family) {
                        (std::net::IpAddr::V4(v4), AddressFamily::V4) => RData::A(rdata::A(v4)),
                        (std::net::IpAddr::V6(v6), AddressFamily::V6) => {
                            RData::AAAA(rdata::AAAA(v6))
                        }
                        _ => continue,
                    };
                    response.add_answer(Record::from_rdata(name.clone(), TTL, data));
                }
            }
            Resolved::NoName => {
                // NXDOMAIN only when the name has no address at all.
                let other = match family {
                    AddressFamily::V4 => AddressFamily::V6,
                    _ => AddressFamily::V4,
                };
                response.metadata.response_code = match upstream.resolve(host, other).await {
                    Resolved::Addrs(_) => ResponseCode::NoError,
                    Resolved::NoName => ResponseCode::NXDomain,
                    Resolved::TryAgain => ResponseCode::ServFail,
                };
            }
            Resolved::TryAgain => response.metadata.response_code = ResponseCode::ServFail,
        }
        response.to_vec().ok()
    }

    /// Relays a query to the target's name server and returns its answer.
    async fn relay(&self, request: &Message) -> Option<Vec<u8>> {
        let server = self.forward?;
        let bytes = request.to_vec().ok()?;
        let mut flow = self.upstream.connect_udp(server).await.ok()?;
        flow.to_remote.send(bytes).await.ok()?;
        let answer = tokio::time::timeout(FORWARD_TIMEOUT, async {
            while let Some(answer) = flow.from_remote.recv().await {
                if answer.len() >= 2 && answer[..2] == request.metadata.id.to_be_bytes() {
                    return Some(answer);
                }
            }
            None
        })
        .await
        .ok()??;
        Some(answer)
    }

    /// Answers one UDP query, truncated (TC set) when it does not fit the size the
    /// asker can take; the asker then retries over TCP.
    pub(crate) async fn answer_udp(&self, query: &[u8]) -> Option<Vec<u8>> {
        let answer = self.answer(query).await?;
        let limit = Message::from_vec(query)
            .ok()
            .and_then(|m| m.edns.map(|e| usize::from(e.max_payload().max(512))))
            .unwrap_or(CLASSIC_UDP_LIMIT);
        if answer.len() <= limit {
            return Some(answer);
        }
        let full = Message::from_vec(&answer).ok()?;
        full.truncate().to_vec().ok()
    }

    /// Serves DNS over one TCP connection until the program closes it or idles.
    pub(crate) async fn serve_tcp(&self, mut flow: TcpFlow) {
        loop {
            let mut len = [0u8; 2];
            match tokio::time::timeout(TCP_IDLE, flow.read_exact(&mut len)).await {
                Ok(Ok(_)) => {}
                _ => break,
            }
            let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
            if flow.read_exact(&mut query).await.is_err() {
                break;
            }
            let Some(answer) = self.answer(&query).await else {
                break;
            };
            let Ok(answer_len) = u16::try_from(answer.len()) else {
                break;
            };
            let mut framed = answer_len.to_be_bytes().to_vec();
            framed.extend_from_slice(&answer);
            if flow.write_all(&framed).await.is_err() {
                break;
            }
        }
        let _ = flow.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use hickory_proto::{
        op::Query,
        rr::{Name, RecordType},
    };

    use super::*;
    use crate::upstream::{BoxFuture, TcpRelay, UdpRelay};

    /// Knows `web.example.` (v4 only) and `both.example.` (v4 and v6); fails `slow.`.
    struct Table;

    impl Upstream for Table {
        fn connect_tcp(&self, _: SocketAddr) -> BoxFuture<'_, std::io::Result<TcpRelay>> {
            Box::pin(async { Err(std::io::ErrorKind::ConnectionRefused.into()) })
        }
        fn connect_udp(&self, _: SocketAddr) -> BoxFuture<'_, std::io::Result<UdpRelay>> {
            Box::pin(async { Err(std::io::ErrorKind::ConnectionRefused.into()) })
        }
        fn resolve(&self, host: String, family: AddressFamily) -> BoxFuture<'_, Resolved> {
            Box::pin(async move {
                let v4: IpAddr = "10.1.2.3".parse().unwrap();
                let v6: IpAddr = "fd00::3".parse().unwrap();
                match (host.as_str(), family) {
                    ("web.example.", AddressFamily::V4) => Resolved::Addrs(vec![v4]),
                    ("both.example.", AddressFamily::V4) => Resolved::Addrs(vec![v4]),
                    ("both.example.", AddressFamily::V6) => Resolved::Addrs(vec![v6]),
                    ("slow.", _) => Resolved::TryAgain,
                    _ => Resolved::NoName,
                }
            })
        }
    }

    fn resolver() -> Resolver {
        Resolver {
            upstream: Arc::new(Table),
            forward: None,
            local: Arc::new(crate::LocalUpstream),
            dns_local: vec!["*.local-only.example".parse().unwrap()],
            dns_remote: Vec::new(),
            names: Arc::default(),
        }
    }

    fn query(name: &str, kind: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 4242;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
        m.to_vec().unwrap()
    }

    async fn ask(name: &str, kind: RecordType) -> Message {
        let answer = resolver().answer_udp(&query(name, kind)).await.unwrap();
        Message::from_vec(&answer).unwrap()
    }

    #[tokio::test]
    async fn addresses_nodata_nxdomain_and_servfail() {
        let a = ask("web.example.", RecordType::A).await;
        assert_eq!(a.metadata.id, 4242);
        assert_eq!(a.metadata.response_code, ResponseCode::NoError);
        assert_eq!(a.answers.len(), 1);
        assert_eq!(
            a.answers[0].data,
            RData::A(rdata::A("10.1.2.3".parse().unwrap()))
        );
        let nodata = ask("web.example.", RecordType::AAAA).await;
        assert_eq!(nodata.metadata.response_code, ResponseCode::NoError);
        assert!(nodata.answers.is_empty());
        let aaaa = ask("both.example.", RecordType::AAAA).await;
        assert_eq!(aaaa.answers.len(), 1);
        let missing = ask("nope.example.", RecordType::A).await;
        assert_eq!(missing.metadata.response_code, ResponseCode::NXDomain);
        let failed = ask("slow.", RecordType::A).await;
        assert_eq!(failed.metadata.response_code, ResponseCode::ServFail);
        let other = ask("web.example.", RecordType::TXT).await;
        assert_eq!(other.metadata.response_code, ResponseCode::NotImp);
    }

    #[tokio::test]
    async fn hostile_queries_get_formerr_or_nothing() {
        let r = resolver();
        assert!(r.answer_udp(&[]).await.is_none());
        assert!(r.answer_udp(&[1, 2, 3]).await.is_none());
        let mut header_only = vec![0xab, 0xcd, 0x01, 0x00, 0x00, 0x05];
        header_only.extend([0u8; 6]);
        header_only.extend([0xff; 40]);
        let formerr = Message::from_vec(&r.answer_udp(&header_only).await.unwrap()).unwrap();
        assert_eq!(formerr.metadata.id, 0xabcd);
        assert_eq!(formerr.metadata.response_code, ResponseCode::FormErr);
        // A response sent to the resolver is not answered (no reflection loops).
        let mut response = query("web.example.", RecordType::A);
        response[2] |= 0x80;
        assert!(r.answer_udp(&response).await.is_none());
        // Random bytes never panic.
        let mut seed = 0x1234_5678_u32;
        for len in 0..600 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    seed as u8
                })
                .collect();
            let _ = r.answer_udp(&bytes).await;
        }
    }
}
