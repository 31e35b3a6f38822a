//! Name resolution as the target would do it: its `/etc/hosts` first, then DNS with
//! the name servers, search list and options of its `/etc/resolv.conf`.
//!
//! Both files are read through the target's root ([`TargetRoot`], so an absolute
//! symlink such as `/etc/resolv.conf -> /run/systemd/resolve/stub-resolv.conf`
//! resolves inside the target). The hosts file is parsed here, because hickory can
//! only load the agent's own; the resolver (hickory, with its hosts lookup turned
//! off) is built on first use and rebuilt whenever either file changes. Its
//! sockets are created by the runtime's threads, which live in the target's network
//! namespace, so queries leave from the target.
//!
//! It fails as fast as the target's own glibc would: `resolv.conf`'s `timeout`
//! and `attempts` go to hickory as they are, `search` and `ndots` are walked as
//! glibc does ([`search`]), servers are asked
//! in file order (one at a time, as glibc does) or round robin with `rotate`
//! (resolv.conf(5)), and each query's UDP socket is connected to its server
//! ([`ConnectedUdp`]), so an ICMP port or host unreachable ends that try at once
//! (`ECONNREFUSED`, udp(7)) instead of after the whole timeout.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use graft_protocol::remote::{AddressFamily, RemoteError, RemoteResponse};
use hickory_resolver::Resolver;
use hickory_resolver::config::{
    LookupIpStrategy, ResolveHosts, ResolverConfig, ResolverOpts, ServerOrderingStrategy,
};
use hickory_resolver::lookup::Lookup;
use hickory_resolver::net::runtime::iocompat::AsyncIoTokioAsStd;
use hickory_resolver::net::runtime::{
    DnsUdpSocket, RuntimeProvider, TokioHandle, TokioRuntimeProvider, TokioTime,
};
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::RecordType;

use crate::files::TargetRoot;

mod search;

use search::Miss;

/// The target's resolver configuration file.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";
/// The target's hosts file.
pub const HOSTS: &str = "/etc/hosts";
/// What glibc uses when `resolv.conf` names no server.
const DEFAULT_NAMESERVER: &str = "nameserver 127.0.0.1\n";
/// Larger files are truncated: no real hosts or resolv.conf comes near.
const MAX_CONFIG_LEN: usize = 4 * 1024 * 1024;

/// The entries of a hosts file, in file order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HostsFile {
    entries: Vec<(IpAddr, Vec<String>)>,
}

impl HostsFile {
    /// Parses `hosts(5)` text; lines that do not start with an address are skipped.
    pub fn parse(text: &str) -> HostsFile {
        let entries = text
            .lines()
            .filter_map(|line| {
                let line = line.split('#').next().unwrap_or("");
                let mut fields = line.split_whitespace();
                let addr: IpAddr = fields.next()?.parse().ok()?;
                let names: Vec<String> = fields.map(|n| n.to_ascii_lowercase()).collect();
                (!names.is_empty()).then_some((addr, names))
            })
            .collect();
        HostsFile { entries }
    }

    /// The addresses of `host` of the wanted family, in file order, and its canonical
    /// name (the first name of the first matching line); `None` when the file has no
    /// such address.
    pub fn lookup(&self, host: &str, family: AddressFamily) -> Option<(Vec<IpAddr>, String)> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let mut addrs = Vec::new();
        let mut canonical = None;
        for (addr, names) in &self.entries {
            let wanted = match family {
                AddressFamily::Any => true,
                AddressFamily::V4 => addr.is_ipv4(),
                AddressFamily::V6 => addr.is_ipv6(),
            };
            if wanted && names.iter().any(|n| n.trim_end_matches('.') == host) {
                canonical.get_or_insert_with(|| names[0].clone());
                if !addrs.contains(addr) {
                    addrs.push(*addr);
                }
            }
        }
        canonical.map(|c| (addrs, c))
    }
}

