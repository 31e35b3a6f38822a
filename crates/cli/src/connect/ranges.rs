//! Which address ranges the connected machine routes to the tun.
//!
//! Discovered ranges: for a `pid:` target, the routes of its network namespace
//! (`/proc/PID/net/route` and `/proc/PID/net/ipv6_route`, see `proc(5)`) other
//! than the default route, loopback, link-local and multicast; for a cluster,
//! the nodes' `spec.podCIDRs` and the Service range (see `kube_ranges`). A
//! discovered range that overlaps a route this machine already has to a device
//! (its own networks: a LAN, a local cluster's bridge) is not routed, since
//! that would cut the machine off from it; the status says which and why.
//! `unreachable`, `blackhole` and `prohibit` routes do not count. Ranges asked
//! for with `--also-proxy` are always routed (a more specific route wins; an
//! identical prefix that already exists is reported, never replaced).

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// A range that is not routed, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// The range.
    pub range: IpNet,
    /// Why it stays as it was.
    pub reason: String,
}

/// A route of this machine's main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoute {
    /// Its destination.
    pub dst: IpNet,
    /// Its device, when it has one.
    pub dev: Option<String>,
    /// `unicast`, `unreachable`, `blackhole`, `prohibit`, ...
    pub kind: String,
}

/// The routes of the network namespace of process `pid` worth routing to.
///
/// # Errors
///
/// The process's route tables cannot be read.
pub fn target_routes(pid: u32) -> std::io::Result<Vec<IpNet>> {
    let mut ranges = worth_routing_of(&graft_proc::routes(pid)?);
    ranges.sort();
    ranges.dedup();
    Ok(ranges)
}

/// The destinations of `routes` worth routing to: not the default route, a
/// host route of IPv6, or a route through loopback.
fn worth_routing_of(routes: &[graft_proc::Route]) -> Vec<IpNet> {
    routes
        .iter()
        .filter(|r| r.iface != "lo" && r.prefix != 0 && !(r.dst.is_ipv6() && r.prefix == 128))
        .filter_map(|r| IpNet::new(r.dst, r.prefix).ok())
        .filter(worth_routing)
        .map(|net| net.trunc())
        .collect()
}

/// Not loopback, link-local or multicast.
fn worth_routing(net: &IpNet) -> bool {
    match net.addr() {
        IpAddr::V4(a) => !(a.is_loopback() || a.is_link_local() || a.is_multicast()),
        IpAddr::V6(a) => {
            !(a.is_loopback() || a.is_multicast() || (a.segments()[0] & 0xffc0) == 0xfe80)
        }
    }
}

/// This machine's main-table routes (`ip -j route show table main`, both
/// families), except those through `own_dev`.
pub fn host_routes(own_dev: &str) -> Vec<HostRoute> {
    let mut out = Vec::new();
    for family in ["-4", "-6"] {
        let Ok(output) = std::process::Command::new("ip")
            .args([family, "-j", "route", "show", "table", "main"])
            .output()
        else {
            continue;
        };
        out.extend(parse_ip_json(
            &String::from_utf8_lossy(&output.stdout),
            family == "-6",
        ));
    }
    out.retain(|r| r.dev.as_deref() != Some(own_dev));
    out
}

fn parse_ip_json(text: &str, v6: bool) -> Vec<HostRoute> {
    let Ok(serde_json::Value::Array(routes)) = serde_json::from_str(text) else {
        return Vec::new();
    };
    routes
        .iter()
        .filter_map(|route| {
            let dst = route.get("dst")?.as_str()?;
            let dst: IpNet = match dst {
                "default" => return None,
                text if text.contains('/') => text.parse().ok()?,
                text => {
                    let ip: IpAddr = text.parse().ok()?;
                    IpNet::new(ip, if v6 { 128 } else { 32 }).ok()?
                }
            };
            Some(HostRoute {
                dst,
                dev: route.get("dev").and_then(|d| d.as_str()).map(str::to_owned),
                kind: route
                    .get("type")
                    .and_then(|t| t.as_str())
                    .unwrap_or("unicast")
                    .to_owned(),
            })
        })
        .collect()
}

