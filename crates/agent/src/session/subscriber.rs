//! Subscriptions of one session: the task that applies `Subscribe` and
//! `Unsubscribe` in order ([`spawn_subscriber`]), and the session's end of the
//! hub ([`SessionSink`]), which takes each stolen or mirrored connection the
//! hub delivers and hands it over the link (relayed, or as its socket).

use super::*;

/// A subscription change, processed in order.
pub(super) enum SubCommand {
    /// With the TLS termination of a `SubscribeTls`.
    Subscribe(Subscription, Option<TlsTermination>),
    Unsubscribe(u16),
    /// The client is detached: take the subscriptions out of the hub.
    Suspend,
    /// The client is back: put them back.
    Resume,
    /// Put them in the hub again as they are (the session paused or resumed
    /// its direct listeners), then answer `DirectPaused` with this `seq`.
    Reapply(u64),
}

/// The next value of `attached` once it changes; never resolves without one
/// (or once its sender is gone).
pub(super) async fn attachment_change(
    attached: &mut Option<tokio::sync::watch::Receiver<bool>>,
) -> bool {
    let Some(rx) = attached else {
        return std::future::pending().await;
    };
    if rx.changed().await.is_err() {
        *attached = None;
        return std::future::pending().await;
    }
    *rx.borrow_and_update()
}

/// Starts the task that applies subscription changes one at a time, in order, and
/// answers each `Subscribe`.
pub(super) fn spawn_subscriber(
    access: Arc<Access>,
    to_link: mpsc::Sender<AgentMessage>,
) -> mpsc::UnboundedSender<SubCommand> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(command) = rx.recv().await {
            match command {
                SubCommand::Subscribe(subscription, tls) => {
                    let port = subscription.port;
                    let mode = subscription.mode;
                    let error = match tls.as_ref().map(crate::incoming::tls::TlsSetup::new) {
                        Some(Err(e)) => Some(SubscribeError::Tls {
                            reason: e.to_string(),
                        }),
                        setup => {
                            access.set_tls(port, setup.and_then(Result::ok).map(Arc::new));
                            access.subscribe(subscription).await.err()
                        }
                    };
                    drop(tls);
                    match &error {
                        None => tracing::info!(port, %mode, "subscribed"),
                        Some(e) => tracing::warn!(port, "subscription refused: {e}"),
                    }
                    let reply = AgentMessage::SubscribeResult { port, error };
                    if to_link.send(reply).await.is_err() {
                        break;
                    }
                }
                SubCommand::Unsubscribe(port) => access.unsubscribe(port).await,
                SubCommand::Suspend => access.suspend().await,
                SubCommand::Reapply(seq) => {
                    access.reapply().await;
                    if to_link
                        .send(AgentMessage::DirectPaused { seq })
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                SubCommand::Resume => {
                    // The client learns of a port it lost meanwhile as a
                    // refused subscription.
                    for (port, reason) in access.resume().await {
                        tracing::warn!(port, "could not subscribe again: {reason}");
                        let error = Some(SubscribeError::Lost {
                            cause: Box::new(reason),
                        });
                        if to_link
                            .send(AgentMessage::SubscribeResult { port, error })
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }
        }
    });
    tx
}

/// Delivers incoming connections to this session's client as `Incoming`.
pub(super) struct SessionSink {
    pub(super) to_link: mpsc::Sender<AgentMessage>,
    /// Where a refused subscription is dropped ([`Subscriber::refuse`]); set once
    /// the subscriber task runs.
    pub(super) steal_tx: std::sync::OnceLock<mpsc::UnboundedSender<SubCommand>>,
    pub(super) table: Arc<ConnTable>,
    pub(super) next_id: AtomicU64,
    /// Where descriptors leave, when both peers pass them.
    pub(super) fd_out: Option<Arc<FdSender>>,
    /// The ports subscribed with `SubscribeFds` on a link that passes
    /// descriptors: their whole stolen connections go as sockets.
    pub(super) fd_ports: std::sync::Mutex<std::collections::HashSet<u16>>,
    /// The client asked for routing records ([`ClientMessage::WatchRoutes`]).
    pub(super) watch_routes: AtomicBool,
    /// The client reads tap times ([`Subscriber::tap_times`]).
    pub(super) tap_times: bool,
    /// The client takes direct listeners (its `Hello` named
    /// [`graft_protocol::version::FEATURE_DIRECT`] on a link that passes
    /// descriptors).
    pub(super) direct: bool,
    /// The client takes IPv6 direct listeners too (its `Hello` named
    /// [`graft_protocol::version::FEATURE_DIRECT6`] as well).
    pub(super) direct6: bool,
    /// The `attached` switch of each direct listener passed to the client
    /// ([`crate::direct`]), set by `ClientMessage::DirectAttached`.
    pub(super) direct_attached:
        std::sync::Mutex<std::collections::HashMap<u16, Arc<std::sync::atomic::AtomicBool>>>,
    /// Somebody watches the session's traffic (`ClientMessage::PauseDirect`):
    /// no port of it goes to a direct listener, so graft sees every
    /// connection.
    pub(super) direct_paused: AtomicBool,
}