/// Why the target's DNS configuration cannot be used; the message goes to the
/// program as the resolution's error.
#[derive(Debug, thiserror::Error)]
pub enum DnsSetupError {
    /// `resolv.conf` does not parse, even with a default name server added.
    #[error(
        "the target's {RESOLV_CONF} cannot be parsed: {0}; fix the file in the target's image \
         or its pod's dnsConfig"
    )]
    ResolvConf(String),
    /// hickory refused the configuration it parsed.
    #[error("could not build the resolver from the target's {RESOLV_CONF}: {0}")]
    Build(String),
}

/// Parses `resolv.conf` text into hickory's configuration; a file without a usable
/// name server gets glibc's default, 127.0.0.1.
///
/// # Errors
///
/// [`DnsSetupError::ResolvConf`] when the file cannot be understood even so.
pub fn resolver_config(text: &[u8]) -> Result<(ResolverConfig, ResolverOpts), DnsSetupError> {
    let (config, mut opts) = match hickory_resolver::system_conf::parse_resolv_conf(text) {
        Ok(parsed) => parsed,
        Err(_) => {
            let mut with_default = text.to_vec();
            with_default.extend_from_slice(b"\n");
            with_default.extend_from_slice(DEFAULT_NAMESERVER.as_bytes());
            hickory_resolver::system_conf::parse_resolv_conf(&with_default)
                .map_err(|e| DnsSetupError::ResolvConf(e.to_string()))?
        }
    };
    // The target's hosts file is handled by `HostsFile`; hickory would read ours.
    opts.use_hosts_file = ResolveHosts::Never;
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    // glibc asks one server at a time, in file order, or starting with the next
    // one each time under `options rotate` (resolv.conf(5)).
    opts.num_concurrent_reqs = 1;
    opts.server_ordering_strategy = if rotates(text) {
        ServerOrderingStrategy::RoundRobin
    } else {
        ServerOrderingStrategy::UserProvidedOrder
    };
    Ok((config, opts))
}

/// Whether an `options` line of `resolv.conf` text says `rotate` (the last
/// `options` word wins, as in glibc: `no-rotate` does not exist, so any mention
/// counts).
fn rotates(text: &[u8]) -> bool {
    String::from_utf8_lossy(text).lines().any(|line| {
        let mut words = line.split_whitespace();
        words.next() == Some("options") && words.any(|w| w == "rotate")
    })
}

/// hickory's tokio runtime, except that each query's UDP socket is connected to
/// its name server: the kernel then reports an ICMP unreachable for it as an
/// error on the socket (udp(7)), and the try fails at once, as glibc's does
/// (glibc connects its UDP sockets too, `res_send.c`). Replies can only come
/// from that server, which hickory checks anyway.
#[derive(Clone, Default)]
pub struct ConnectedUdp(TokioRuntimeProvider);

impl RuntimeProvider for ConnectedUdp {
    type Handle = TokioHandle;
    type Timer = TokioTime;
    type Udp = ConnectedSocket;
    type Tcp = AsyncIoTokioAsStd<tokio::net::TcpStream>;

    fn create_handle(&self) -> Self::Handle {
        self.0.create_handle()
    }

    fn connect_tcp(
        &self,
        server_addr: SocketAddr,
        bind_addr: Option<SocketAddr>,
        timeout: Option<Duration>,
    ) -> Pin<Box<dyn Send + Future<Output = std::io::Result<Self::Tcp>>>> {
        self.0.connect_tcp(server_addr, bind_addr, timeout)
    }

    fn bind_udp(
        &self,
        local_addr: SocketAddr,
        server_addr: SocketAddr,
    ) -> Pin<Box<dyn Send + Future<Output = std::io::Result<Self::Udp>>>> {
        Box::pin(async move {
            let socket = tokio::net::UdpSocket::bind(local_addr).await?;
            socket.connect(server_addr).await?;
            Ok(ConnectedSocket(socket))
        })
    }
}

/// A UDP socket connected to one name server whose receive also ends on a
/// socket error (tokio's readable readiness does not include `EPOLLERR`, so a
/// plain receive would sleep through the ICMP error until the timeout).
pub struct ConnectedSocket(tokio::net::UdpSocket);

#[async_trait::async_trait]
impl DnsUdpSocket for ConnectedSocket {
    type Time = TokioTime;

