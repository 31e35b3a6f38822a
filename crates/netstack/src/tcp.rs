//! TCP through the stack: the gate that holds each new connection's SYN until the
//! upstream connect is done, and the program's side of a connection ([`TcpFlow`]).
//!
//! The stack (smoltcp) answers a SYN at once, so graft does not hand it the SYN
//! first: [`Gate::syn`] opens the upstream connection, then passes the SYN on
//! (the program's `connect` completes), or writes an RST back (the program's
//! `connect` fails with `ECONNREFUSED`, as if the remote had refused, whatever the
//! remote's error was). SYNs the program's kernel retransmits are dropped, then
//! and later: the stack sees one SYN a connection. [`accept`] pairs each connection the stack then accepts with its
//! upstream and splices them.

use std::{
    collections::{HashMap, hash_map::Entry},
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use futures::StreamExt;
use graft_proxy::LocalStream;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::mpsc,
    task::JoinSet,
};

use crate::{
    Shared,
    packet::{self, TcpMeta},
    upstream::TcpRelay,
};

/// Upstream connects in flight at once; SYNs past this are refused.
pub(crate) const MAX_PENDING_CONNECTS: usize = 1024;

/// A connection's key: (program side, remote side).
type Tuple = (SocketAddr, SocketAddr);

/// Where a connection's SYN is.
enum Gated {
    /// The upstream connect is in flight; retransmitted SYNs are dropped.
    Connecting,
    /// The SYN went to the stack with this relay (taken when the stack accepts).
    Open(Option<Relay>),
}

/// What serves a connection the stack accepted.
pub(crate) enum Relay {
    /// An upstream connection.
    Upstream(TcpRelay),
    /// graft's own resolver (DNS over TCP).
    Dns,
}

/// Holds SYNs until their connection is open upstream.
pub(crate) struct Gate {
    shared: Arc<Shared>,
    conns: Mutex<HashMap<Tuple, Gated>>,
}

impl Gate {
    pub(crate) fn new(shared: Arc<Shared>) -> Arc<Gate> {
        Arc::new(Gate {
            shared,
            conns: Mutex::new(HashMap::new()),
        })
    }

    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<Tuple, Gated>> {
        self.conns.lock().expect("no panic while the lock is held")
    }

    /// Handles a SYN (without ACK) from the program: returns it when it can go to
    /// the stack now, `None` when it is held or dropped.
    pub(crate) fn syn(self: &Arc<Self>, meta: TcpMeta, packet: Vec<u8>) -> Option<Vec<u8>> {
        let tuple = (meta.src, meta.dst);
        let mut conns = self.conns();
        let pending = conns
            .values()
            .filter(|g| matches!(g, Gated::Connecting))
            .count();
        match conns.entry(tuple) {
            // A SYN again (the program's kernel retransmits it after 1 s): while
            // connecting, the stack must not see it yet; once open, the stack
            // already has the connection's socket, which answers with its own
            // SYN-ACK retransmissions. Handing the stack a second SYN would make
            // it a second listening socket for the same endpoint, which can
            // take this connection's or another's packets from the socket graft
            // relays, and the program then waits for an answer forever.
            Entry::Occupied(_) => None,
            Entry::Vacant(entry) => {
                if self.shared.is_dns(meta.dst) {
                    entry.insert(Gated::Open(Some(Relay::Dns)));
                    return Some(packet);
                }
                if self.shared.is_dns_address(meta.dst.ip()) || pending >= MAX_PENDING_CONNECTS {
                    drop(conns);
                    self.refuse(&meta);
                    return None;
                }
                entry.insert(Gated::Connecting);
                drop(conns);
                let gate = self.clone();
                tokio::spawn(async move { gate.connect(meta, packet).await });
                None
            }
        }
    }

    async fn connect(self: Arc<Self>, meta: TcpMeta, packet: Vec<u8>) {
        let tuple = (meta.src, meta.dst);
        let upstream = self
            .shared
            .upstream_for(&meta.dst, graft_protocol::Transport::Tcp);
        match upstream.connect_tcp(meta.dst).await {
            Ok(relay) => {
                tracing::debug!(program = %meta.src, remote = %meta.dst, "connected");
                self.conns()
                    .insert(tuple, Gated::Open(Some(Relay::Upstream(relay))));
                if self.shared.to_stack.send(packet).await.is_err() {
                    self.conns().remove(&tuple);
                }
            }
            Err(e) => {
                tracing::debug!(program = %meta.src, remote = %meta.dst, error = %e, "connect failed; refusing");
                self.conns().remove(&tuple);
                self.refuse(&meta);
            }
        }
    }

    fn refuse(&self, syn: &TcpMeta) {
        if let Some(rst) = packet::refuse(syn) {
            let _ = self.shared.raw_tx.try_send(rst);
        }
    }

    /// The relay of a connection the stack accepted.
    fn take(&self, tuple: Tuple) -> Option<Relay> {
        match self.conns().get_mut(&tuple) {
            Some(Gated::Open(relay)) => relay.take(),
            _ => None,
        }
    }

    /// Forgets a connection that ended.
    fn forget(&self, tuple: Tuple) {
        self.conns().remove(&tuple);
    }
}

