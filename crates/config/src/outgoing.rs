//! Which outgoing destinations stay local (`--outgoing-local CIDR[:PORT]`).
//!
//! Loopback destinations always stay local; this adds user-chosen networks, with
//! an optional port. Forms: `10.0.0.0/8`, `10.1.2.3` (one host), `10.1.2.3:5432`,
//! `10.0.0.0/8:5432`, `fd00::/8`, `fd00::/8:5432`, `[fd00::1]:5432`.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::ConfigError;

/// One `--outgoing-local` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutgoingLocal {
    /// The network.
    pub net: IpNet,
    /// The port, or every port when `None`.
    pub port: Option<u16>,
}

impl OutgoingLocal {
    /// Whether a connection to `addr` matches this entry. IPv4-mapped IPv6
    /// addresses match IPv4 networks.
    pub fn matches(&self, addr: &SocketAddr) -> bool {
        let ip = match addr.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        self.net.contains(&ip) && self.port.is_none_or(|p| p == addr.port())
    }
}

impl std::str::FromStr for OutgoingLocal {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let invalid = || ConfigError::Invalid {
            what: "--outgoing-local",
            value: s.to_owned(),
            reason: "expected CIDR[:PORT], e.g. 10.0.0.0/8, 10.1.2.3:5432, [fd00::1]:80".into(),
        };
        let port = |p: &str| p.parse::<u16>().map_err(|_| invalid());
        let host_net = |ip: IpAddr| IpNet::from(ip);
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(OutgoingLocal {
                net: host_net(sa.ip()),
                port: Some(sa.port()),
            });
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(OutgoingLocal {
                net: host_net(ip),
                port: None,
            });
        }
        let (addr, prefix_and_port) = s.split_once('/').ok_or_else(invalid)?;
        let (prefix, port) = match prefix_and_port.split_once(':') {
            Some((prefix, p)) => (prefix, Some(port(p)?)),
            None => (prefix_and_port, None),
        };
        let net: IpNet = format!("{addr}/{prefix}").parse().map_err(|_| invalid())?;
        Ok(OutgoingLocal {
            net: net.trunc(),
            port,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> OutgoingLocal {
        s.parse().unwrap()
    }

    #[test]
    fn forms_parse() {
        assert_eq!(p("10.0.0.0/8").port, None);
        assert_eq!(p("10.0.0.0/8:5432").port, Some(5432));
        assert_eq!(
            p("10.1.2.3:80").net,
            "10.1.2.3/32".parse::<IpNet>().unwrap()
        );
        assert_eq!(p("fd00::/8:53").port, Some(53));
        assert_eq!(
            p("[fd00::1]:80").net,
            "fd00::1/128".parse::<IpNet>().unwrap()
        );
        assert!("nonsense".parse::<OutgoingLocal>().is_err());
        assert!("10.0.0.0/8:x".parse::<OutgoingLocal>().is_err());
    }

    #[test]
    fn matching_honours_port_and_mapped_v4() {
        let rule = p("198.18.0.0/15:80");
        assert!(rule.matches(&"198.19.1.2:80".parse().unwrap()));
        assert!(!rule.matches(&"198.19.1.2:81".parse().unwrap()));
        assert!(!rule.matches(&"198.20.0.1:80".parse().unwrap()));
        assert!(rule.matches(&"[::ffff:198.18.0.1]:80".parse().unwrap()));
    }
}
