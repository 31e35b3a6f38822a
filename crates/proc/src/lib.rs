//! graft's one reader for `/proc` (see `proc(5)`): whether a process runs, its
//! environment, command line and cgroup, the route tables and listening TCP
//! sockets of its network namespace, the host name and the open-files limit.
//! The agent, the CLI, the proxy and the test harness read these files through
//! here, so each format is parsed in one place; the agent opens a target's
//! namespace and root at the paths [`dir`] gives.
//!
//! Every function takes the process's pid as the caller's pid namespace sees
//! it; the parsers of file contents are public too, for tests with fixed text.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

/// `/proc/PID`.
pub fn dir(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}"))
}

/// The host name of the calling process's UTS namespace
/// (`/proc/sys/kernel/hostname`), trimmed; `None` when it cannot be read.
pub fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

/// The soft limit of open files of the calling process, from
/// `/proc/self/limits` ("Max open files"); `None` when it cannot be read.
pub fn soft_nofile_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_soft_nofile_limit(&limits)
}

/// The "Max open files" soft limit in the text of a `limits` file.
pub fn parse_soft_nofile_limit(limits: &str) -> Option<u64> {
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

/// Whether a process `pid` exists (a zombie too).
pub fn exists(pid: u32) -> bool {
    dir(pid).exists()
}

/// The state letter of process `pid` (`R`, `S`, `D`, `Z`, `X`, ...), from
/// `/proc/PID/stat`; `None` when there is no such process.
pub fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(dir(pid).join("stat")).ok()?;
    parse_state(&stat)
}

/// Field `n` after the command name in the text of a `stat` file (0: the
/// state, 1: the parent pid, 19: the start time; proc(5) numbers them from 3).
/// The command name is in parentheses and may itself hold `)` and spaces.
fn stat_field(stat: &str, n: usize) -> Option<&str> {
    stat.rsplit_once(')')?.1.split_whitespace().nth(n)
}

/// The state letter in the text of a `stat` file.
pub fn parse_state(stat: &str) -> Option<char> {
    stat_field(stat, 0)?.chars().next()
}

/// The parent of process `pid` (its `ppid`), from `/proc/PID/stat`; `None`
/// when there is no such process.
pub fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(dir(pid).join("stat")).ok()?;
    parse_parent(&stat)
}

/// The parent pid in the text of a `stat` file: the field after the state.
pub fn parse_parent(stat: &str) -> Option<u32> {
    stat_field(stat, 1)?.parse().ok()
}

/// When process `pid` under `proc_root` (normally `/proc`) started, in clock
/// ticks since boot (`starttime`, field 22 of `/proc/PID/stat`, proc(5));
/// `None` when there is no such process.
pub fn start_time_in(proc_root: &Path, pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    parse_start_time(&stat)
}

/// The start time in the text of a `stat` file (`starttime`, field 22).
pub fn parse_start_time(stat: &str) -> Option<u64> {
    stat_field(stat, 19)?.parse().ok()
}

/// Whether process `pid` exists and is neither a zombie nor dead.
pub fn is_running(pid: u32) -> bool {
    state(pid).is_some_and(|s| !matches!(s, 'Z' | 'X'))
}

/// The environment process `pid` was started with (`execve`'s `envp`), from
/// `/proc/PID/environ`, in order; see [`parse_environ`].
///
/// # Errors
///
/// The file cannot be read (no such process, or not allowed: `EACCES`).
pub fn environ(pid: u32) -> io::Result<Vec<(String, String)>> {
    std::fs::read(dir(pid).join("environ")).map(|bytes| parse_environ(&bytes))
}

/// Parses the contents of an `environ` file: NUL-terminated `NAME=value`
/// entries, split at the first `=`. Entries without `=` are kept with an empty
/// value; names and values that are not UTF-8 are converted lossily.
pub fn parse_environ(bytes: &[u8]) -> Vec<(String, String)> {
    bytes
        .split(|b| *b == 0)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            let (name, value) = match entry.iter().position(|b| *b == b'=') {
                Some(i) => (&entry[..i], &entry[i + 1..]),
                None => (entry, &b""[..]),
            };
            (
                String::from_utf8_lossy(name).into_owned(),
                String::from_utf8_lossy(value).into_owned(),
            )
        })
        .collect()
}

/// The command line of process `pid` (`argv`), from `/proc/PID/cmdline`;
/// arguments that are not UTF-8 are converted lossily.
///
/// # Errors
///
/// The file cannot be read (no such process).
pub fn cmdline(pid: u32) -> io::Result<Vec<String>> {
    let raw = std::fs::read(dir(pid).join("cmdline"))?;
    Ok(raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect())
}

/// The pids of every process in this pid namespace.
pub fn pids() -> Vec<u32> {
    pids_in(Path::new("/proc"))
}

