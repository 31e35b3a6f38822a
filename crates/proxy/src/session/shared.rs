//! The state a session's tasks share ([`Shared`]): pending requests, steals and
//! connects, each connection's event channel, and the dispatch of every
//! [`AgentMessage`] to whoever waits for it; and the link's tasks that move frames
//! (`read_loop`, `write_loop`), ping the agent (`keepalive`) and unsteal the ports
//! of exited owners (`check_owners`).

use std::os::fd::OwnedFd;

use graft_protocol::{fdpass::FdQueues, remote::RemoteError};

use super::*;
/// Locks `mutex`, recovering the data after a panic elsewhere: every critical
/// section in this crate leaves the state consistent before it can panic.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a connection's task hears from the link.
#[derive(Debug)]
pub(crate) enum ConnEvent {
    /// Bytes (TCP) or one datagram (UDP) from the target side.
    Data(Vec<u8>),
    /// The target side sent FIN.
    Shutdown,
    /// The target side is gone.
    Close {
        /// With an RST or error.
        reset: bool,
    },
    /// The agent wrote this many more bytes to its socket (flow control).
    Credit(u32),
}

/// The owner "process" of a subscription made through the public API
/// ([`Session::steal`]): never pruned by `check_owners`.
pub(crate) const API_OWNER: u32 = 0;

/// The receiving end of a connection's events; closed when the link ends.
pub(crate) type ConnEvents = mpsc::UnboundedReceiver<ConnEvent>;

/// A subscription to a stolen port.
///
/// Starts `Pending` when the first `Listen` sends `Steal`; becomes `Active` on a
/// successful `StealResult` or is removed on a failed one. An `Active` one is
/// removed by `Unlisten` from its owner or when the owner process is gone.
#[derive(Debug)]
pub(super) struct Subscription {
    pub(super) deliver_to: Delivery,
    pub(super) pid: u32,
    pub(super) state: StealState,
}

/// Whether the program behind a [`Delivery::Listener`] takes stolen
/// connections as their sockets: a layer that passes descriptors accepts
/// there (`super::passed`); any other program gets relayed connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Accepts {
    /// Only the proxy's relayed connections (a program without the layer).
    Relayed,
    /// The target's sockets too (the layer's `accept` takes them).
    Sockets,
}

#[derive(Debug)]
pub(super) enum StealState {
    /// `Steal` sent; these `Listen`s wait for the agent's answer.
    Pending(Vec<oneshot::Sender<Result<(), SubscribeError>>>),
    /// The agent steals the port.
    Active,
}

/// Everything the link's tasks and the layer connections share.
#[derive(Default)]
pub(super) struct State {
    /// Set once, when the link ends; nothing is registered after that.
    pub(super) ended: Option<LinkEnd>,
    /// Pending requests; the answer of an `OpenFd` comes with its descriptor.
    pub(super) requests: HashMap<RequestId, oneshot::Sender<(RemoteResponse, Option<OwnedFd>)>>,
    pub(super) connects: HashMap<ConnectionId, oneshot::Sender<Result<SocketAddr, i32>>>,
    pub(super) conns: HashMap<ConnectionId, mpsc::UnboundedSender<ConnEvent>>,
    pub(super) steals: HashMap<u16, Subscription>,
    /// Proxy-side local address of each delivered stolen connection → its real
    /// addresses, for `PeerOf`.
    pub(super) delivered: HashMap<SocketAddr, DeliveredPeer>,
}