/// The ranges to route: discovered ones that do not collide with this machine's
/// own routes, and the forced ones (`--also-proxy`) unless the exact prefix
/// exists already.
pub fn plan(
    discovered: &[IpNet],
    forced: &[IpNet],
    host: &[HostRoute],
) -> (Vec<IpNet>, Vec<Skipped>) {
    let mut routed: Vec<IpNet> = Vec::new();
    let mut skipped = Vec::new();
    let blocking = |kind: &str| !matches!(kind, "unreachable" | "blackhole" | "prohibit" | "throw");
    for range in forced {
        if let Some(route) = host.iter().find(|r| r.dst == *range && blocking(&r.kind)) {
            skipped.push(Skipped {
                range: *range,
                reason: format!(
                    "this machine already routes exactly {range}{}",
                    dev_suffix(route)
                ),
            });
        } else if !routed.contains(range) {
            routed.push(*range);
        }
    }
    for range in discovered {
        if routed.iter().any(|r| r.contains(range)) {
            continue;
        }
        let overlap = host.iter().find(|r| {
            blocking(&r.kind)
                && r.dev.is_some()
                && (r.dst.contains(range) || range.contains(&r.dst))
        });
        match overlap {
            Some(route) => skipped.push(Skipped {
                range: *range,
                reason: format!(
                    "overlaps this machine's own route to {}{}; add --also-proxy for the \
                     addresses you need through graft",
                    route.dst,
                    dev_suffix(route)
                ),
            }),
            None => routed.push(*range),
        }
    }
    (routed, skipped)
}

fn dev_suffix(route: &HostRoute) -> String {
    route
        .dev
        .as_deref()
        .map(|d| format!(" (dev {d})"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_route_tables_parse() {
        // 198.19.7.0/24 on veth, default route, loopback-ish and link-local skipped.
        let v4 = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n\
                  gt7b\t000713C6\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                  eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                  eth0\t0000FEA9\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n";
        assert_eq!(
            worth_routing_of(&graft_proc::parse_route_v4(v4)),
            vec!["198.19.7.0/24".parse::<IpNet>().unwrap()]
        );
        let v6 = "20010002000010070000000000000000 40 00000000000000000000000000000000 00 \
                  00000000000000000000000000000000 00000100 00000001 00000000 00000001 gt7b\n\
                  fe800000000000000000000000000000 40 00000000000000000000000000000000 00 \
                  00000000000000000000000000000000 00000100 00000001 00000000 00000001 gt7b\n\
                  00000000000000000000000000000001 80 00000000000000000000000000000000 00 \
                  00000000000000000000000000000000 00000000 00000001 00000000 80200001 lo\n";
        assert_eq!(
            worth_routing_of(&graft_proc::parse_route_v6(v6)),
            vec!["2001:2:0:1007::/64".parse::<IpNet>().unwrap()]
        );
    }

    #[test]
    fn ip_json_routes_parse() {
        let text = r#"[{"dst":"default","gateway":"192.0.2.1","dev":"eth0","flags":[]},
            {"type":"unreachable","dst":"198.18.0.0/15","flags":[]},
            {"dst":"198.19.128.0/20","dev":"cni0","protocol":"kernel","scope":"link"},
            {"dst":"10.1.2.3","dev":"wg0"}]"#;
        let routes = parse_ip_json(text, false);
        assert_eq!(routes.len(), 3);
        assert_eq!(routes[0].kind, "unreachable");
        assert_eq!(routes[2].dst, "10.1.2.3/32".parse::<IpNet>().unwrap());
    }

    fn route(dst: &str, dev: Option<&str>, kind: &str) -> HostRoute {
        HostRoute {
            dst: dst.parse().unwrap(),
            dev: dev.map(str::to_owned),
            kind: kind.into(),
        }
    }

    #[test]
    fn ranges_that_collide_with_the_machine_are_skipped_forced_ones_kept() {
        let host = [
            route("198.18.0.0/15", None, "unreachable"),
            route("198.18.7.0/24", Some("gt7h"), "unicast"),
            route("198.19.128.0/20", Some("cni0"), "unicast"),
        ];
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let (routed, skipped) = plan(
            &[
                net("198.18.7.0/24"),
                net("198.19.7.0/24"),
                net("198.19.128.0/24"),
            ],
            &[net("198.19.128.10/32"), net("198.19.128.0/20")],
            &host,
        );
        assert_eq!(routed, [net("198.19.128.10/32"), net("198.19.7.0/24")]);
        let skipped: Vec<IpNet> = skipped.iter().map(|s| s.range).collect();
        assert_eq!(
            skipped,
            [
                net("198.19.128.0/20"),
                net("198.18.7.0/24"),
                net("198.19.128.0/24")
            ]
        );
    }
}
