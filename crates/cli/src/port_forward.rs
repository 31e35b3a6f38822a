//! `graft port-forward`: local ports that lead to addresses the target reaches
//! (kubefwd's job, for any target). Each `-L [ADDR:]PORT:HOST:PORT` binds a local
//! listener; every connection accepted there resolves HOST in the target (a short
//! cache, so a Service whose endpoints change is followed), opens a TCP
//! connection from the target ([`graft_proxy::Session::connect_tcp`]) and splices
//! the two. A refused or failed connect closes the local connection with an RST,
//! so the client sees "refused", never an empty reply. `udp:` forwards datagrams
//! the same way, one flow in the target per local client address.
//!
//! ```text
//! client ──► 127.0.0.1:PORT ──(accept)──► resolve HOST in the target ──► connect_tcp ──► splice
//! ```
//!
//! Listeners are bound to loopback unless the user writes an address and also
//! passes `--allow-remote-clients`: whoever reaches a listener reaches the target's
//! network with the user's session.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use clap::Args;
use graft_protocol::remote::{AddressFamily, RemoteError, RemoteRequest, RemoteResponse};
use graft_proxy::{ProxyError, Session, SessionOptions};
use tokio::{
    net::{TcpListener, TcpStream, UdpSocket},
    sync::mpsc,
    task::JoinSet,
};

use crate::{
    failure::{EXIT_SESSION, Failure},
    front::{TargetFlags, open_session},
    process::Signals,
};

/// How long a name resolved in the target is reused before it is asked again.
const RESOLVE_CACHE: Duration = Duration::from_secs(2);

/// Datagrams queued towards one UDP flow before more are dropped.
const UDP_QUEUE: usize = 64;

/// `graft port-forward` flags.
#[derive(Debug, Args)]
pub struct PortForwardArgs {
    /// The target and how to reach it.
    #[command(flatten)]
    pub target: TargetFlags,
    /// Forward local `[ADDR:]PORT` to `HOST:PORT` as the target reaches it;
    /// HOST is a name the target resolves (`api.shop`, `db.shop.svc.cluster.local`)
    /// or an address; `udp:` in front forwards UDP (repeatable).
    #[arg(
        short = 'L',
        long = "local",
        value_name = "[udp:][ADDR:]PORT:HOST:PORT",
        required = true
    )]
    pub forwards: Vec<String>,
    /// Let a non-loopback ADDR be bound: then every machine that reaches it
    /// reaches the target's network through this session.
    #[arg(long)]
    pub allow_remote_clients: bool,
}

/// TCP or UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// A stream per connection.
    Tcp,
    /// A flow per local client address.
    Udp,
}

/// Where a forward leads: a name resolved in the target, or an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// Resolved in the target at each new connection (cached [`RESOLVE_CACHE`]).
    Name(String),
    /// Used as it is.
    Addr(IpAddr),
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Name(name) => f.write_str(name),
            Host::Addr(IpAddr::V6(v6)) => write!(f, "[{v6}]"),
            Host::Addr(addr) => write!(f, "{addr}"),
        }
    }
}

/// One parsed `-L` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// TCP or UDP.
    pub proto: Proto,
    /// The local address to bind (127.0.0.1 unless written).
    pub bind: SocketAddr,
    /// Whether the local address was written.
    pub bind_explicit: bool,
    /// Where connections go.
    pub host: Host,
    /// The remote port.
    pub port: u16,
}

impl std::fmt::Display for Forward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = if self.proto == Proto::Udp { "udp " } else { "" };
        write!(f, "{proto}{} → {}:{}", self.bind, self.host, self.port)
    }
}

/// Splits off the last `:FIELD` of `s`, a bracketed IPv6 address kept whole.
fn split_last(s: &str) -> Option<(&str, &str)> {
    if let Some(rest) = s.strip_suffix(']') {
        let open = rest.rfind('[')?;
        let before = &s[..open];
        return Some((before.strip_suffix(':').unwrap_or(before), &s[open..]));
    }
    match s.rfind(':') {
        Some(i) => Some((&s[..i], &s[i + 1..])),
        None => Some(("", s)),
    }
}

fn parse_port(text: &str, what: &str, spec: &str) -> Result<u16, String> {
    text.parse::<u16>()
        .map_err(|_| format!("-L {spec}: {what} {text:?} is not a port number (1-65535)"))
}

fn parse_ip(text: &str) -> Option<IpAddr> {
    let inner = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    inner.parse().ok()
}

impl std::str::FromStr for Forward {
    type Err = String;

