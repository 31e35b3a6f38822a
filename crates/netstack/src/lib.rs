//! A user-space TCP/IP stack behind a tun device, for the front ends that reach a
//! program without the LD_PRELOAD layer (`graft run --isolate`, `graft connect`):
//! every TCP connection and UDP flow a program sends into the tun leaves from
//! graft's target through the proxy's flow API, and DNS sent to the resolver
//! address is answered with the target's resolver.
//!
//! ```no_run
//! # async fn run(session: std::sync::Arc<graft_proxy::Session>) -> std::io::Result<()> {
//! use graft_netstack::{Netstack, NetstackOptions};
//!
//! let tun = tun_rs::DeviceBuilder::new().name("graft0").build_async()?;
//! let options = NetstackOptions {
//!     dns: Some("198.18.0.2".parse().unwrap()),
//!     ..NetstackOptions::default()
//! };
//! let stack = Netstack::serve(tun, session, options);
//! stack.await.expect("the stack does not panic")?;
//! # Ok(()) }
//! ```
//!
//! How a packet travels: the tun's packets are read by `ingress`, which holds each
//! new TCP connection's SYN until its upstream connect is done ([`tcp`]), and feeds
//! everything else to the stack (smoltcp, through `netstack-smoltcp`); the stack's
//! accepted TCP connections are spliced with their upstream connections
//! ([`upstream::Upstream`]), its UDP datagrams go through per-flow upstream
//! sockets ([`udp`]); `egress` writes the stack's packets, and the RSTs graft
//! makes itself, back into the tun. Which upstream a flow uses: the
//! `[outgoing]` rules ([`NetstackOptions::local`], [`NetstackOptions::remote`],
//! decided by `graft_config::outgoing::goes_remote` with the names the stack's
//! resolver answered) pick this machine's own network namespace
//! ([`upstream::LocalUpstream`]) or the target; the `[dns]` rules pick which
//! resolver answers a name. Modules: `upstream`, `tcp`, `udp`, `dns`, `packet`.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use futures::{SinkExt, StreamExt};
use graft_config::{Destination, NamePattern, OutgoingLocal, ResolvedNames};
use graft_protocol::Transport;
use graft_proxy::Session;
use tokio::{sync::mpsc, task::JoinHandle};
use tun_rs::AsyncDevice;

mod dns;
mod packet;
pub mod tcp;
mod udp;
pub mod upstream;

pub use tcp::TcpFlow;
pub use upstream::{LocalUpstream, SessionUpstream, Upstream};

/// The DNS port (RFC 1035 §4.2).
pub const DNS_PORT: u16 = 53;
/// Packets queued from the tun to the stack.
const TO_STACK_QUEUE: usize = 1024;
/// Packets graft writes itself (RSTs) queued for the tun.
const RAW_QUEUE: usize = 1024;

/// How the stack serves one tun device.
#[derive(Debug, Clone)]
pub struct NetstackOptions {
    /// The resolver address (the `nameserver` of the namespace's `resolv.conf`):
    /// DNS to its port 53, UDP and TCP, is answered by graft with the upstream's
    /// resolver; every other port of it is refused. `None`: no resolver here, DNS
    /// goes out like any other traffic.
    pub dns: Option<IpAddr>,
    /// Where DNS questions other than A and AAAA go (the target's own name
    /// server, reached through the upstream); `None` answers them NOTIMP.
    pub dns_forward: Option<SocketAddr>,
    /// Destinations connected from this machine's own network namespace instead of
    /// the target (`--outgoing-local`).
    pub local: Vec<OutgoingLocal>,
    /// When not empty, only these destinations leave from the target
    /// (`--outgoing-remote`).
    pub remote: Vec<Destination>,
    /// Names resolved by this machine's resolver (`--dns-local`).
    pub dns_local: Vec<NamePattern>,
    /// When not empty, only these names are resolved by the target
    /// (`--dns-remote`).
    pub dns_remote: Vec<NamePattern>,
    /// The tun's MTU in bytes (the largest IP packet read or written).
    pub mtu: u16,
    /// How long a UDP flow lives without a datagram either way.
    pub udp_idle: Duration,
}

