//! Pass-through connections from the client's own address: when the hub sends
//! a redirected connection (or a request of it) on to the target's own server,
//! the agent connects from the client's address instead of the pod's, so the
//! server's logs, IP allow-lists and rate limits see the real client.
//!
//! How (the TPROXY recipe of the kernel's `Documentation/networking/tproxy.rst`,
//! without TPROXY itself since nothing is intercepted here):
//! - the agent's socket has `IP_TRANSPARENT` (ip(7), needs `CAP_NET_ADMIN`) and
//!   is bound to the client's address, and carries the agent's mark (`SO_MARK`);
//! - a `mangle OUTPUT` chain (named like the agent's nat chain) saves that mark
//!   on the connection (`CONNMARK --save-mark`) and puts it back on the server's
//!   replies, which the kernel then routes again;
//! - a policy rule sends marked packets to a table of their own whose only
//!   route is `local default dev lo`, so the replies, addressed to the client,
//!   come back to the agent's socket instead of leaving the pod.
//!
//! The rules are set up at the first pass-through connection and checked with a
//! connection from a documentation address (RFC 5737) to a listener of the
//! target's; when anything fails, the agent warns once and connects from the
//! pod's address as before. They are removed when the agent ends
//! ([`cleanup_blocking`], also run by the watchdog). IPv4 and IPv6 each have
//! their own rules (`iptables`/`ip -4`, `ip6tables`/`ip -6`) and probe.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::OnceCell;

/// The routing rule's priority: after the `local` table (0), before `main`.
const RULE_PRIORITY: &str = "100";

/// How long a transparent connect may take before the agent falls back to a
/// plain one (the target's server is local: this is only ever hit when the
/// routing is broken).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The agent's chain name, set at start.
static CHAIN: OnceLock<String> = OnceLock::new();

/// The set-up IPv4 rules, once tried (`None`: unavailable, connect plainly).
static READY_V4: OnceCell<Option<Marks>> = OnceCell::const_new();
/// The same for IPv6.
static READY_V6: OnceCell<Option<Marks>> = OnceCell::const_new();

/// An IP family's tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn ip_flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }

    fn everything(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0/0",
            Family::V6 => "::/0",
        }
    }

    fn ready(self) -> &'static OnceCell<Option<Marks>> {
        match self {
            Family::V4 => &READY_V4,
            Family::V6 => &READY_V6,
        }
    }
}

/// What identifies this agent's transparent connections.
#[derive(Debug, Clone, Copy)]
struct Marks {
    /// The packet and connection mark.
    mark: u32,
    /// The routing table number.
    table: u32,
}

impl Marks {
    /// Derived from the chain name `GRAFT-xxxxxxxx` (32 random bits), so that
    /// agents sharing a namespace do not collide and the watchdog finds them.
    fn of(chain: &str) -> Marks {
        let bits = chain
            .rsplit('-')
            .next()
            .and_then(|hex| u32::from_str_radix(hex, 16).ok())
            .unwrap_or(0x4752_4146);
        Marks {
            mark: bits | 1,
            table: 1_000_000 + bits % 1_000_000,
        }
    }
}

/// Whether the rules may have been set up (so the exit path removes them).
pub fn touched() -> bool {
    READY_V4.initialized() || READY_V6.initialized()
}

/// Records the agent's chain name; call once at start.
pub fn init(chain: &str) {
    let _ = CHAIN.set(chain.to_owned());
}

/// The commands that set the rules up, each `(program, args)`.
fn setup_commands(chain: &str, m: Marks, f: Family) -> Vec<(&'static str, Vec<String>)> {
    let mark = format!("0x{:x}", m.mark);
    let table = m.table.to_string();
    let ipt = |args: &[&str]| (f.iptables(), args.iter().map(|a| (*a).to_owned()).collect());
    vec![
        ipt(&["-w", "-t", "mangle", "-N", chain]),
        ipt(&[
            "-w",
            "-t",
            "mangle",
            "-A",
            chain,
            "-m",
            "mark",
            "--mark",
            &mark,
            "-j",
            "CONNMARK",
            "--save-mark",
        ]),
        ipt(&[
            "-w",
            "-t",
            "mangle",
            "-A",
            chain,
            "-m",
            "connmark",
            "--mark",
            &mark,
            "-j",
            "MARK",
            "--set-mark",
            &mark,
        ]),
        ipt(&["-w", "-t", "mangle", "-I", "OUTPUT", "1", "-j", chain]),
        (
            "ip",
            [
                f.ip_flag(),
                "rule",
                "add",
                "fwmark",
                &mark,
                "lookup",
                &table,
                "priority",
                RULE_PRIORITY,
            ]
            .map(str::to_owned)
            .to_vec(),
        ),
        (
            "ip",
            [
                f.ip_flag(),
                "route",
                "add",
                "local",
                f.everything(),
                "dev",
                "lo",
                "table",
                &table,
            ]
            .map(str::to_owned)
            .to_vec(),
        ),
    ]
}