    /// Parses `[udp:|tcp:][ADDR:]PORT:HOST:PORT` (IPv6 addresses in brackets).
    fn from_str(spec: &str) -> Result<Forward, String> {
        let (proto, rest) = if let Some(rest) = spec.strip_prefix("udp:") {
            (Proto::Udp, rest)
        } else {
            (Proto::Tcp, spec.strip_prefix("tcp:").unwrap_or(spec))
        };
        let shape = || format!("-L {spec}: expected [udp:][ADDR:]PORT:HOST:PORT");
        let (rest, remote_port) = split_last(rest).ok_or_else(shape)?;
        let (rest, host) = split_last(rest).ok_or_else(shape)?;
        let (addr, local_port) = split_last(rest).ok_or_else(shape)?;
        if host.is_empty() || local_port.is_empty() {
            return Err(shape());
        }
        let port = parse_port(remote_port, "remote port", spec)?;
        let local_port = parse_port(local_port, "local port", spec)?;
        if port == 0 {
            return Err(format!("-L {spec}: the remote port cannot be 0"));
        }
        let host = match parse_ip(host) {
            Some(ip) => Host::Addr(ip),
            None if host.contains(['[', ']', ':', '/', ' ']) => {
                return Err(format!(
                    "-L {spec}: {host:?} is neither a name nor an address"
                ));
            }
            None => Host::Name(host.to_owned()),
        };
        let (bind_ip, bind_explicit) = if addr.is_empty() {
            (IpAddr::V4(Ipv4Addr::LOCALHOST), false)
        } else if addr == "localhost" {
            (IpAddr::V4(Ipv4Addr::LOCALHOST), true)
        } else {
            let ip = parse_ip(addr).ok_or_else(|| {
                format!("-L {spec}: the local address {addr:?} is not an IP address")
            })?;
            (ip, true)
        };
        Ok(Forward {
            proto,
            bind: SocketAddr::new(bind_ip, local_port),
            bind_explicit,
            host,
            port,
        })
    }
}

/// Parses every `-L` and applies the loopback rule.
///
/// # Errors
///
/// A usage [`Failure`] for a malformed value, or a non-loopback address without
/// `allow_remote` (saying why).
pub fn plan(forwards: &[String], allow_remote: bool) -> Result<Vec<Forward>, Failure> {
    let mut planned = Vec::new();
    for spec in forwards {
        let forward: Forward = spec.parse().map_err(Failure::usage)?;
        if !forward.bind.ip().is_loopback() && !allow_remote {
            return Err(Failure::usage(format!(
                "-L {spec}: refusing to listen on {}, which is not a loopback address: every \
                 machine that reaches it would reach the target's network through your session",
                forward.bind.ip()
            ))
            .hint("leave ADDR out (127.0.0.1), or add --allow-remote-clients if that is what you want"));
        }
        planned.push(forward);
    }
    Ok(planned)
}

/// Names resolved in the target, kept for [`RESOLVE_CACHE`].
struct Resolver {
    session: Arc<Session>,
    target: String,
    cache: Mutex<HashMap<String, (Instant, Vec<IpAddr>)>>,
}

impl Resolver {
    /// The addresses of `host` as the target resolves it.
    async fn resolve(&self, host: &Host) -> Result<Vec<IpAddr>, String> {
        let name = match host {
            Host::Addr(addr) => return Ok(vec![*addr]),
            Host::Name(name) => name,
        };
        if let Some((at, addrs)) = self.cache.lock().expect("never poisoned").get(name)
            && at.elapsed() < RESOLVE_CACHE
        {
            return Ok(addrs.clone());
        }
        let request = RemoteRequest::Resolve {
            host: name.clone(),
            family: AddressFamily::Any,
        };
        let answer = self.session.remote(request).await;
        let addrs = match answer {
            Ok(RemoteResponse::Resolved { addrs, .. }) => addrs,
            Ok(RemoteResponse::Error(RemoteError::NoName)) => {
                return Err(format!(
                    "{name} does not resolve in {} (no such name)",
                    self.target
                ));
            }
            Ok(RemoteResponse::Error(e)) => {
                return Err(format!("{name} does not resolve in {}: {e}", self.target));
            }
            Ok(other) => {
                return Err(format!(
                    "cannot resolve {name}: unexpected answer {other:?}"
                ));
            }
            Err(e) => return Err(format!("cannot resolve {name} in {}: {e}", self.target)),
        };
        self.cache
            .lock()
            .expect("never poisoned")
            .insert(name.clone(), (Instant::now(), addrs.clone()));
        Ok(addrs)
    }
}