/// The state and the outbox, shared by the link's tasks, the layer connections and
/// the connection tasks.
pub(crate) struct Shared {
    outbox: mpsc::Sender<ClientMessage>,
    state: Mutex<State>,
    next_request: AtomicU64,
    next_conn: AtomicU64,
    pub(super) end_tx: watch::Sender<Option<LinkEnd>>,
    pub(crate) options: SessionOptions,
    /// Sessions with agents on other pods of the same workload (`--all-pods`):
    /// every port this session subscribes is subscribed there too, delivered to
    /// the same local listener.
    pub(super) secondaries: Mutex<Vec<Arc<Shared>>>,
    /// The target's ports whose subscription the agent refused, in order.
    pub(super) refused: Mutex<Vec<u16>>,
    /// The target's ports whose steal or mirror was announced on stderr: once
    /// per port, also when CMD closes its listener and listens again.
    pub(super) announced: Mutex<Vec<u16>>,
    /// The link's descriptor queues when the agent passes descriptors.
    pub(super) fds: Option<Arc<FdQueues>>,
    /// Stolen connections the agent passed as sockets, by the proxy-side
    /// address of their loopback delivery, until the layer claims them
    /// (`super::passed`).
    pub(super) passed: Mutex<HashMap<SocketAddr, super::passed::Passed>>,
    /// The next arrival number of a passed stolen connection.
    pub(super) passed_serial: std::sync::atomic::AtomicU64,
    /// The agent takes `ClientMessage::DirectAttached` (both peers named
    /// [`graft_protocol::version::FEATURE_DIRECT`]).
    pub(super) direct: std::sync::atomic::AtomicBool,
    /// The direct listeners the agent passed, by stolen port (`super::direct`).
    /// IPv4 first, then IPv6 when the port has one.
    pub(super) direct_listeners: Mutex<HashMap<u16, Vec<std::os::fd::OwnedFd>>>,
    /// The last `seq` of a `ClientMessage::PauseDirect`.
    pub(super) pause_seq: std::sync::atomic::AtomicU64,
    /// The last `seq` the agent answered (`AgentMessage::DirectPaused`).
    pub(super) pause_acked: watch::Sender<u64>,
}

impl Shared {
    /// The state of a new link whose frames leave through `outbox`.
    pub(super) fn new(
        outbox: mpsc::Sender<ClientMessage>,
        end_tx: watch::Sender<Option<LinkEnd>>,
        options: SessionOptions,
        fds: Option<Arc<FdQueues>>,
    ) -> Shared {
        Shared {
            outbox,
            state: Mutex::new(State::default()),
            next_request: AtomicU64::new(1),
            next_conn: AtomicU64::new(1),
            end_tx,
            options,
            secondaries: Mutex::new(Vec::new()),
            refused: Mutex::new(Vec::new()),
            announced: Mutex::new(Vec::new()),
            fds,
            passed: Mutex::new(HashMap::new()),
            passed_serial: std::sync::atomic::AtomicU64::new(0),
            direct: std::sync::atomic::AtomicBool::new(false),
            direct_listeners: Mutex::new(HashMap::new()),
            pause_seq: std::sync::atomic::AtomicU64::new(0),
            pause_acked: watch::channel(0).0,
        }
    }

    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// The error for an operation attempted on an ended link.
    pub(crate) fn gone(&self) -> ProxyError {
        ProxyError::LinkClosed(self.state().ended.clone().unwrap_or(LinkEnd::Closed))
    }

    /// Queues `message` for the agent.
    ///
    /// # Errors
    ///
    /// [`ProxyError::LinkClosed`] when the link has ended.
    pub(crate) async fn send(&self, message: ClientMessage) -> Result<(), ProxyError> {
        if self.state().ended.is_some() {
            return Err(self.gone());
        }
        self.outbox.send(message).await.map_err(|_| self.gone())
    }

    /// Ends the link with `reason` (the first reason wins) and fails everything
    /// that waits on it.
    pub(crate) fn end(&self, reason: LinkEnd) {
        let dropped = {
            let mut state = self.state();
            if state.ended.is_some() {
                return;
            }
            tracing::debug!(%reason, "link ended");
            // Taken out and dropped outside the lock: waiters wake with errors,
            // connection tasks see their channels close and reset their sockets.
            let dropped = std::mem::take(&mut *state);
            state.ended = Some(reason.clone());
            dropped
        };
        // Published before the connections are reset: a program that ends
        // because its connection was reset must find the link already ended
        // (`Session::link_end`), or its exit would pass for the session's end.
        self.end_tx.send_replace(Some(reason));
        drop(dropped);
    }

    /// Sends a remote operation and waits for its answer.
    pub(crate) async fn request(
        &self,
        request: RemoteRequest,
    ) -> Result<RemoteResponse, ProxyError> {
        Ok(self.request_fd(request).await?.0)
    }

    /// Whether the agent passes descriptors on this link (a local agent that
    /// named [`graft_protocol::version::FEATURE_FDS`] in its `Hello`).
    pub(crate) fn passes_fds(&self) -> bool {
        self.fds.is_some()
    }