/// The commands that remove what [`setup_commands`] made, in order.
fn cleanup_commands(chain: &str, m: Marks, f: Family) -> Vec<(&'static str, Vec<String>)> {
    let mark = format!("0x{:x}", m.mark);
    let table = m.table.to_string();
    let own = |p: &'static str, args: &[&str]| (p, args.iter().map(|a| (*a).to_owned()).collect());
    vec![
        own(
            f.iptables(),
            &["-w", "-t", "mangle", "-D", "OUTPUT", "-j", chain],
        ),
        own(f.iptables(), &["-w", "-t", "mangle", "-F", chain]),
        own(f.iptables(), &["-w", "-t", "mangle", "-X", chain]),
        own(
            "ip",
            &[
                f.ip_flag(),
                "rule",
                "del",
                "fwmark",
                &mark,
                "lookup",
                &table,
                "priority",
                RULE_PRIORITY,
            ],
        ),
        own("ip", &[f.ip_flag(), "route", "flush", "table", &table]),
    ]
}

/// Why pass-through connections cannot keep the client's address: a rule
/// command failed, or the probe connection did not arrive from the address it
/// was sent from. The agent then falls back to the pod's address (logged).
#[derive(Debug, thiserror::Error)]
enum TransparentError {
    /// A command could not be started.
    #[error("could not run {program}: {error}; install iptables and iproute2 in the agent's image")]
    Spawn {
        /// `iptables`, `ip6tables` or `ip`.
        program: String,
        /// What `exec` said.
        error: io::Error,
    },
    /// A command ran and failed.
    #[error(
        "`{command}` failed: {stderr}; the agent needs CAP_NET_ADMIN and the kernel's mangle table"
    )]
    Failed {
        /// The command line.
        command: String,
        /// What it wrote on stderr (trimmed).
        stderr: String,
    },
    /// The blocking task running the commands failed.
    #[error("the rule commands did not complete: {0}")]
    Task(tokio::task::JoinError),
    /// No listener for the probe.
    #[error("no probe listener on {ip}: {error}")]
    ProbeListen {
        /// Where it was to listen.
        ip: IpAddr,
        /// Why it could not.
        error: io::Error,
    },
    /// The probe arrived from another address than the one it was sent from.
    #[error("the probe arrived from {0}")]
    ProbeSource(SocketAddr),
    /// The probe connection failed.
    #[error("the probe connection failed: {0}")]
    ProbeConnect(io::Error),
    /// The probe connection did not complete in time.
    #[error("the probe connection did not complete")]
    ProbeIncomplete,
}