/// The pids of the processes under `proc_root`, a `/proc` or a copy of its
/// layout (tests); empty when it cannot be read.
pub fn pids_in(proc_root: &Path) -> Vec<u32> {
    std::fs::read_dir(proc_root)
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The descendants of process `pid` (its children, theirs, and so on; not
/// `pid` itself), parents before their children, from the parent pid of every
/// process's `stat` file. A process whose parent exited before the look-up
/// was given to a reaper (init, or a `PR_SET_CHILD_SUBREAPER`) and is not
/// among them; a process that starts during the look-up may be missing.
pub fn descendants(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = pids()
        .into_iter()
        .filter_map(|p| Some((p, parent(p)?)))
        .collect();
    descendants_from(pid, &parents)
}

/// The descendants of `pid` in a list of `(process, parent)` pairs, parents
/// before their children (breadth first).
pub fn descendants_from(pid: u32, parents: &[(u32, u32)]) -> Vec<u32> {
    let mut found = Vec::new();
    let mut next = 0;
    let mut of = pid;
    loop {
        for &(p, parent) in parents {
            if parent == of && p != pid && !found.contains(&p) {
                found.push(p);
            }
        }
        let Some(&p) = found.get(next) else { break };
        of = p;
        next += 1;
    }
    found
}

/// The text of process `pid`'s `cgroup` file under `proc_root` (cgroups(7):
/// `hierarchy-ID:controller-list:cgroup-path` lines).
///
/// # Errors
///
/// As the read fails: the process may have gone.
pub fn cgroup_in(proc_root: &Path, pid: u32) -> io::Result<String> {
    std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup"))
}

/// One route of a network namespace's main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The device it goes through (`eth0`, `lo`, ...).
    pub iface: String,
    /// Its destination network's address.
    pub dst: IpAddr,
    /// Its destination network's prefix length, in bits (0: a default route).
    pub prefix: u8,
    /// The next hop, when the route has one.
    pub gateway: Option<IpAddr>,
}

/// The routes of process `pid`'s network namespace, IPv4 then IPv6, from
/// `/proc/PID/net/route` and `/proc/PID/net/ipv6_route` (a kernel without IPv6
/// has only the first).
///
/// # Errors
///
/// The IPv4 table cannot be read (no such process, or not allowed).
pub fn routes(pid: u32) -> io::Result<Vec<Route>> {
    let net = dir(pid).join("net");
    let v4 = std::fs::read_to_string(net.join("route"))?;
    let v6 = std::fs::read_to_string(net.join("ipv6_route")).unwrap_or_default();
    let mut routes = parse_route_v4(&v4);
    routes.extend(parse_route_v6(&v6));
    Ok(routes)
}

/// Parses `/proc/net/route` (`net/ipv4/fib_trie.c`): a header line, then
/// `Iface Destination Gateway Flags RefCnt Use Metric Mask MTU Window IRTT`,
/// addresses as the hex of the native-endian `u32` that holds the
/// network-order bytes.
pub fn parse_route_v4(text: &str) -> Vec<Route> {
    let addr = |hex: &str| u32::from_str_radix(hex, 16).map(|v| Ipv4Addr::from(v.to_ne_bytes()));
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                return None;
            }
            let (dst, gateway, mask) = (
                addr(fields[1]).ok()?,
                addr(fields[2]).ok()?,
                addr(fields[7]).ok()?,
            );
            Some(Route {
                iface: fields[0].to_owned(),
                dst: IpAddr::V4(dst),
                prefix: u32::from(mask).count_ones() as u8,
                gateway: (!gateway.is_unspecified()).then_some(IpAddr::V4(gateway)),
            })
        })
        .collect()
}

/// Parses `/proc/net/ipv6_route` (`net/ipv6/route.c`): no header; `dst
/// dst_len src src_len next_hop metric refcnt use flags dev`, addresses as 32
/// hex digits in network order, lengths in hex.
pub fn parse_route_v6(text: &str) -> Vec<Route> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 {
                return None;
            }
            let dst = Ipv6Addr::from(u128::from_str_radix(fields[0], 16).ok()?);
            let prefix = u8::from_str_radix(fields[1], 16).ok()?;
            let next_hop = Ipv6Addr::from(u128::from_str_radix(fields[4], 16).ok()?);
            Some(Route {
                iface: fields[9].to_owned(),
                dst: IpAddr::V6(dst),
                prefix,
                gateway: (!next_hop.is_unspecified()).then_some(IpAddr::V6(next_hop)),
            })
        })
        .collect()
}

/// The `st` value of a listening socket in `/proc/net/tcp` (`TCP_LISTEN`).
const TCP_LISTEN: &str = "0A";

/// The listening sockets in the text of a `/proc/net/tcp` or `tcp6` table
/// (`net/ipv4/tcp_ipv4.c`, `net/ipv6/tcp_ipv6.c`): the local addresses of the
/// rows in state `TCP_LISTEN`.
pub fn parse_tcp_listeners(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            if state != TCP_LISTEN {
                return None;
            }
            let (addr, port) = local.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            Some(SocketAddr::new(parse_socket_addr(addr)?, port))
        })
        .collect()
}