/// Pairs each connection the stack accepts with its relay and runs it; the
/// connections' tasks end when this future is dropped.
pub(crate) async fn accept(
    gate: Arc<Gate>,
    mut listener: netstack_smoltcp::TcpListener,
    dns: mpsc::Sender<TcpFlow>,
) {
    let mut flows = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.next() => {
                let Some((stream, program, remote)) = accepted else { break };
                let flow = TcpFlow {
                    inner: stream,
                    program,
                    remote,
                    shut: false,
                    gate: gate.clone(),
                };
                match gate.take((program, remote)) {
                    Some(Relay::Upstream(relay)) => {
                        flows.spawn(relay(flow));
                    }
                    Some(Relay::Dns) => {
                        let _ = dns.try_send(flow);
                    }
                    // Not a connection the gate opened (the gate passes one SYN
                    // a connection): dropping closes it.
                    None => {}
                }
            }
            Some(_) = flows.join_next(), if !flows.is_empty() => {}
        }
    }
}

/// The program's side of one TCP connection through the stack: bytes the program
/// sent come out of `read`, bytes written go to the program.
pub struct TcpFlow {
    inner: netstack_smoltcp::TcpStream,
    program: SocketAddr,
    remote: SocketAddr,
    shut: bool,
    gate: Arc<Gate>,
}

impl std::fmt::Debug for TcpFlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpFlow")
            .field("program", &self.program)
            .field("remote", &self.remote)
            .finish()
    }
}

impl TcpFlow {
    /// The program's address (its socket's local address in its namespace).
    pub fn program_addr(&self) -> SocketAddr {
        self.program
    }

    /// The address the program connected to.
    pub fn remote_addr(&self) -> SocketAddr {
        self.remote
    }
}

impl AsyncRead for TcpFlow {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TcpFlow {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    /// Half-closes: the stack sends its FIN once the bytes written before are out.
    /// Unlike the stack's own `shutdown`, which waits until the whole connection
    /// is closed, this returns at once, as `shutdown(SHUT_WR)` does.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shut {
            self.shut = true;
            if let Poll::Ready(Err(e)) = Pin::new(&mut self.inner).poll_shutdown(cx) {
                return Poll::Ready(Err(e));
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl LocalStream for TcpFlow {
    /// Sends the program an RST with the next sequence number it expects, so its
    /// socket fails with `ECONNRESET` instead of seeing a clean end of stream.
    fn abort(&mut self) {
        let sequences = &self.gate.shared.sequences;
        if let Some(rst) = sequences.abort(self.remote, self.program) {
            let _ = self.gate.shared.raw_tx.try_send(rst);
        }
    }
}

impl Drop for TcpFlow {
    fn drop(&mut self) {
        self.gate.shared.sequences.forget(self.remote, self.program);
        self.gate.forget((self.program, self.remote));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use graft_protocol::remote::AddressFamily;
    use tokio::sync::{Notify, mpsc};

    use super::*;
    use crate::{
        NetstackOptions,
        upstream::{BoxFuture, Resolved, UdpRelay, Upstream},
    };

    /// Connects every TCP flow once `open` is notified.
    struct Held {
        open: Arc<Notify>,
    }

    impl Upstream for Held {
        fn connect_tcp(&self, _: SocketAddr) -> BoxFuture<'_, io::Result<TcpRelay>> {
            Box::pin(async move {
                self.open.notified().await;
                let relay: TcpRelay = Box::new(|_flow| Box::pin(async {}));
                Ok(relay)
            })
        }
        fn connect_udp(&self, _: SocketAddr) -> BoxFuture<'_, io::Result<UdpRelay>> {
            Box::pin(async { Err(io::ErrorKind::ConnectionRefused.into()) })
        }
        fn resolve(&self, _: String, _: AddressFamily) -> BoxFuture<'_, Resolved> {
            Box::pin(async { Resolved::TryAgain })
        }
    }

    /// A retransmitted SYN never reaches the stack, while the connect is in
    /// flight or after: a second SYN would give smoltcp a second listening socket
    /// for the endpoint, which can take the program's packets (seen in CI as a
    /// static program's threads waiting forever for their echo).
    #[tokio::test]
    async fn the_stack_sees_one_syn_a_connection() {
        let open = Arc::new(Notify::new());
        let (to_stack, mut stack) = mpsc::channel(8);
        let (raw_tx, _raw) = mpsc::channel(8);
        let upstream: Arc<dyn Upstream> = Arc::new(Held { open: open.clone() });
        let gate = Gate::new(Arc::new(Shared {
            options: NetstackOptions::default(),
            target: upstream.clone(),
            local: upstream,
            to_stack,
            raw_tx,
            sequences: packet::Sequences::default(),
            names: Arc::default(),
        }));
        let syn = TcpMeta {
            src: "10.0.0.2:40000".parse().unwrap(),
            dst: "192.0.2.1:7".parse().unwrap(),
            syn: true,
            ack: false,
            rst: false,
            fin: false,
            seq: 1000,
            ack_number: 0,
            len: 0,
        };
        assert_eq!(gate.syn(syn, b"first".to_vec()), None);
        assert_eq!(gate.syn(syn, b"while connecting".to_vec()), None);
        open.notify_one();
        let passed = tokio::time::timeout(Duration::from_secs(5), stack.recv())
            .await
            .expect("the SYN reaches the stack once the connect is done");
        assert_eq!(passed.as_deref(), Some(&b"first"[..]));
        assert_eq!(gate.syn(syn, b"after".to_vec()), None);
        assert!(stack.try_recv().is_err(), "one SYN reached the stack");
        // Once the connection is over, the tuple may be used again.
        gate.forget((syn.src, syn.dst));
        assert_eq!(gate.syn(syn, b"again".to_vec()), None);
        open.notify_one();
        let again = tokio::time::timeout(Duration::from_secs(5), stack.recv()).await;
        assert_eq!(again.unwrap().as_deref(), Some(&b"again"[..]));
    }
}