    fn poll_recv_from(
        &self,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<std::io::Result<(usize, SocketAddr)>> {
        DnsUdpSocket::poll_recv_from(&self.0, cx, buf)
    }

    async fn recv_from(&self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
        tokio::select! {
            received = self.0.recv_from(buf) => received,
            ready = self.0.ready(tokio::io::Interest::ERROR) => {
                ready?;
                Err(self.0.take_error()?.unwrap_or_else(|| {
                    std::io::Error::other("the name server's socket reported an error")
                }))
            }
        }
    }

    fn poll_send_to(
        &self,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
        target: SocketAddr,
    ) -> std::task::Poll<std::io::Result<usize>> {
        DnsUdpSocket::poll_send_to(&self.0, cx, buf, target)
    }
}

/// What identifies a version of a file: mtime, inode and size (`None`: absent).
type Stamp = Option<(i64, i64, u64, u64)>;

#[derive(Debug)]
struct Loaded {
    stamps: [Stamp; 2],
    hosts: Arc<HostsFile>,
    resolver: Result<Arc<Target>, Arc<DnsSetupError>>,
}

/// The target's DNS: the resolver (for absolute names) and the search rules.
#[derive(Debug)]
struct Target {
    resolver: TargetResolver,
    search: Vec<hickory_resolver::proto::rr::Name>,
    ndots: usize,
}

/// The resolver type: hickory over [`ConnectedUdp`].
type TargetResolver = Resolver<ConnectedUdp>;

/// The session's resolver for the target.
#[derive(Debug)]
pub struct Dns {
    root: Arc<TargetRoot>,
    loaded: tokio::sync::Mutex<Option<Loaded>>,
}

impl Dns {
    /// A resolver over the target's root; nothing is read until the first query.
    pub fn new(root: Arc<TargetRoot>) -> Dns {
        Dns {
            root,
            loaded: tokio::sync::Mutex::new(None),
        }
    }

    #[allow(clippy::unnecessary_cast)]
    fn stamp(&self, path: &str) -> Stamp {
        self.root.stat(path, true).ok().map(|st| {
            (
                st.st_mtime as i64,
                st.st_mtime_nsec as i64,
                st.st_ino as u64,
                st.st_size as u64,
            )
        })
    }

    /// The hosts file and resolver for the current versions of the target's files.
    async fn current(&self) -> (Arc<HostsFile>, Result<Arc<Target>, Arc<DnsSetupError>>) {
        let stamps = [self.stamp(RESOLV_CONF), self.stamp(HOSTS)];
        let mut loaded = self.loaded.lock().await;
        match &*loaded {
            Some(l) if l.stamps == stamps => {}
            _ => {
                tracing::debug!("loading the target's {RESOLV_CONF} and {HOSTS}");
                let hosts = self
                    .root
                    .read_to_end(HOSTS, MAX_CONFIG_LEN)
                    .map(|b| HostsFile::parse(&String::from_utf8_lossy(&b)))
                    .unwrap_or_default();
                let conf = self
                    .root
                    .read_to_end(RESOLV_CONF, MAX_CONFIG_LEN)
                    .unwrap_or_default();
                let resolver = resolver_config(&conf).and_then(|(config, opts)| {
                    let search = config.search.clone();
                    let ndots = opts.ndots;
                    Resolver::builder_with_config(config, ConnectedUdp::default())
                        .with_options(opts)
                        .build()
                        .map(|resolver| {
                            Arc::new(Target {
                                resolver,
                                search,
                                ndots,
                            })
                        })
                        .map_err(|e| DnsSetupError::Build(e.to_string()))
                });
                let resolver = resolver.map_err(Arc::new);
                *loaded = Some(Loaded {
                    stamps,
                    hosts: Arc::new(hosts),
                    resolver,
                });
            }
        }
        let l = loaded.as_ref().expect("loaded just above");
        (l.hosts.clone(), l.resolver.clone())
    }

