//! Which outgoing connections go through the target and which names the
//! target resolves: `[outgoing] local/remote` (`--outgoing-local`,
//! `--outgoing-remote`) and `[dns] local/remote` (`--dns-local`,
//! `--dns-remote`). This is the one place that decides, for every front end:
//! the LD_PRELOAD layer, the isolate netstack and `graft connect` call
//! [`goes_remote`] and [`resolves_remotely`].
//!
//! An outgoing entry ([`Destination`]) is `[tcp://|udp://]HOST[:PORT]`, HOST
//! being a network (`10.0.0.0/8`, `fd00::/8`), an address (`10.1.2.3`,
//! `[fd00::1]`), a name (`db.internal`, `*.svc.cluster.local`) or nothing (any
//! address, e.g. `udp://:53`). The older form `CIDR:PORT` (`10.0.0.0/8:5432`)
//! still parses. A DNS entry ([`NamePattern`]) is a name or `*.suffix`.
//!
//! Deciding by name needs the names behind an address: each front end records
//! the answers its program got ([`ResolvedNames::record`]), and a connect to an
//! address matches a name rule when one of the names that resolved to it does.
//! An address the program never looked up has no name (only CIDR and port
//! rules apply to it).
//!
//! Order: loopback is always local; then a `local` entry wins; then, when
//! `remote` has entries, only what matches one goes through the target;
//! without `remote` entries everything else does.

mod names;

use std::net::{IpAddr, SocketAddr};

use graft_protocol::Transport;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use names::{NamePattern, ResolvedNames};

use crate::ConfigError;

/// What an outgoing entry's host part matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// Every address (the entry gave only a port or a protocol).
    Any,
    /// A network, or one address as a /32 or /128.
    Net(IpNet),
    /// The addresses a matching name resolved to.
    Name(NamePattern),
}

/// One `[outgoing]` entry; its text form is what it parses from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Destination {
    /// `tcp://` or `udp://`, or both when `None`.
    pub transport: Option<Transport>,
    /// The host part.
    pub host: Host,
    /// The port, or every port when `None`.
    pub port: Option<u16>,
}

/// The old name of [`Destination`], from when entries were CIDRs only.
pub type OutgoingLocal = Destination;

impl Destination {
    /// Whether a connection to `addr` matches, ignoring name rules and the
    /// transport (the form the netstack and older callers need when no name is
    /// known). IPv4-mapped IPv6 addresses match IPv4 networks.
    pub fn matches(&self, addr: &SocketAddr) -> bool {
        self.matches_flow(addr, None, &ResolvedNames::default())
    }

    /// Whether a `transport` flow (`None`: either) to `addr`, whose address
    /// `names` may know names of, matches this entry.
    pub fn matches_flow(
        &self,
        addr: &SocketAddr,
        transport: Option<Transport>,
        names: &ResolvedNames,
    ) -> bool {
        if self.port.is_some_and(|p| p != addr.port()) {
            return false;
        }
        if let (Some(want), Some(got)) = (self.transport, transport)
            && want != got
        {
            return false;
        }
        let ip = unmap(addr.ip());
        match &self.host {
            Host::Any => true,
            Host::Net(net) => net.contains(&ip),
            Host::Name(pattern) => names.any_name(ip, |name| pattern.matches(name)),
        }
    }
}

/// Whether a `transport` flow to `dest` goes through the target, by the
/// order in the module docs. `names` holds what the program resolved.
pub fn goes_remote(
    local: &[Destination],
    remote: &[Destination],
    dest: &SocketAddr,
    transport: Transport,
    names: &ResolvedNames,
) -> bool {
    let ip = unmap(dest.ip());
    if ip.is_loopback() || ip.is_unspecified() {
        return false;
    }
    let hit = |rule: &Destination| rule.matches_flow(dest, Some(transport), names);
    if local.iter().any(hit) {
        return false;
    }
    remote.is_empty() || remote.iter().any(hit)
}

/// Whether `name` (as the program asked it) is resolved by the target's
/// resolver: a `local` pattern wins; then, when `remote` has patterns, only
/// the names matching one; without `remote` patterns every name.
pub fn resolves_remotely(local: &[NamePattern], remote: &[NamePattern], name: &str) -> bool {
    if local.iter().any(|p| p.matches(name)) {
        return false;
    }
    remote.is_empty() || remote.iter().any(|p| p.matches(name))
}