    /// Sends a remote operation and waits for its answer and, for
    /// [`RemoteResponse::FdOpened`], the descriptor that came with it.
    pub(crate) async fn request_fd(
        &self,
        request: RemoteRequest,
    ) -> Result<(RemoteResponse, Option<OwnedFd>), ProxyError> {
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut state = self.state();
            if state.ended.is_some() {
                drop(state);
                return Err(self.gone());
            }
            state.requests.insert(id, tx);
        }
        if let Err(e) = self.send(ClientMessage::Request { id, request }).await {
            self.state().requests.remove(&id);
            return Err(e);
        }
        rx.await.map_err(|_| self.gone())
    }

    /// Opens an outgoing connection from the target. On success: its id, the
    /// target-side local address, and its event channel (registered before the
    /// `Connect` left, so no early byte is lost).
    ///
    /// The error is an `errno` for the layer.
    pub(crate) async fn open(
        &self,
        remote: SocketAddr,
        transport: Transport,
    ) -> Result<(ConnectionId, SocketAddr, ConnEvents), (i32, String)> {
        let conn =
            ConnectionId(self.next_conn.fetch_add(1, Ordering::Relaxed) & !ConnectionId::AGENT_BIT);
        let (tx, rx) = oneshot::channel();
        let events = {
            let mut state = self.state();
            if let Some(reason) = &state.ended {
                return Err(aborted(reason));
            }
            state.connects.insert(conn, tx);
            let (events_tx, events) = mpsc::unbounded_channel();
            state.conns.insert(conn, events_tx);
            events
        };
        let sent = self
            .send(ClientMessage::Connect {
                conn,
                remote,
                transport,
            })
            .await;
        let outcome = match sent {
            Ok(()) => rx.await.ok(),
            Err(_) => None,
        };
        match outcome {
            Some(Ok(local)) => Ok((conn, local, events)),
            Some(Err(errno)) => {
                self.forget(conn);
                Err((
                    errno,
                    format!(
                        "connecting to {remote} from the target failed: {}",
                        std::io::Error::from_raw_os_error(errno)
                    ),
                ))
            }
            None => {
                let mut state = self.state();
                state.connects.remove(&conn);
                state.conns.remove(&conn);
                Err(aborted(state.ended.as_ref().unwrap_or(&LinkEnd::Closed)))
            }
        }
    }

    /// Queues `Close` for `conn` without waiting (for `Drop`): when the outbox is
    /// full, a task sends it once there is room.
    pub(crate) fn close_soon(self: &Arc<Self>, conn: ConnectionId, reset: bool) {
        let message = ClientMessage::Close { conn, reset };
        if let Err(mpsc::error::TrySendError::Full(message)) = self.outbox.try_send(message)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let shared = self.clone();
            runtime.spawn(async move {
                let _ = shared.send(message).await;
            });
        }
    }

    /// Forgets a connection: later frames about it are dropped.
    pub(crate) fn forget(&self, conn: ConnectionId) {
        self.state().conns.remove(&conn);
    }

    /// Handles one message from the agent.
    fn dispatch(self: &Arc<Self>, message: AgentMessage) {
        match message {
            AgentMessage::Response { id, response } => {
                // Claimed even when nobody waits any more, to keep the queue in step.
                let (response, fd) = match response {
                    RemoteResponse::FdOpened { .. } | RemoteResponse::FdConnected => {
                        match self.fds.as_ref().and_then(|q| q.pop_incoming()) {
                            Some(fd) => (response, Some(fd)),
                            None => {
                                tracing::warn!(
                                    id,
                                    "the agent announced a descriptor it did not pass"
                                );
                                let missing = RemoteError::Other(
                                    "the agent announced a descriptor it did not pass".into(),
                                );
                                (RemoteResponse::Error(missing), None)
                            }
                        }
                    }
                    other => (other, None),
                };
                match self.state().requests.remove(&id) {
                    Some(waiter) => {
                        let _ = waiter.send((response, fd));
                    }
                    None => tracing::debug!(id, "response to a forgotten request"),
                }
            }
            AgentMessage::SubscribeResult { port, error } => self.steal_result(port, error),
            AgentMessage::Connected { conn, local } => {
                if let Some(waiter) = self.state().connects.remove(&conn) {
                    let _ = waiter.send(Ok(local));
                }
            }
            AgentMessage::ConnectFailed { conn, errno } => {
                if let Some(waiter) = self.state().connects.remove(&conn) {
                    let _ = waiter.send(Err(errno));
                }
            }
            AgentMessage::Incoming {
                conn,
                port,
                peer,
                local,
            } => {
                self.incoming(conn, port, DeliveredPeer { peer, local });
            }
            AgentMessage::Data { conn, bytes } => self.to_conn(conn, ConnEvent::Data(bytes)),
            AgentMessage::Shutdown { conn } => self.to_conn(conn, ConnEvent::Shutdown),
            AgentMessage::Credit { conn, bytes } => self.to_conn(conn, ConnEvent::Credit(bytes)),
            AgentMessage::Close { conn, reset } => {
                if let Some(events) = self.state().conns.remove(&conn) {
                    let _ = events.send(ConnEvent::Close { reset });
                }
            }
            AgentMessage::Pong(_) => {}
            AgentMessage::Fatal { message } => self.end(LinkEnd::Fatal(message)),
            AgentMessage::Hello(_) => tracing::warn!("the agent sent a second Hello; ignored"),
            AgentMessage::IncomingFd { port, peer, local } => {
                match self.fds.as_ref().and_then(|q| q.pop_incoming()) {
                    Some(fd) => self.incoming_fd(port, DeliveredPeer { peer, local }, fd),
                    None => tracing::warn!(
                        port,
                        "the agent announced a stolen connection's socket it did not pass"
                    ),
                }
            }
            AgentMessage::DirectListener { port } => {
                match self.fds.as_ref().and_then(|q| q.pop_incoming()) {
                    Some(fd) => self.keep_direct(port, fd),
                    None => tracing::warn!(
                        port,
                        "the agent announced a direct listener it did not pass"
                    ),
                }
            }
            AgentMessage::DirectListener6 { port } => {
                match self.fds.as_ref().and_then(|q| q.pop_incoming()) {
                    Some(fd) => self.keep_direct6(port, fd),
                    None => tracing::warn!(
                        port,
                        "the agent announced an IPv6 direct listener it did not pass"
                    ),
                }
            }
            AgentMessage::DirectPaused { seq } => {
                self.pause_acked
                    .send_modify(|acked| *acked = (*acked).max(seq));
            }
            AgentMessage::Routed(record) => {
                if let Some(tap) = &self.options.incoming_tap {
                    tap.routed(*record);
                }
            }
        }
    }

    fn to_conn(&self, conn: ConnectionId, event: ConnEvent) {
        if let Some(events) = self.state().conns.get(&conn) {
            // A closed receiver means the task is finishing; the frame is moot.
            let _ = events.send(event);
        }
    }

    fn steal_result(self: &Arc<Self>, port: u16, error: Option<SubscribeError>) {
        let (waiters, deliver_to) = {
            let mut state = self.state();
            let Some(sub) = state.steals.get_mut(&port) else {
                tracing::debug!(port, "steal result for a port nobody listens on");
                return;
            };
            let deliver_to = sub.deliver_to.clone();
            let waiters = match std::mem::replace(&mut sub.state, StealState::Active) {
                StealState::Pending(waiters) => waiters,
                StealState::Active => Vec::new(),
            };
            if error.is_some() {
                state.steals.remove(&port);
            }
            (waiters, deliver_to)
        };
        match &error {
            None => {
                if self.options.announce_steals && self.first_announcement(port) {
                    let what = match (self.options.incoming_mode, &self.options.filter) {
                        (IncomingMode::Steal, None) => "stealing".to_owned(),
                        (IncomingMode::Mirror, None) => "mirroring".to_owned(),
                        (IncomingMode::Steal, Some(f)) => format!("stealing requests ({f}) on"),
                        (IncomingMode::Mirror, Some(f)) => {
                            format!("mirroring requests ({f}) on")
                        }
                    };
                    let default = if self.options.incoming_defaulted {
                        " (the default: the target keeps answering, CMD gets a copy; --steal \
                         takes the traffic instead)"
                    } else {
                        ""
                    };
                    eprintln!("graft: {what} port {port} of the target → {deliver_to}{default}");
                    let asked = self
                        .options
                        .port_map
                        .iter()
                        .find(|(_, remote)| *remote == port)
                        .map_or(port, |(local, _)| *local);
                    if let Delivery::Listener(local) = &deliver_to
                        && local.port() != asked
                    {
                        eprintln!(
                            "graft: warning: port {asked} is busy on this machine (another \
                             program listens there), so CMD listens on port {} instead: the \
                             target's port {port} comes to CMD, but connections to port \
                             {asked} on this machine reach the other program",
                            local.port()
                        );
                    }
                    if let (IncomingMode::Steal, Some(mine)) =
                        (self.options.incoming_mode, self.options.filter.clone())
                    {
                        self.warn_overlaps(port, mine);
                    }
                }
            }
            Some(message) => {
                if self.options.announce_steals {
                    eprintln!("graft: port {port}: {message}");
                }
                // Said above in graft's words; the log has it for GRAFT_LOG.
                tracing::debug!(port, %message, "the agent refused the subscription");
                let mut refused = lock(&self.refused);
                if !refused.contains(&port) {
                    refused.push(port);
                }
            }
        }
        for waiter in waiters {
            let _ = waiter.send(match &error {
                None => Ok(()),
                Some(message) => Err(message.clone()),
            });
        }
    }

    /// Whether `port` is announced now for the first time (and notes it).
    fn first_announcement(&self, port: u16) -> bool {
        let mut announced = lock(&self.announced);
        if announced.contains(&port) {
            return false;
        }
        announced.push(port);
        true
    }

    /// Says which older sessions win the requests that their filters and `mine`
    /// both match on `port` (see [`crate::overlap`]).
    fn warn_overlaps(self: &Arc<Self>, port: u16, mine: HttpFilterSpec) {
        let this = self.clone();
        tokio::spawn(async move {
            if let Ok(RemoteResponse::Sessions(listing)) =
                this.request(RemoteRequest::Sessions).await
                && let Some(text) = crate::overlap::notice(port, &mine, &listing)
            {
                eprintln!("graft: warning: {text}");
            }
        });
    }

    fn incoming(self: &Arc<Self>, conn: ConnectionId, port: u16, peer: DeliveredPeer) {
        let registered = {
            let mut state = self.state();
            let target = state
                .steals
                .get(&port)
                .filter(|sub| matches!(sub.state, StealState::Active))
                .map(|sub| sub.deliver_to.clone());
            target.map(|target| {
                let (events_tx, events) = mpsc::unbounded_channel();
                state.conns.insert(conn, events_tx);
                (target, events)
            })
        };
        match registered {
            Some((Delivery::Listener(target), events)) => {
                let target = delivery_address(target);
                if let Some(tapped) = &self.options.tapped_listeners {
                    let incoming = flows::incoming(self.clone(), conn, port, peer, events);
                    if let Err(e) = tapped.try_send((incoming, target)) {
                        tracing::info!(%conn, port, error = %e, "the shadow diff takes no more connections; reset");
                    }
                } else {
                    tokio::spawn(splice::deliver(self.clone(), conn, target, peer, events));
                }
            }
            Some((Delivery::Channel(deliveries), events)) => {
                let incoming = flows::incoming(self.clone(), conn, port, peer, events);
                // A full or closed channel drops the connection, which resets it.
                if let Err(e) = deliveries.try_send(incoming) {
                    tracing::info!(%conn, port, error = %e, "the caller takes no more incoming connections; reset");
                }
            }
            None => {
                tracing::info!(%conn, port, "incoming connection for a port nobody listens on; reset");
                let shared = self.clone();
                tokio::spawn(async move {
                    let _ = shared
                        .send(ClientMessage::Close { conn, reset: true })
                        .await;
                });
            }
        }
    }
}

