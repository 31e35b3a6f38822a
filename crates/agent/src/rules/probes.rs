//! Probe sources: the addresses whose connections the agent never redirects,
//! so that the kubelet's liveness, readiness and startup probes keep reaching
//! the target's own server (a developer's process stopped at a breakpoint must
//! not make the pod unready or restart it).
//!
//! The kubelet probes a pod from the node's network namespace (Kubernetes docs,
//! "Configure Liveness, Readiness and Startup Probes": HTTP and TCP probes are
//! made by the kubelet), so a probe's source is the node's address on the route
//! to the pod: with a bridge CNI the pod's default gateway (the bridge's
//! address on the node), elsewhere usually the node's `status.hostIP`. The
//! agent is told both with `--probe-source gateway --probe-source HOST_IP`;
//! `gateway` stands for every default gateway of the target's network
//! namespace, read from `/proc/PID/net/route` and `/proc/PID/net/ipv6_route`
//! (the formats of `net/ipv4/fib_trie.c` and `net/ipv6/route.c`).
//!
//! The price: any other connection from those addresses (the node itself, a
//! host-network pod on the node) is not stolen or mirrored either.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// One `--probe-source` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeSource {
    /// This address.
    Addr(IpAddr),
    /// Every default gateway of the target's network namespace.
    Gateway,
}

/// A `--probe-source` value that is neither an IP address nor `gateway`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is neither an IP address nor `gateway` (the target's default gateways)")]
pub struct BadProbeSource(String);

impl FromStr for ProbeSource {
    type Err = BadProbeSource;

    fn from_str(s: &str) -> Result<ProbeSource, BadProbeSource> {
        if s == "gateway" {
            return Ok(ProbeSource::Gateway);
        }
        s.parse()
            .map(ProbeSource::Addr)
            .map_err(|_| BadProbeSource(s.to_owned()))
    }
}

/// The addresses `sources` stand for in the network namespace of process
/// `pid`, without duplicates, in order.
pub fn resolve(sources: &[ProbeSource], pid: u32) -> Vec<IpAddr> {
    let mut addrs = Vec::new();
    for source in sources {
        let found = match source {
            ProbeSource::Addr(a) => vec![*a],
            ProbeSource::Gateway => default_gateways(pid),
        };
        for a in found {
            if !addrs.contains(&a) {
                addrs.push(a);
            }
        }
    }
    addrs
}

/// The default gateways of process `pid`'s network namespace (IPv4, then IPv6).
pub fn default_gateways(pid: u32) -> Vec<IpAddr> {
    let read = |name: &str| std::fs::read_to_string(format!("/proc/{pid}/net/{name}"));
    let mut gateways: Vec<IpAddr> = Vec::new();
    if let Ok(table) = read("route") {
        gateways.extend(v4_default_gateways(&table).into_iter().map(IpAddr::V4));
    }
    if let Ok(table) = read("ipv6_route") {
        gateways.extend(v6_default_gateways(&table).into_iter().map(IpAddr::V6));
    }
    gateways
}

/// `/proc/net/route`: `Iface Destination Gateway Flags ...`, addresses as the
/// hex of the native-endian `u32` holding the network-order bytes.
fn v4_default_gateways(table: &str) -> Vec<Ipv4Addr> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (dest, gateway) = (fields.get(1)?, fields.get(2)?);
            let dest = u32::from_str_radix(dest, 16).ok()?;
            let gateway = u32::from_str_radix(gateway, 16).ok()?;
            (dest == 0 && gateway != 0).then(|| Ipv4Addr::from(gateway.to_ne_bytes()))
        })
        .collect()
}

/// `/proc/net/ipv6_route`: `dest plen src splen next_hop metric ...`, addresses
/// as 32 hex digits in network order.
fn v6_default_gateways(table: &str) -> Vec<Ipv6Addr> {
    table
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (dest, plen, next_hop) = (fields.first()?, fields.get(1)?, fields.get(4)?);
            let dest = u128::from_str_radix(dest, 16).ok()?;
            let next_hop = u128::from_str_radix(next_hop, 16).ok()?;
            (dest == 0 && *plen == "00" && next_hop != 0).then(|| Ipv6Addr::from(next_hop))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse() {
        assert_eq!("gateway".parse(), Ok(ProbeSource::Gateway));
        assert_eq!(
            "10.1.2.3".parse(),
            Ok(ProbeSource::Addr("10.1.2.3".parse().unwrap()))
        );
        assert!("fd00::1".parse::<ProbeSource>().is_ok());
        let bad = "node".parse::<ProbeSource>().unwrap_err();
        assert!(bad.to_string().contains("gateway"), "{bad}");
    }

    #[test]
    fn ipv4_default_gateway_of_a_pod() {
        // A pod on a CNI bridge: default via 198.19.128.1 dev eth0.
        let gw = u32::from_ne_bytes([198, 19, 128, 1]);
        let table = format!(
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
             eth0\t00000000\t{gw:08X}\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
             eth0\t{net:08X}\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n",
            net = u32::from_ne_bytes([198, 19, 128, 0])
        );
        assert_eq!(
            v4_default_gateways(&table),
            [Ipv4Addr::new(198, 19, 128, 1)]
        );
    }

    #[test]
    fn ipv6_default_gateway() {
        let table = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 \
                     fe800000000000000000000000000001 00000400 00000001 00000000 00000003 eth0\n\
                     20010002000000000000000000000000 40 00000000000000000000000000000000 00 \
                     00000000000000000000000000000000 00000100 00000001 00000000 00000001 eth0\n";
        assert_eq!(
            v6_default_gateways(table),
            ["fe80::1".parse::<Ipv6Addr>().unwrap()]
        );
    }

    #[test]
    fn own_namespace_resolves_without_duplicates() {
        let a: IpAddr = "192.0.2.7".parse().unwrap();
        let sources = [
            ProbeSource::Addr(a),
            ProbeSource::Addr(a),
            ProbeSource::Gateway,
        ];
        let addrs = resolve(&sources, std::process::id());
        assert_eq!(addrs[0], a);
        assert_eq!(addrs.iter().filter(|x| **x == a).count(), 1);
    }
}
