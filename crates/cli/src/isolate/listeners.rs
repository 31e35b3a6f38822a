//! Incoming traffic for an isolated COMMAND: graft learns which ports COMMAND
//! listens on by reading the namespace's socket tables (`/proc/PID/net/tcp` and
//! `tcp6` of a process in it, proc(5)) every [`POLL`], steals (or mirrors) the
//! target's port for each new listener ([`graft_proxy::Session::steal`], through
//! `--port-map` when one names the port), releases it when the listener goes, and
//! delivers each connection through a socket the helper connects inside the
//! namespace.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use graft_config::PortMapping;
use graft_proxy::{Delivery, IncomingTcp, Session};
use tokio::sync::mpsc;

use super::wire::{Channel, Message};

/// How often the socket tables are read.
pub const POLL: Duration = Duration::from_millis(200);
/// Stolen connections waiting for delivery.
const DELIVERY_QUEUE: usize = 256;
/// Where to connect inside the namespace to reach a listener bound to `local`.
fn connect_address(local: SocketAddr) -> SocketAddr {
    let ip = match local.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, local.port())
}

/// The helper's side of deliveries: one connect at a time, answered in order.
pub struct Connector {
    channel: tokio::sync::Mutex<Channel>,
}

impl Connector {
    /// Wraps the channel to the helper (after COMMAND started).
    pub fn new(channel: Channel) -> Connector {
        Connector {
            channel: tokio::sync::Mutex::new(channel),
        }
    }

    /// A socket connected to `addr` inside the namespace.
    async fn connect(&self, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        let channel = self.channel.lock().await;
        channel.send(&Message::Connect(addr), None).await?;
        match channel.recv().await? {
            Some((Message::Connected, Some(fd))) => {
                let stream = std::net::TcpStream::from(fd);
                stream.set_nonblocking(true)?;
                tokio::net::TcpStream::from_std(stream)
            }
            Some((Message::Refused(errno), _)) => Err(std::io::Error::from_raw_os_error(errno)),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the isolated namespace's helper is gone",
            )),
        }
    }
}

/// Watches COMMAND's listeners (in the namespace of process `pid`) and serves
/// their ports until dropped.
pub async fn serve(
    session: Arc<Session>,
    connector: Arc<Connector>,
    pid: u32,
    port_map: Vec<PortMapping>,
) {
    // Target port → where its connections go in the namespace.
    let routes: Arc<Mutex<HashMap<u16, SocketAddr>>> = Arc::default();
    let (incoming_tx, mut incoming_rx) = mpsc::channel::<IncomingTcp>(DELIVERY_QUEUE);
    let deliver = {
        let routes = routes.clone();
        async move {
            let mut tasks = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    incoming = incoming_rx.recv() => {
                        let Some(incoming) = incoming else { break };
                        let route = routes
                            .lock()
                            .expect("no panic while the lock is held")
                            .get(&incoming.port())
                            .copied();
                        let Some(addr) = route else { continue };
                        let connector = connector.clone();
                        tasks.spawn(async move {
                            match connector.connect(addr).await {
                                Ok(stream) => incoming.splice(stream).await,
                                Err(e) => tracing::warn!(
                                    %addr, error = %e,
                                    "cannot deliver a stolen connection to COMMAND; reset"
                                ),
                            }
                        });
                    }
                    Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                }
            }
        }
    };
    let watch = async {
        let mut warned: HashMap<u16, String> = HashMap::new();
        loop {
            let mut listening: HashMap<u16, SocketAddr> = HashMap::new();
            for table in ["tcp", "tcp6"] {
                let path = format!("/proc/{pid}/net/{table}");
                let Ok(text) = tokio::fs::read_to_string(&path).await else {
                    continue;
                };
                for local in graft_proc::parse_tcp_listeners(&text) {
                    let remote = port_map
                        .iter()
                        .find(|m| m.local == local.port())
                        .map_or(local.port(), |m| m.remote);
                    // IPv4 first: a dual-stack `[::]` listener takes it too.
                    listening
                        .entry(remote)
                        .or_insert_with(|| connect_address(local));
                }
            }
            let current: Vec<u16> = routes
                .lock()
                .expect("no panic while the lock is held")
                .keys()
                .copied()
                .collect();
            for port in current {
                if !listening.contains_key(&port) {
                    routes
                        .lock()
                        .expect("no panic while the lock is held")
                        .remove(&port);
                    session.release(port).await;
                    warned.remove(&port);
                }
            }
            for (port, addr) in listening {
                let known = routes
                    .lock()
                    .expect("no panic while the lock is held")
                    .contains_key(&port);
                if known || warned.contains_key(&port) {
                    continue;
                }
                match session
                    .steal(port, Delivery::Channel(incoming_tx.clone()))
                    .await
                {
                    Ok(()) => {
                        tracing::info!(port, %addr, "COMMAND listens: its target port is served");
                        routes
                            .lock()
                            .expect("no panic while the lock is held")
                            .insert(port, addr);
                    }
                    Err(e) => {
                        eprintln!("graft: cannot take the target's port {port}: {e}");
                        warned.insert(port, e.to_string());
                    }
                }
            }
            tokio::time::sleep(POLL).await;
        }
    };
    tokio::select! {
        () = deliver => {}
        () = watch => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_sockets_of_both_tables() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
   2: 0100007F:9C40 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 20 4 30 10 -1
";
        assert_eq!(
            graft_proc::parse_tcp_listeners(tcp),
            vec![
                "127.0.0.1:8080".parse::<SocketAddr>().unwrap(),
                "0.0.0.0:80".parse().unwrap()
            ]
        );
        let tcp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4 1 0 100 0 0 10 0
   1: 00000000000000000000000001000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5 1 0 100 0 0 10 0
";
        assert_eq!(
            graft_proc::parse_tcp_listeners(tcp6),
            vec![
                "[::]:8080".parse::<SocketAddr>().unwrap(),
                "[::1]:22".parse().unwrap()
            ]
        );
        assert_eq!(
            connect_address("[::]:8080".parse().unwrap()),
            "[::1]:8080".parse().unwrap()
        );
        assert_eq!(
            connect_address("0.0.0.0:80".parse().unwrap()),
            "127.0.0.1:80".parse().unwrap()
        );
        assert!(
            graft_proc::parse_tcp_listeners("header\n garbage line\n 0: zz:zz 0 0A\n").is_empty()
        );
    }
}