/// Where to connect to reach a listener bound to `addr`: an unspecified address
/// is reached on loopback of the same family.
pub(crate) fn delivery_address(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

/// The layer's error for a request that the ended link aborted.
pub(super) fn aborted(reason: &LinkEnd) -> (i32, String) {
    (
        libc::ECONNABORTED,
        format!("the link to the agent is gone: {reason}"),
    )
}

/// The `errno` for a refused steal: `EADDRINUSE` when the port is taken (another
/// session steals it), else `EACCES` (the agent may not install the rule).
pub(super) fn steal_errno(error: &SubscribeError) -> i32 {
    if error.is_port_in_use() {
        libc::EADDRINUSE
    } else {
        libc::EACCES
    }
}

pub(super) fn message_name(message: &AgentMessage) -> &'static str {
    match message {
        AgentMessage::Hello(_) => "Hello",
        AgentMessage::Response { .. } => "Response",
        AgentMessage::SubscribeResult { .. } => "SubscribeResult",
        AgentMessage::Connected { .. } => "Connected",
        AgentMessage::ConnectFailed { .. } => "ConnectFailed",
        AgentMessage::Incoming { .. } => "Incoming",
        AgentMessage::IncomingFd { .. } => "IncomingFd",
        AgentMessage::DirectListener { .. } => "DirectListener",
        AgentMessage::DirectPaused { .. } => "DirectPaused",
        AgentMessage::DirectListener6 { .. } => "DirectListener6",
        AgentMessage::Data { .. } => "Data",
        AgentMessage::Credit { .. } => "Credit",
        AgentMessage::Shutdown { .. } => "Shutdown",
        AgentMessage::Close { .. } => "Close",
        AgentMessage::Pong(_) => "Pong",
        AgentMessage::Fatal { .. } => "Fatal",
        AgentMessage::Routed(_) => "Routed",
    }
}