/// An address of `/proc/net/tcp{,6}`: hex of the kernel's 32-bit words, each in
/// host byte order.
fn parse_socket_addr(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut octets = [0u8; 16];
            for i in 0..4 {
                octets[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descendants_are_found_through_every_generation_and_only_them() {
        // 10 ─┬─ 11 ─── 13
        //     └─ 12      20 ─── 21 (another tree)
        let parents = [(11, 10), (12, 10), (13, 11), (21, 20), (10, 1), (20, 1)];
        assert_eq!(descendants_from(10, &parents), vec![11, 12, 13]);
        assert_eq!(descendants_from(11, &parents), vec![13]);
        assert!(descendants_from(13, &parents).is_empty());
        // A loop (pid reuse while reading) ends.
        assert_eq!(descendants_from(30, &[(31, 30), (30, 31)]), vec![31]);
    }

    #[test]
    fn this_process_is_a_descendant_of_its_parent() {
        let me = std::process::id();
        let parent = parent(me).unwrap();
        assert!(descendants(parent).contains(&me));
    }

    #[test]
    fn a_child_starts_no_earlier_than_its_parent() {
        let own = start_time_in(Path::new("/proc"), std::process::id()).expect("our start time");
        let mut child = std::process::Command::new("sleep")
            .arg("1")
            .spawn()
            .unwrap();
        let started = start_time_in(Path::new("/proc"), child.id()).expect("the child's");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(own <= started, "{own} > {started}");
        assert_eq!(start_time_in(Path::new("/proc"), u32::MAX), None);
    }

    #[test]
    fn the_soft_open_files_limit_is_the_fourth_field_of_its_line() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(parse_soft_nofile_limit(limits), Some(1024));
        assert_eq!(
            parse_soft_nofile_limit("Max processes 10 10 processes\n"),
            None
        );
        assert!(soft_nofile_limit().is_some_and(|n| n > 0));
    }

    #[test]
    fn state_follows_the_last_parenthesis() {
        assert_eq!(parse_state("42 (a) b) S 1 2 3"), Some('S'));
        assert_eq!(parse_state("42 (zombie) Z 1"), Some('Z'));
        assert_eq!(parse_state("garbage"), None);
        assert_eq!(parse_parent("42 (a) b) S 17 2 3"), Some(17));
        assert_eq!(
            parent(std::process::id()),
            Some(std::os::unix::process::parent_id())
        );
        assert!(is_running(std::process::id()));
        assert!(exists(std::process::id()));
        assert_eq!(state(u32::MAX), None);
    }

    #[test]
    fn environ_splits_at_the_first_equals_sign() {
        assert_eq!(
            parse_environ(b"A=1\0B=x=y\0EMPTY=\0NOEQ\0\0"),
            [
                ("A".into(), "1".into()),
                ("B".into(), "x=y".into()),
                ("EMPTY".into(), String::new()),
                ("NOEQ".into(), String::new()),
            ]
        );
        let own = environ(std::process::id()).unwrap();
        assert_eq!(own.is_empty(), std::env::vars_os().next().is_none());
        assert!(cmdline(std::process::id()).unwrap()[0].contains("graft_proc"));
    }

    #[test]
    fn ipv4_routes_of_a_pod() {
        // default via 198.19.128.1 dev eth0; 198.19.128.0/24 dev eth0.
        let gw = u32::from_ne_bytes([198, 19, 128, 1]);
        let net = u32::from_ne_bytes([198, 19, 128, 0]);
        let mask = u32::from_ne_bytes([255, 255, 255, 0]);
        let table = format!(
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
             eth0\t00000000\t{gw:08X}\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
             eth0\t{net:08X}\t00000000\t0001\t0\t0\t0\t{mask:08X}\t0\t0\t0\n"
        );
        let routes = parse_route_v4(&table);
        assert_eq!(
            routes,
            [
                Route {
                    iface: "eth0".into(),
                    dst: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    prefix: 0,
                    gateway: Some(IpAddr::V4(Ipv4Addr::new(198, 19, 128, 1))),
                },
                Route {
                    iface: "eth0".into(),
                    dst: IpAddr::V4(Ipv4Addr::new(198, 19, 128, 0)),
                    prefix: 24,
                    gateway: None,
                },
            ]
        );
    }

    #[test]
    fn ipv6_routes_of_a_pod() {
        let table = "\
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000001 00000000 00000003     eth0
fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
";
        let routes = parse_route_v6(table);
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[0].prefix, 0);
        assert_eq!(routes[0].gateway, Some("fd00::1".parse().unwrap()));
        assert_eq!(routes[1].dst, "fd00::".parse::<IpAddr>().unwrap());
        assert_eq!(routes[1].prefix, 64);
        assert_eq!(routes[1].gateway, None);
        assert_eq!(routes[1].iface, "eth0");
    }
}