/// Runs `graft port-forward` until Ctrl-C (exit 0) or the link is lost (exit 1).
pub async fn port_forward(args: PortForwardArgs) -> Result<u8, Failure> {
    let forwards = plan(&args.forwards, args.allow_remote_clients)?;
    let config = args.target.resolve()?;
    let target = config.target.to_string();
    // Bound before the agent starts: a port in use fails at once, with nothing placed.
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    for forward in &forwards {
        let taken = |e: std::io::Error| {
            Failure::usage(format!(
                "cannot listen on {} for {forward}: {e}",
                forward.bind
            ))
            .hint("pick another local port")
        };
        match forward.proto {
            Proto::Tcp => tcp.push((
                forward.clone(),
                TcpListener::bind(forward.bind).await.map_err(taken)?,
            )),
            Proto::Udp => udp.push((
                forward.clone(),
                UdpSocket::bind(forward.bind).await.map_err(taken)?,
            )),
        }
    }
    let front = open_session(
        &config,
        SessionOptions {
            announce_steals: false,
            ..SessionOptions::default()
        },
    )
    .await?;
    let crate::open::Opened { session, agents } = front.opened;
    let session = Arc::new(session);
    let resolver = Arc::new(Resolver {
        session: session.clone(),
        target: target.clone(),
        cache: Mutex::new(HashMap::new()),
    });
    let result = serve(&session, &resolver, tcp, udp).await;
    drop(resolver);
    let link_lost = !matches!(result, Ok(0));
    match Arc::try_unwrap(session) {
        Ok(session) => session.close().await,
        Err(session) => drop(session),
    }
    agents.stop(link_lost).await;
    drop(front.dir);
    result
}

/// Checks every name, serves every listener, and waits for a signal or the link's end.
async fn serve(
    session: &Arc<Session>,
    resolver: &Arc<Resolver>,
    tcp: Vec<(Forward, TcpListener)>,
    udp: Vec<(Forward, UdpSocket)>,
) -> Result<u8, Failure> {
    for forward in tcp.iter().map(|(f, _)| f).chain(udp.iter().map(|(f, _)| f)) {
        resolver.resolve(&forward.host).await.map_err(|why| {
            Failure::usage(why).hint("check the name (a Service is NAME.NAMESPACE) and the target")
        })?;
    }
    let mut signals = Signals::new()?;
    let mut tasks = JoinSet::new();
    for (forward, listener) in tcp {
        eprintln!("graft: forwarding {forward}");
        tasks.spawn(accept_tcp(forward, listener, resolver.clone()));
    }
    for (forward, socket) in udp {
        eprintln!("graft: forwarding {forward}");
        tasks.spawn(relay_udp(forward, socket, resolver.clone()));
    }
    eprintln!("graft: port-forward ready (Ctrl-C ends it)");
    let closed = session.closed();
    let code = tokio::select! {
        received = signals.recv() => {
            tracing::info!(signal = ?received, "ending the port-forward");
            0
        }
        reason = closed => {
            eprintln!("graft: lost the link to the agent ({reason}); the port-forward ends");
            EXIT_SESSION
        }
    };
    tasks.shutdown().await;
    Ok(code)
}

/// Accepts connections on `listener` and forwards each one.
async fn accept_tcp(forward: Forward, listener: TcpListener, resolver: Arc<Resolver>) {
    let mut conns = JoinSet::new();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and the like: wait instead of spinning.
                tracing::warn!("accept on {}: {e}", forward.bind);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while conns.try_join_next().is_some() {}
        let (forward, resolver) = (forward.clone(), resolver.clone());
        conns.spawn(async move {
            let _ = stream.set_nodelay(true);
            match connect(&forward, &resolver).await {
                Ok(outgoing) => outgoing.splice(stream).await,
                Err(why) => {
                    eprintln!("graft: {peer} → {}:{}: {why}", forward.host, forward.port);
                    refuse(stream);
                }
            }
        });
    }
}