/// Parses a `[dns]` entry (`--dns-local`, `--dns-remote`).
///
/// # Errors
///
/// [`ConfigError::Invalid`] naming the entry and the expected form.
pub fn parse_name(text: &str) -> Result<NamePattern, ConfigError> {
    text.parse().map_err(|reason| ConfigError::Invalid {
        what: "DNS name",
        value: text.to_owned(),
        reason,
    })
}

fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

impl std::str::FromStr for Destination {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let invalid = |why: &str| ConfigError::Invalid {
            what: "outgoing destination",
            value: s.to_owned(),
            reason: format!(
                "{why}; expected [tcp://|udp://]HOST[:PORT] with HOST a CIDR, an address, a \
                 name or `*.domain`, e.g. 10.0.0.0/8, 10.1.2.3:5432, [fd00::1]:80, \
                 db.internal:5432, *.svc.cluster.local, udp://:53"
            ),
        };
        let (transport, rest) = match s.split_once("://") {
            Some(("tcp", rest)) => (Some(Transport::Tcp), rest),
            Some(("udp", rest)) => (Some(Transport::Udp), rest),
            Some((other, _)) => return Err(invalid(&format!("unknown protocol {other:?}"))),
            None => (None, s),
        };
        let port = |p: &str| {
            p.parse::<u16>()
                .map_err(|_| invalid(&format!("{p:?} is not a port")))
        };
        let entry = |host, port| Destination {
            transport,
            host,
            port,
        };
        if rest.is_empty() {
            return match transport {
                Some(_) => Ok(entry(Host::Any, None)),
                None => Err(invalid("the entry is empty")),
            };
        }
        if let Some(p) = rest.strip_prefix(':') {
            return Ok(entry(Host::Any, Some(port(p)?)));
        }
        if let Ok(sa) = rest.parse::<SocketAddr>() {
            return Ok(entry(
                Host::Net(IpNet::from(unmap(sa.ip()))),
                Some(sa.port()),
            ));
        }
        let unbracketed = rest
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .unwrap_or(rest);
        if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            return Ok(entry(Host::Net(IpNet::from(unmap(ip))), None));
        }
        if let Some((addr, prefix_and_port)) = rest.split_once('/') {
            let (prefix, p) = match prefix_and_port.split_once(':') {
                Some((prefix, p)) => (prefix, Some(port(p)?)),
                None => (prefix_and_port, None),
            };
            let net: IpNet = format!("{addr}/{prefix}")
                .parse()
                .map_err(|_| invalid("not a network"))?;
            return Ok(entry(Host::Net(net.trunc()), p));
        }
        let (name, p) = match rest.rsplit_once(':') {
            Some((name, p)) => (name, Some(port(p)?)),
            None => (rest, None),
        };
        let pattern = name.parse::<NamePattern>().map_err(|why| invalid(&why))?;
        Ok(entry(Host::Name(pattern), p))
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.transport {
            Some(Transport::Tcp) => f.write_str("tcp://")?,
            Some(Transport::Udp) => f.write_str("udp://")?,
            None => {}
        }
        match (&self.host, self.port) {
            (Host::Any, _) => {}
            (Host::Net(net), Some(_)) if net.prefix_len() == net.max_prefix_len() => {
                match net.addr() {
                    IpAddr::V4(v4) => write!(f, "{v4}")?,
                    IpAddr::V6(v6) => write!(f, "[{v6}]")?,
                }
            }
            (Host::Net(net), _) if net.prefix_len() == net.max_prefix_len() => {
                write!(f, "{}", net.addr())?
            }
            (Host::Net(net), _) => write!(f, "{net}")?,
            (Host::Name(name), _) => write!(f, "{name}")?,
        }
        match self.port {
            Some(p) => write!(f, ":{p}"),
            None => Ok(()),
        }
    }
}

impl From<Destination> for String {
    fn from(d: Destination) -> String {
        d.to_string()
    }
}

impl TryFrom<String> for Destination {
    type Error = ConfigError;

