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

use std::net::IpAddr;
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
    default_gateways_of(&graft_proc::routes(pid).unwrap_or_default())
}

/// The next hops of the default routes among `routes`.
fn default_gateways_of(routes: &[graft_proc::Route]) -> Vec<IpAddr> {
    routes
        .iter()
        .filter(|r| r.prefix == 0 && r.dst.is_unspecified())
        .filter_map(|r| r.gateway)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

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
            default_gateways_of(&graft_proc::parse_route_v4(&table)),
            [IpAddr::V4(Ipv4Addr::new(198, 19, 128, 1))]
        );
    }

    #[test]
    fn ipv6_default_gateway() {
        let table = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 \
                     fe800000000000000000000000000001 00000400 00000001 00000000 00000003 eth0\n\
                     20010002000000000000000000000000 40 00000000000000000000000000000000 00 \
                     00000000000000000000000000000000 00000100 00000001 00000000 00000001 eth0\n";
        assert_eq!(
            default_gateways_of(&graft_proc::parse_route_v6(table)),
            ["fe80::1".parse::<IpAddr>().unwrap()]
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