/// Closes `stream` with an RST (SO_LINGER 0), so the client sees a refusal.
fn refuse(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Opens the forward's connection from the target: each address of HOST in turn.
async fn connect(
    forward: &Forward,
    resolver: &Resolver,
) -> Result<graft_proxy::OutgoingTcp, String> {
    let addrs = resolver.resolve(&forward.host).await?;
    let mut last = String::from("no address");
    for addr in addrs {
        match resolver
            .session
            .connect_tcp(SocketAddr::new(addr, forward.port))
            .await
        {
            Ok(outgoing) => return Ok(outgoing),
            Err(e @ ProxyError::Connect { .. }) => last = e.to_string(),
            Err(e) => return Err(e.to_string()),
        }
    }
    Err(last)
}

/// Relays datagrams between local clients of `socket` and UDP flows in the
/// target, one flow per client address; a flow ends when the session's UDP idle
/// time passes without a datagram (the agent closes it).
async fn relay_udp(forward: Forward, socket: UdpSocket, resolver: Arc<Resolver>) {
    let socket = Arc::new(socket);
    let flows: Arc<Mutex<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>> = Arc::default();
    let mut tasks = JoinSet::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let (len, peer) = match socket.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) => {
                tracing::warn!("recv on {}: {e}", forward.bind);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let datagram = buf[..len].to_vec();
        let existing = flows.lock().expect("never poisoned").get(&peer).cloned();
        if let Some(tx) = existing
            && tx.try_send(datagram.clone()).is_ok()
        {
            continue;
        }
        while tasks.try_join_next().is_some() {}
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(UDP_QUEUE);
        let _ = tx.try_send(datagram);
        flows.lock().expect("never poisoned").insert(peer, tx);
        let (forward, resolver, socket, flows) = (
            forward.clone(),
            resolver.clone(),
            socket.clone(),
            flows.clone(),
        );
        tasks.spawn(async move {
            let flow = async {
                let addrs = resolver.resolve(&forward.host).await?;
                let addr = addrs.first().ok_or("no address")?;
                resolver
                    .session
                    .connect_udp(SocketAddr::new(*addr, forward.port))
                    .await
                    .map_err(|e| e.to_string())
            };
            match flow.await {
                Ok(mut flow) => loop {
                    tokio::select! {
                        out = rx.recv() => match out {
                            Some(d) => if flow.send(&d).await.is_err() { break },
                            None => break,
                        },
                        back = flow.recv() => match back {
                            Some(d) => { let _ = socket.send_to(&d, peer).await; }
                            None => break,
                        },
                    }
                },
                Err(why) => eprintln!(
                    "graft: udp {peer} → {}:{}: {why}",
                    forward.host, forward.port
                ),
            }
            flows.lock().expect("never poisoned").remove(&peer);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Forward {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn forwards_parse_with_and_without_a_local_address() {
        let f = parse("8080:api.shop:80");
        assert_eq!(f.bind, "127.0.0.1:8080".parse().unwrap());
        assert!(!f.bind_explicit);
        assert_eq!(f.host, Host::Name("api.shop".into()));
        assert_eq!((f.port, f.proto), (80, Proto::Tcp));

        let f = parse("0.0.0.0:9000:10.0.0.7:5432");
        assert_eq!(f.bind, "0.0.0.0:9000".parse().unwrap());
        assert!(f.bind_explicit);
        assert_eq!(f.host, Host::Addr("10.0.0.7".parse().unwrap()));

        let f = parse("udp:[::1]:5353:[2001:db8::1]:53");
        assert_eq!(f.proto, Proto::Udp);
        assert_eq!(f.bind, "[::1]:5353".parse().unwrap());
        assert_eq!(f.host, Host::Addr("2001:db8::1".parse().unwrap()));
        assert_eq!(f.to_string(), "udp [::1]:5353 → [2001:db8::1]:53");

        let f = parse("localhost:1:db:2");
        assert_eq!(f.bind, "127.0.0.1:1".parse().unwrap());
    }

    #[test]
    fn malformed_forwards_say_what_is_wrong() {
        for (bad, says) in [
            ("8080", "expected"),
            ("8080:api", "expected"),
            ("x:api:80", "local port"),
            ("8080:api:http", "remote port"),
            ("8080:api:0", "cannot be 0"),
            ("host:8080:api:80", "not an IP address"),
            ("8080:a b:80", "neither a name"),
            ("8080::80", "expected"),
        ] {
            let err = bad.parse::<Forward>().unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn a_non_loopback_listener_needs_consent() {
        let err = plan(&["0.0.0.0:8080:api:80".into()], false).unwrap_err();
        assert_eq!(err.code, crate::failure::EXIT_USAGE);
        assert!(err.message.contains("not a loopback address"), "{err}");
        assert!(plan(&["0.0.0.0:8080:api:80".into()], true).is_ok());
        assert!(plan(&["[::1]:8080:api:80".into(), "8081:db:5432".into()], false).is_ok());
    }
}