impl SessionSink {
    /// The program watches the direct listener of `port`: the agent leaves its
    /// connections to it ([`crate::direct`]).
    pub(super) fn attach_direct(&self, port: u16) {
        if let Some(attached) = self
            .direct_attached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&port)
        {
            tracing::debug!(port, "the program watches its direct listener");
            attached.store(true, Ordering::SeqCst);
        }
    }

    /// Registers a new incoming connection and announces it to the client.
    async fn announce(&self, meta: ConnMeta) -> std::io::Result<relay::Registration> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = ConnectionId(ConnectionId::AGENT_BIT | id);
        let registration = self
            .table
            .register(conn)
            .expect("agent connection ids are never reused");
        tracing::debug!(%conn, peer = %meta.peer, local = %meta.local, "incoming connection");
        let incoming = AgentMessage::Incoming {
            conn,
            port: meta.port,
            peer: meta.peer,
            local: meta.local,
        };
        if self.to_link.send(incoming).await.is_err() {
            self.table.finished(&registration);
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the session is gone",
            ));
        }
        Ok(registration)
    }

    /// Relays any byte stream as an incoming connection of this session.
    pub(super) async fn accept<S>(&self, meta: ConnMeta, stream: S) -> std::io::Result<()>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
    {
        let registration = self.announce(meta).await?;
        tokio::spawn(relay::stream(
            stream,
            registration,
            self.to_link.clone(),
            self.table.clone(),
        ));
        Ok(())
    }
}

/// The in-agent buffer between the hub and a session's connection, in bytes.
pub(super) const SESSION_PIPE: usize = 256 * 1024;

impl Subscriber for SessionSink {
    fn open(self: Arc<Self>, meta: ConnMeta) -> BoxFuture<std::io::Result<BoxIo>> {
        Box::pin(async move {
            // A filtered steal on a link that passes descriptors: the program
            // gets one end of a loopback pair, the agent writes the requests
            // its filter matched to the other.
            let passes = self.fd_out.clone().filter(|_| {
                self.fd_ports
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .contains(&meta.port)
            });
            if let Some(fd_out) = passes {
                match crate::incoming::pair::loopback_pair() {
                    Ok((ours, theirs)) => {
                        let incoming = AgentMessage::IncomingFd {
                            port: meta.port,
                            peer: meta.peer,
                            local: meta.local,
                        };
                        return match fd_out.send(theirs, incoming).await {
                            Ok(()) => {
                                tracing::debug!(peer = %meta.peer, port = meta.port,
                                    "filtered or mirrored connection to the session passed as a loopback socket");
                                Ok(Box::new(ours) as BoxIo)
                            }
                            Err(fd) => {
                                crate::passing::reset(fd);
                                Err(std::io::Error::new(
                                    std::io::ErrorKind::BrokenPipe,
                                    "the session is gone",
                                ))
                            }
                        };
                    }
                    Err(e) => tracing::debug!(peer = %meta.peer, port = meta.port,
                        "no loopback socket pair ({e}); the filtered connection is relayed"),
                }
            } else if self.fd_out.is_some() {
                tracing::debug!(peer = %meta.peer, port = meta.port,
                    "incoming connection relayed: the agent reads it (TLS, or a mirror whose answers graft reads)");
            }
            let (ours, theirs) = tokio::io::duplex(SESSION_PIPE);
            self.accept(meta, theirs).await?;
            Ok(Box::new(ours) as BoxIo)
        })
    }