    fn try_from(s: String) -> Result<Self, ConfigError> {
        s.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Destination {
        s.parse().unwrap()
    }

    fn net(s: &str) -> Host {
        Host::Net(s.parse().unwrap())
    }

    #[test]
    fn forms_parse() {
        assert_eq!(p("10.0.0.0/8").port, None);
        assert_eq!(p("10.0.0.0/8:5432").port, Some(5432));
        assert_eq!(p("10.1.2.3:80").host, net("10.1.2.3/32"));
        assert_eq!(p("fd00::/8:53").port, Some(53));
        assert_eq!(p("[fd00::1]:80").host, net("fd00::1/128"));
        assert_eq!(p("[fd00::1]").host, net("fd00::1/128"));
        assert_eq!(p("db.internal:5432").port, Some(5432));
        assert!(matches!(p("*.svc.cluster.local").host, Host::Name(_)));
        let dns = p("udp://:53");
        assert_eq!(
            (dns.transport, dns.host, dns.port),
            (Some(Transport::Udp), Host::Any, Some(53))
        );
        assert_eq!(p("tcp://10.0.0.0/8").transport, Some(Transport::Tcp));
        for bad in [
            "",
            "10.0.0.0/8:x",
            "sctp://10.0.0.1",
            "db internal",
            "*foo.com",
            "a..b",
            "db:99999",
        ] {
            assert!(bad.parse::<Destination>().is_err(), "{bad}");
        }
        let err = "ftp://x".parse::<Destination>().unwrap_err().to_string();
        assert!(
            err.contains("unknown protocol") && err.contains("udp://:53"),
            "{err}"
        );
    }

    #[test]
    fn text_form_round_trips() {
        for text in [
            "10.0.0.0/8",
            "10.0.0.0/8:5432",
            "10.1.2.3",
            "10.1.2.3:80",
            "[fd00::1]:80",
            "fd00::1",
            "udp://:53",
            "tcp://*.svc.cluster.local:443",
            "db.internal",
        ] {
            assert_eq!(p(text).to_string(), text);
            let json = serde_json::to_string(&p(text)).unwrap();
            assert_eq!(serde_json::from_str::<Destination>(&json).unwrap(), p(text));
        }
    }

    #[test]
    fn matching_honours_port_and_mapped_v4() {
        let rule = p("198.18.0.0/15:80");
        assert!(rule.matches(&"198.19.1.2:80".parse().unwrap()));
        assert!(!rule.matches(&"198.19.1.2:81".parse().unwrap()));
        assert!(!rule.matches(&"198.20.0.1:80".parse().unwrap()));
        assert!(rule.matches(&"[::ffff:198.18.0.1]:80".parse().unwrap()));
    }

    #[test]
    fn names_and_protocols_decide() {
        let names = ResolvedNames::default();
        names.record("db.internal", &["10.9.0.5".parse().unwrap()]);
        names.record(
            "web.shop.svc.cluster.local",
            &["10.96.0.7".parse().unwrap()],
        );
        let db: SocketAddr = "10.9.0.5:5432".parse().unwrap();
        let web: SocketAddr = "10.96.0.7:80".parse().unwrap();
        let other: SocketAddr = "10.96.0.8:80".parse().unwrap();
        let dns: SocketAddr = "10.96.0.10:53".parse().unwrap();
        let local = [p("db.internal:5432"), p("udp://:53")];
        let remote = [p("*.svc.cluster.local"), p("udp://0.0.0.0/0")];
        let go = |d: &SocketAddr, t| goes_remote(&local, &remote, d, t, &names);
        assert!(!go(&db, Transport::Tcp));
        assert!(go(&web, Transport::Tcp));
        // No name known for it, and remote entries restrict: local.
        assert!(!go(&other, Transport::Tcp));
        // UDP to anything but port 53 is remote; port 53 stays local.
        assert!(go(&other, Transport::Udp));
        assert!(!go(&dns, Transport::Udp));
        // Without remote entries everything not local goes through the target.
        assert!(goes_remote(&local, &[], &other, Transport::Tcp, &names));
        assert!(!goes_remote(
            &[],
            &[],
            &"127.0.0.1:5".parse().unwrap(),
            Transport::Tcp,
            &names
        ));
        assert!(!goes_remote(
            &[],
            &[],
            &"[::ffff:127.0.0.1]:5".parse().unwrap(),
            Transport::Tcp,
            &names
        ));
    }

    #[test]
    fn dns_rules_decide() {
        let pat = |s: &str| s.parse::<NamePattern>().unwrap();
        let local = [pat("*.corp.example"), pat("printer")];
        let remote = [pat("*.svc.cluster.local"), pat("db.internal")];
        assert!(!resolves_remotely(&local, &[], "git.corp.example"));
        assert!(!resolves_remotely(&local, &[], "PRINTER."));
        assert!(resolves_remotely(&local, &[], "anything.else"));
        assert!(resolves_remotely(
            &local,
            &remote,
            "web.shop.svc.cluster.local."
        ));
        assert!(resolves_remotely(&local, &remote, "DB.Internal"));
        assert!(!resolves_remotely(&local, &remote, "example.com"));
    }
}