pub(super) async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: FramedRead<R, LinkCodec>,
    shared: Arc<Shared>,
) {
    let dead_after = shared.options.dead_after;
    let reason = loop {
        match tokio::time::timeout(dead_after, reader.next()).await {
            Err(_) => break LinkEnd::Timeout(dead_after),
            Ok(None) => break LinkEnd::AgentClosed,
            Ok(Some(Err(e))) if e.is_closed() => break LinkEnd::AgentClosed,
            Ok(Some(Err(e))) => break LinkEnd::Broken(e.to_string()),
            Ok(Some(Ok(message))) => shared.dispatch(message),
        }
    };
    shared.end(reason);
}

pub(super) async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: FramedWrite<W, LinkCodec>,
    mut outbox: mpsc::Receiver<ClientMessage>,
    shared: Arc<Shared>,
) {
    let mut end = shared.end_tx.subscribe();
    loop {
        tokio::select! {
            biased;
            () = async { let _ = end.wait_for(Option::is_some).await; } => break,
            message = outbox.recv() => {
                let Some(message) = message else { break };
                let mut result = writer.feed(message).await;
                // Batch what is already queued into one flush.
                while result.is_ok() {
                    match outbox.try_recv() {
                        Ok(message) => result = writer.feed(message).await,
                        Err(_) => break,
                    }
                }
                if let Err(e) = result.and(writer.flush().await) {
                    shared.end(LinkEnd::Broken(e.to_string()));
                    return;
                }
            }
        }
    }
    // Send what was queued before the end, then shut the write side so the agent
    // sees the link close at once. Bounded: the link may be dead.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Ok(message) = outbox.try_recv() {
            writer.feed(message).await?;
        }
        writer.close().await
    })
    .await;
}