    /// Resolves `host` for `family`, answering `RemoteRequest::Resolve`.
    pub async fn resolve(&self, host: &str, family: AddressFamily) -> RemoteResponse {
        let (hosts, resolver) = self.current().await;
        if let Some((addrs, canonical)) = hosts.lookup(host, family) {
            return RemoteResponse::Resolved {
                addrs,
                canonical: Some(canonical),
            };
        }
        let target = match resolver {
            Ok(r) => r,
            Err(e) => return RemoteResponse::Error(RemoteError::Other(e.to_string())),
        };
        let query = |name: hickory_resolver::proto::rr::Name| {
            let target = target.clone();
            async move {
                let lookup: Result<Lookup, NetError> = match family {
                    AddressFamily::Any => target
                        .resolver
                        .lookup_ip(name)
                        .await
                        .map(|l| l.as_lookup().clone()),
                    AddressFamily::V4 => target.resolver.lookup(name, RecordType::A).await,
                    AddressFamily::V6 => target.resolver.lookup(name, RecordType::AAAA).await,
                };
                let lookup = lookup.map_err(|e| {
                    tracing::debug!(host, "resolution failed: {e}");
                    miss(&e)
                })?;
                let mut addrs = Vec::new();
                let mut canonical = None;
                for record in lookup.answers() {
                    if let Some(ip) = record.data.ip_addr() {
                        canonical.get_or_insert_with(|| {
                            record.name.to_utf8().trim_end_matches('.').to_owned()
                        });
                        if !addrs.contains(&ip) {
                            addrs.push(ip);
                        }
                    }
                }
                if addrs.is_empty() {
                    Err(Miss::NoData)
                } else {
                    Ok(RemoteResponse::Resolved { addrs, canonical })
                }
            }
        };
        match search::search(host, target.ndots, &target.search, query).await {
            Ok(resolved) => resolved,
            Err(Miss::NotFound | Miss::NoData) => RemoteResponse::Error(RemoteError::NoName),
            Err(Miss::ServFail | Miss::Unreachable | Miss::Failed) => {
                RemoteResponse::Error(RemoteError::TryAgain)
            }
        }
    }
}

/// Classifies a hickory failure for one absolute name as glibc's search does.
fn miss(e: &NetError) -> Miss {
    match e {
        NetError::Dns(DnsError::NoRecordsFound(no)) => match no.response_code {
            ResponseCode::NXDomain => Miss::NotFound,
            ResponseCode::NoError => Miss::NoData,
            ResponseCode::ServFail => Miss::ServFail,
            _ => Miss::Failed,
        },
        NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail)) => Miss::ServFail,
        NetError::Io(_) | NetError::NoConnections => Miss::Unreachable,
        _ => Miss::Failed,
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    const HOSTS_TEXT: &str = "\
# comment
127.0.0.1\tlocalhost
::1 localhost ip6-localhost
10.0.0.7   db.internal db   # trailing comment
10.0.0.8   DB.internal
bogus      line
10.0.0.9
";

    #[test]
    fn hosts_lookup_by_family_and_case() {
        let hosts = HostsFile::parse(HOSTS_TEXT);
        assert_eq!(
            hosts.lookup("localhost", AddressFamily::Any),
            Some((
                vec![
                    IpAddr::V4(Ipv4Addr::LOCALHOST),
                    IpAddr::V6(Ipv6Addr::LOCALHOST)
                ],
                "localhost".into()
            ))
        );
        assert_eq!(
            hosts.lookup("LOCALHOST.", AddressFamily::V6),
            Some((vec![IpAddr::V6(Ipv6Addr::LOCALHOST)], "localhost".into()))
        );
        assert_eq!(
            hosts.lookup("db", AddressFamily::V4),
            Some((vec!["10.0.0.7".parse().unwrap()], "db.internal".into()))
        );
        assert_eq!(
            hosts.lookup("db.internal", AddressFamily::Any).unwrap().0,
            vec![
                "10.0.0.7".parse::<IpAddr>().unwrap(),
                "10.0.0.8".parse().unwrap()
            ]
        );
        assert_eq!(hosts.lookup("db", AddressFamily::V6), None);
        assert_eq!(hosts.lookup("bogus", AddressFamily::Any), None);
        assert_eq!(hosts.lookup("line", AddressFamily::Any), None);
    }