impl Default for NetstackOptions {
    fn default() -> Self {
        NetstackOptions {
            dns: None,
            dns_forward: None,
            local: Vec::new(),
            remote: Vec::new(),
            dns_local: Vec::new(),
            dns_remote: Vec::new(),
            mtu: 1500,
            udp_idle: Duration::from_secs(60),
        }
    }
}

/// What the stack's tasks share.
pub(crate) struct Shared {
    options: NetstackOptions,
    target: Arc<dyn Upstream>,
    local: Arc<dyn Upstream>,
    /// Packets for the stack (SYNs released by the gate).
    to_stack: mpsc::Sender<Vec<u8>>,
    /// Packets graft writes into the tun itself.
    raw_tx: mpsc::Sender<Vec<u8>>,
    sequences: packet::Sequences,
    /// The names behind the addresses the stack's resolver answered.
    names: Arc<ResolvedNames>,
}

impl Shared {
    /// Whether `addr` is the resolver's DNS port.
    fn is_dns(&self, addr: SocketAddr) -> bool {
        addr.port() == DNS_PORT && self.is_dns_address(addr.ip())
    }

    /// Whether `ip` is the resolver's address.
    fn is_dns_address(&self, ip: IpAddr) -> bool {
        self.options.dns == Some(ip)
    }

    /// The upstream a `transport` flow to `remote` uses.
    fn upstream_for(&self, remote: &SocketAddr, transport: Transport) -> Arc<dyn Upstream> {
        let options = &self.options;
        if graft_config::outgoing::goes_remote(
            &options.local,
            &options.remote,
            remote,
            transport,
            &self.names,
        ) {
            self.target.clone()
        } else {
            self.local.clone()
        }
    }
}

/// The stack serving one tun device.
#[derive(Debug)]
pub struct Netstack;

impl Netstack {
    /// Serves `device` with flows that leave from the target of `session`.
    ///
    /// The returned task runs until the device fails or is closed, or until it is
    /// aborted; the flows it started end with it.
    ///
    /// # Errors
    ///
    /// The task ends with the I/O error of the tun device, or of the stack's setup.
    pub fn serve(
        device: AsyncDevice,
        session: Arc<Session>,
        options: NetstackOptions,
    ) -> JoinHandle<io::Result<()>> {
        Self::serve_with(device, Arc::new(SessionUpstream(session)), options)
    }

    /// [`Netstack::serve`] with any [`Upstream`] in place of a session's target.
    ///
    /// # Errors
    ///
    /// As [`Netstack::serve`].
    pub fn serve_with(
        device: AsyncDevice,
        target: Arc<dyn Upstream>,
        options: NetstackOptions,
    ) -> JoinHandle<io::Result<()>> {
        tokio::spawn(run(Arc::new(device), target, options))
    }
}