/// Runs one command quietly; the error carries its stderr.
fn run(program: &str, args: &[String]) -> Result<(), TransparentError> {
    let out = Command::new(program)
        .args(args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|error| TransparentError::Spawn {
            program: program.to_owned(),
            error,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(TransparentError::Failed {
            command: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Removes this agent's transparent rules, blocking (exit path and watchdog);
/// what is already gone is ignored.
pub fn cleanup_blocking(chain: &str) {
    for family in [Family::V4, Family::V6] {
        for (program, args) in cleanup_commands(chain, Marks::of(chain), family) {
            let _ = run(program, &args);
        }
    }
}

/// Sets the rules of `probe_ip`'s family up and checks them once; `None` when
/// unavailable.
async fn ready(probe_ip: IpAddr) -> Option<Marks> {
    let family = match probe_ip {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    };
    *family
        .ready()
        .get_or_init(|| async move {
            let chain = CHAIN.get()?.clone();
            let marks = Marks::of(&chain);
            let set_up = {
                let chain = chain.clone();
                tokio::task::spawn_blocking(move || {
                    for (program, args) in setup_commands(&chain, marks, family) {
                        run(program, &args)?;
                    }
                    Ok::<(), TransparentError>(())
                })
                .await
                .unwrap_or_else(|e| Err(TransparentError::Task(e)))
            };
            let checked = match set_up {
                Ok(()) => probe(marks, probe_ip).await,
                Err(e) => Err(e),
            };
            match checked {
                Ok(()) => {
                    tracing::info!(
                        ?family,
                        "pass-through connections reach the target from the client's address"
                    );
                    Some(marks)
                }
                Err(e) => {
                    tracing::warn!(
                        ?family,
                        "pass-through connections will come from the pod's address, not the \
                         client's: {e}"
                    );
                    let _ = tokio::task::spawn_blocking(move || {
                        for (program, args) in cleanup_commands(&chain, marks, family) {
                            let _ = run(program, &args);
                        }
                    })
                    .await;
                    None
                }
            }
        })
        .await
}

/// Connects from a documentation address (RFC 5737 TEST-NET-2, RFC 3849) to a
/// listener on `ip` and checks the listener sees that address.
async fn probe(marks: Marks, ip: IpAddr) -> Result<(), TransparentError> {
    let listen_failed = |error| TransparentError::ProbeListen { ip, error };
    let listener = TcpListener::bind((ip, 0)).await.map_err(listen_failed)?;
    let dest = listener.local_addr().map_err(listen_failed)?;
    let client = match ip {
        IpAddr::V4(_) => SocketAddr::from((Ipv4Addr::new(198, 51, 100, 7), 0)),
        IpAddr::V6(_) => SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7), 0)),
    };
    let (connected, accepted) = tokio::join!(
        tokio::time::timeout(CONNECT_TIMEOUT, connect_marked(marks, client, dest)),
        tokio::time::timeout(CONNECT_TIMEOUT, listener.accept()),
    );
    match (connected, accepted) {
        (Ok(Ok(_)), Ok(Ok((_, seen)))) if seen.ip() == client.ip() => Ok(()),
        (Ok(Ok(_)), Ok(Ok((_, seen)))) => Err(TransparentError::ProbeSource(seen)),
        (Ok(Err(e)), _) => Err(TransparentError::ProbeConnect(e)),
        _ => Err(TransparentError::ProbeIncomplete),
    }
}

/// A connection to `dest` from `client`'s address with the agent's mark.
async fn connect_marked(
    marks: Marks,
    client: SocketAddr,
    dest: SocketAddr,
) -> io::Result<TcpStream> {
    use nix::sys::socket::{setsockopt, sockopt};
    let socket = if client.is_ipv4() {
        let socket = TcpSocket::new_v4()?;
        setsockopt(&socket.as_fd(), sockopt::IpTransparent, &true).map_err(io::Error::from)?;
        socket
    } else {
        let socket = TcpSocket::new_v6()?;
        set_ipv6_transparent(&socket)?;
        socket
    };
    setsockopt(&socket.as_fd(), sockopt::Mark, &marks.mark).map_err(io::Error::from)?;
    socket.bind(SocketAddr::new(client.ip(), 0))?;
    socket.connect(dest).await
}

/// Sets `IPV6_TRANSPARENT` (ipv6(7)), which `nix` does not offer.
fn set_ipv6_transparent(socket: &TcpSocket) -> io::Result<()> {
    let on: libc::c_int = 1;
    crate::sockopt::set(socket.as_fd(), libc::SOL_IPV6, libc::IPV6_TRANSPARENT, &on)
}

/// Connects to the target's own server at `dest` for a connection of `client`:
/// from the client's address when the rules are available and the client is
/// another host's address of the same family, else from the pod's own.
///
/// # Errors
///
/// The `connect` error of the plain connection.
pub async fn connect_target(dest: SocketAddr, client: SocketAddr) -> io::Result<TcpStream> {
    let client_ip = client.ip().to_canonical();
    let dest_ip = dest.ip().to_canonical();
    if client_ip.is_ipv4() == dest_ip.is_ipv4()
        && !client_ip.is_loopback()
        && !client_ip.is_unspecified()
        && client_ip != dest_ip
        && let Some(marks) = ready(dest_ip).await
    {
        let client = SocketAddr::new(client_ip, 0);
        let dest = SocketAddr::new(dest_ip, dest.port());
        match tokio::time::timeout(CONNECT_TIMEOUT, connect_marked(marks, client, dest)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => tracing::debug!(%client, %dest, "transparent connect failed: {e}"),
            Err(_) => tracing::debug!(%client, %dest, "transparent connect timed out"),
        }
    }
    TcpStream::connect(dest).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_follow_the_chain_and_are_never_zero() {
        let m = Marks::of("GRAFT-0badcafe");
        assert_eq!(m.mark, 0x0bad_caff);
        assert_eq!(m.table, 1_000_000 + 0x0bad_cafe % 1_000_000);
        assert_ne!(Marks::of("GRAFT-00000000").mark, 0);
    }

    #[test]
    fn cleanup_undoes_setup() {
        let m = Marks::of("GRAFT-00000010");
        let setup = setup_commands("GRAFT-00000010", m, Family::V4);
        let cleanup = cleanup_commands("GRAFT-00000010", m, Family::V4);
        let v6 = setup_commands("GRAFT-00000010", m, Family::V6);
        assert_eq!(v6[0].0, "ip6tables");
        assert!(
            v6.iter()
                .any(|(_, a)| a.join(" ") == "-6 route add local ::/0 dev lo table 1000016")
        );
        assert!(
            setup
                .iter()
                .any(|(_, a)| a.join(" ").contains("-I OUTPUT 1 -j GRAFT-00000010"))
        );
        assert!(
            cleanup
                .iter()
                .any(|(_, a)| a.join(" ").contains("-D OUTPUT -j GRAFT-00000010"))
        );
        assert!(
            cleanup
                .iter()
                .any(|(_, a)| a.join(" ") == "-4 route flush table 1000016")
        );
        assert!(
            cleanup
                .iter()
                .any(|(_, a)| a.join(" ").starts_with("-4 rule del fwmark 0x11 "))
        );
    }
}