    #[test]
    fn resolv_conf_servers_search_and_options() {
        let (config, opts) = resolver_config(
            b"nameserver 10.96.0.10\nsearch ns.svc.cluster.local svc.cluster.local\n\
              options ndots:5 timeout:3 attempts:4\n",
        )
        .unwrap();
        let servers: Vec<IpAddr> = config.name_servers.iter().map(|s| s.ip).collect();
        assert_eq!(servers, vec!["10.96.0.10".parse::<IpAddr>().unwrap()]);
        let search: Vec<String> = config.search.iter().map(|n| n.to_utf8()).collect();
        assert_eq!(search, ["ns.svc.cluster.local", "svc.cluster.local"]);
        assert_eq!(opts.ndots, 5);
        assert_eq!(opts.timeout, std::time::Duration::from_secs(3));
        assert_eq!(opts.attempts, 4);
        assert_eq!(opts.use_hosts_file, ResolveHosts::Never);
    }

    #[test]
    fn servers_are_asked_in_order_or_rotated() {
        let (_, opts) = resolver_config(b"nameserver 10.0.0.1\nnameserver 10.0.0.2\n").unwrap();
        assert_eq!(
            opts.server_ordering_strategy,
            ServerOrderingStrategy::UserProvidedOrder
        );
        assert_eq!(opts.num_concurrent_reqs, 1);
        let (_, opts) =
            resolver_config(b"nameserver 10.0.0.1\noptions ndots:2 rotate timeout:1\n").unwrap();
        assert_eq!(
            opts.server_ordering_strategy,
            ServerOrderingStrategy::RoundRobin
        );
        assert_eq!(opts.ndots, 2);
        assert!(!rotates(b"# options rotate\nsearch rotate\n"));
    }

    #[tokio::test]
    async fn an_unreachable_server_fails_at_once_not_after_the_timeout() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("etc")).unwrap();
        // Nothing listens on 127.0.0.9:53: the kernel answers port unreachable.
        std::fs::write(
            tmp.path().join("etc/resolv.conf"),
            "nameserver 127.0.0.9\nsearch example.org\noptions timeout:5 attempts:2\n",
        )
        .unwrap();
        let dir = rustix::fs::open(
            tmp.path(),
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        let dns = Dns::new(Arc::new(TargetRoot::new(dir)));
        // A generous bound: a resolver that waits for its timeout takes 10 s or more.
        let answer = tokio::time::timeout(
            Duration::from_secs(4),
            dns.resolve("nowhere", AddressFamily::Any),
        )
        .await
        .expect("the lookup waited for its timeout");
        assert_eq!(answer, RemoteResponse::Error(RemoteError::TryAgain));
    }

    #[test]
    fn resolv_conf_without_servers_uses_localhost() {
        let (config, _) = resolver_config(b"search example.org\n").unwrap();
        let servers: Vec<IpAddr> = config.name_servers.iter().map(|s| s.ip).collect();
        assert_eq!(servers, vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]);
        assert!(resolver_config(b"").is_ok());
    }

    #[tokio::test]
    async fn target_hosts_file_wins() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("etc")).unwrap();
        std::fs::write(
            tmp.path().join("etc/hosts"),
            "198.18.250.77 only-in-target\n",
        )
        .unwrap();
        // A name server nobody answers on: the hosts file must answer first.
        std::fs::write(tmp.path().join("etc/resolv.conf"), "nameserver 127.0.0.9\n").unwrap();
        let dir = rustix::fs::open(
            tmp.path(),
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        let dns = Dns::new(Arc::new(TargetRoot::new(dir)));
        assert_eq!(
            dns.resolve("only-in-target", AddressFamily::Any).await,
            RemoteResponse::Resolved {
                addrs: vec!["198.18.250.77".parse().unwrap()],
                canonical: Some("only-in-target".into())
            }
        );
        // A change of the file is picked up.
        std::fs::write(
            tmp.path().join("etc/hosts"),
            "198.18.250.78 only-in-target other\n",
        )
        .unwrap();
        assert_eq!(
            dns.resolve("other", AddressFamily::V4).await,
            RemoteResponse::Resolved {
                addrs: vec!["198.18.250.78".parse().unwrap()],
                canonical: Some("only-in-target".into())
            }
        );
    }
}