async fn run(
    device: Arc<AsyncDevice>,
    target: Arc<dyn Upstream>,
    options: NetstackOptions,
) -> io::Result<()> {
    let mtu = usize::from(options.mtu);
    let (stack, runner, udp_socket, tcp_listener) = netstack_smoltcp::StackBuilder::default()
        .enable_tcp(true)
        .enable_udp(true)
        .mtu(mtu)
        .tcp_recv_buffer_size(512 * 1024)
        .tcp_send_buffer_size(512 * 1024)
        .build()?;
    let (Some(runner), Some(udp_socket), Some(tcp_listener)) = (runner, udp_socket, tcp_listener)
    else {
        return Err(io::Error::other("the stack was built without TCP or UDP"));
    };
    let (to_stack, mut to_stack_rx) = mpsc::channel::<Vec<u8>>(TO_STACK_QUEUE);
    let (raw_tx, mut raw_rx) = mpsc::channel::<Vec<u8>>(RAW_QUEUE);
    let names = Arc::new(ResolvedNames::default());
    let shared = Arc::new(Shared {
        names: names.clone(),
        target: target.clone(),
        local: Arc::new(LocalUpstream),
        to_stack,
        raw_tx,
        sequences: packet::Sequences::default(),
        options: options.clone(),
    });
    let resolver = Arc::new(dns::Resolver {
        upstream: target,
        forward: options.dns_forward,
        local: Arc::new(LocalUpstream),
        dns_local: options.dns_local.clone(),
        dns_remote: options.dns_remote.clone(),
        names,
    });
    let gate = tcp::Gate::new(shared.clone());
    let (mut stack_sink, mut stack_stream) = stack.split();

    // The tun's packets: SYNs to the gate, the rest to the stack.
    let ingress = {
        let device = device.clone();
        let shared = shared.clone();
        let gate = gate.clone();
        async move {
            let mut buf = vec![0u8; mtu.max(1280) + 4];
            loop {
                let n = device.recv(&mut buf).await?;
                let packet = &buf[..n];
                match packet::parse(packet) {
                    packet::Carried::Tcp(meta) if meta.syn && !meta.ack && !meta.rst => {
                        if let Some(syn) = gate.syn(meta, packet.to_vec()) {
                            let _ = shared.to_stack.send(syn).await;
                        }
                    }
                    packet::Carried::Invalid => {}
                    _ => {
                        let _ = shared.to_stack.send(packet.to_vec()).await;
                    }
                }
            }
        }
    };
    // The one writer into the stack.
    let feed = async move {
        while let Some(packet) = to_stack_rx.recv().await {
            // A packet the stack rejects (malformed, filtered) is dropped.
            if stack_sink.send(packet).await.is_err() {
                tracing::trace!("the stack dropped a packet");
            }
        }
    };
    // The stack's packets and graft's own RSTs into the tun.
    let egress = {
        let device = device.clone();
        let shared = shared.clone();
        async move {
            loop {
                let packet = tokio::select! {
                    // graft's RSTs first: an aborted flow's RST is queued before
                    // the flow is dropped, and the stack then closes its socket
                    // with a FIN; a FIN that went first would give the program a
                    // clean end of stream and move the sequence number past the
                    // RST's, so the program's kernel would ignore the RST.
                    biased;
                    Some(packet) = raw_rx.recv() => packet,
                    packet = stack_stream.next() => match packet {
                        Some(Ok(packet)) => packet,
                        Some(Err(_)) => continue,
                        None => return Ok::<(), io::Error>(()),
                    },
                };
                if let packet::Carried::Tcp(meta) = packet::parse(&packet) {
                    shared.sequences.sent(&meta);
                }
                device.send(&packet).await?;
            }
        }
    };
    let (dns_tcp_tx, mut dns_tcp_rx) = mpsc::channel::<TcpFlow>(64);
    let dns_tcp = {
        let resolver = resolver.clone();
        async move {
            let mut served = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    flow = dns_tcp_rx.recv() => match flow {
                        Some(flow) => {
                            let resolver = resolver.clone();
                            served.spawn(async move { resolver.serve_tcp(flow).await });
                        }
                        None => break,
                    },
                    Some(_) = served.join_next(), if !served.is_empty() => {}
                }
            }
        }
    };
    let (udp_read, udp_write) = udp_socket.split();
    // Each part on its own task (the stack and the packet paths run in parallel);
    // when one ends, dropping the set ends the others and, with them, every flow.
    let mut parts = tokio::task::JoinSet::new();
    parts.spawn(runner);
    parts.spawn(ingress);
    parts.spawn(egress);
    parts.spawn(async move {
        feed.await;
        Ok(())
    });
    parts.spawn(async move {
        tcp::accept(gate, tcp_listener, dns_tcp_tx).await;
        Ok(())
    });
    parts.spawn(async move {
        udp::serve(shared, resolver, udp_read, udp_write).await;
        Ok(())
    });
    parts.spawn(async move {
        dns_tcp.await;
        Ok(())
    });
    match parts.join_next().await {
        Some(Ok(result)) => result,
        Some(Err(e)) => Err(io::Error::other(format!("a part of the stack failed: {e}"))),
        None => Ok(()),
    }
}