pub(super) async fn keepalive(shared: Arc<Shared>) {
    let mut ticks = tokio::time::interval(shared.options.ping_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    for n in 1u64.. {
        ticks.tick().await;
        if shared.send(ClientMessage::Ping(n)).await.is_err() {
            return;
        }
    }
}

/// Unsteals ports whose owner process is gone (it exited without closing its
/// listener, or was killed).
pub(super) async fn check_owners(shared: Arc<Shared>) {
    let mut ticks = tokio::time::interval(shared.options.owner_check_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let dead: Vec<u16> = {
            let mut state = shared.state();
            if state.ended.is_some() {
                return;
            }
            let dead: Vec<u16> = state
                .steals
                .iter()
                .filter(|(_, sub)| {
                    matches!(sub.state, StealState::Active)
                        && sub.pid != API_OWNER
                        && !graft_proc::exists(sub.pid)
                })
                .map(|(port, _)| *port)
                .collect();
            for port in &dead {
                state.steals.remove(port);
            }
            dead
        };
        for port in dead {
            tracing::info!(port, "unstealing port: its owner process is gone");
            if shared
                .send(ClientMessage::Unsubscribe { port })
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_delivery_goes_to_loopback() {
        assert_eq!(
            delivery_address("0.0.0.0:80".parse().unwrap()),
            "127.0.0.1:80".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            delivery_address("[::]:80".parse().unwrap()),
            "[::1]:80".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            delivery_address("10.1.2.3:80".parse().unwrap()),
            "10.1.2.3:80".parse::<SocketAddr>().unwrap()
        );
    }

    #[test]
    fn steal_errors_map_to_errno() {
        let in_use = SubscribeError::PortInUse {
            port: 80,
            holder: "alice@laptop".into(),
            since_unix: 0,
        };
        assert_eq!(steal_errno(&in_use), libc::EADDRINUSE);
        assert_eq!(
            steal_errno(&SubscribeError::Lost {
                cause: Box::new(in_use)
            }),
            libc::EADDRINUSE
        );
        assert_eq!(
            steal_errno(&SubscribeError::Redirect {
                reason: "iptables failed: permission denied".into()
            }),
            libc::EACCES
        );
    }
}