    fn refuse(self: Arc<Self>, port: u16, reason: String) {
        tracing::warn!(port, "subscription refused: {reason}");
        if let Some(steal_tx) = self.steal_tx.get() {
            let _ = steal_tx.send(SubCommand::Unsubscribe(port));
        }
        let refused = AgentMessage::SubscribeResult {
            port,
            error: Some(SubscribeError::Tls { reason }),
        };
        if self.to_link.try_send(refused).is_err() {
            tracing::debug!(
                port,
                "the refusal could not be sent: the session is gone or busy"
            );
        }
    }

    fn watches_routes(&self) -> bool {
        self.watch_routes.load(Ordering::Relaxed)
    }

    fn takes_listener(&self, port: u16) -> bool {
        self.direct
            && !self.direct_paused.load(Ordering::SeqCst)
            && self.fd_out.is_some()
            && self
                .fd_ports
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .contains(&port)
    }

    fn takes_ipv6_listener(&self) -> bool {
        self.direct6
    }

    fn pass_listener(self: Arc<Self>, port: u16, offer: crate::direct::Offer) -> BoxFuture<()> {
        Box::pin(async move {
            let Some(fd_out) = self.fd_out.clone() else {
                return;
            };
            let crate::direct::Offer {
                listener,
                listener_v6,
                attached,
            } = offer;
            if let Err(fd) = fd_out
                .send(listener, AgentMessage::DirectListener { port })
                .await
            {
                // The link is gone; the agent's own descriptor keeps serving.
                drop(fd);
                return;
            }
            // After the IPv4 one, which the client keeps as the port's new
            // listener; this one joins it.
            if let Some(v6) = listener_v6
                && let Err(fd) = fd_out
                    .send(v6, AgentMessage::DirectListener6 { port })
                    .await
            {
                drop(fd);
                return;
            }
            tracing::debug!(port, "direct listener passed as descriptors");
            self.direct_attached
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(port, attached);
        })
    }

    fn tap_times(&self) -> bool {
        self.tap_times
    }

    fn routed(&self, record: graft_protocol::incoming::RoutedRequest) {
        // Best effort: a busy link loses the record, never delays a request.
        if self
            .to_link
            .try_send(AgentMessage::Routed(Box::new(record)))
            .is_err()
        {
            tracing::trace!("a routing record was dropped: the link is busy");
        }
    }

    fn hand_over(
        self: Arc<Self>,
        meta: ConnMeta,
        stream: tokio::net::TcpStream,
    ) -> BoxFuture<std::io::Result<()>> {
        Box::pin(async move {
            let passes = self.fd_out.clone().filter(|_| {
                self.fd_ports
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .contains(&meta.port)
            });
            if let Some(fd_out) = passes {
                let fd: std::os::fd::OwnedFd = stream.into_std()?.into();
                tracing::debug!(peer = %meta.peer, port = meta.port, "stolen connection passed as a descriptor");
                let incoming = AgentMessage::IncomingFd {
                    port: meta.port,
                    peer: meta.peer,
                    local: meta.local,
                };
                return match fd_out.send(fd, incoming).await {
                    Ok(()) => Ok(()),
                    Err(fd) => {
                        crate::passing::reset(fd);
                        Err(std::io::Error::new(
                            std::io::ErrorKind::BrokenPipe,
                            "the session is gone",
                        ))
                    }
                };
            }
            tracing::debug!(peer = %meta.peer, port = meta.port, "stolen connection relayed: {}",
                if self.fd_out.is_none() { "the link passes no descriptors" }
                else { "the client asked for a relayed delivery (a graft delivery, TLS, or a descriptor-less peer)" });
            // From here on, an agent that stops resets the connection.
            let guard = relay::ResetOnDrop::new(stream);
            let registration = self.announce(meta).await?;
            tokio::spawn(relay::tcp(
                guard,
                registration,
                self.to_link.clone(),
                self.table.clone(),
            ));
            Ok(())
        })
    }
}
