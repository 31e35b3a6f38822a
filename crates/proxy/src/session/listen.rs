//! Listeners of the program ([`Shared::listen`], [`Shared::unlisten`]): a
//! port's subscription for delivery to a local listener or a channel, stolen
//! once for all its listeners; and the delivered connections' real addresses
//! that `PeerOf` answers with.

use super::shared::*;
use super::*;

impl Shared {
    /// Subscribes `port` for delivery to `deliver_to`, stealing it when it is not
    /// stolen yet. The error is an `errno` for the layer and a message.
    pub(crate) async fn listen(
        &self,
        port: u16,
        deliver_to: Delivery,
        pid: u32,
    ) -> Result<(), (i32, String)> {
        self.listen_accepting(port, deliver_to, pid, Accepts::Relayed)
            .await
    }

    /// [`Shared::listen`] for a program that `accepts` as said.
    pub(crate) async fn listen_accepting(
        &self,
        port: u16,
        deliver_to: Delivery,
        pid: u32,
        accepts: Accepts,
    ) -> Result<(), (i32, String)> {
        self.listen_here(port, deliver_to.clone(), pid, accepts)
            .await?;
        let secondaries = lock(&self.secondaries).clone();
        for (i, secondary) in secondaries.iter().enumerate() {
            if let Err((_, message)) = secondary
                .listen_here(port, deliver_to.clone(), pid, accepts)
                .await
            {
                eprintln!("graft: port {port} on pod #{}: {message}", i + 2);
            }
        }
        Ok(())
    }

    /// [`Shared::listen`] on this session's agent only.
    async fn listen_here(
        &self,
        port: u16,
        deliver_to: Delivery,
        pid: u32,
        accepts: Accepts,
    ) -> Result<(), (i32, String)> {
        let to_listener =
            matches!(deliver_to, Delivery::Listener(_)) && accepts == Accepts::Sockets;
        let (tx, rx) = oneshot::channel();
        let first = {
            let mut state = self.state();
            if let Some(reason) = &state.ended {
                return Err(aborted(reason));
            }
            match state.steals.entry(port) {
                Entry::Occupied(mut entry) => {
                    let sub = entry.get_mut();
                    sub.deliver_to = deliver_to;
                    sub.pid = pid;
                    match &mut sub.state {
                        StealState::Active => return Ok(()),
                        StealState::Pending(waiters) => waiters.push(tx),
                    }
                    false
                }
                Entry::Vacant(entry) => {
                    entry.insert(Subscription {
                        deliver_to,
                        pid,
                        state: StealState::Pending(vec![tx]),
                    });
                    true
                }
            }
        };
        let subscription = PortSubscription {
            port,
            mode: self.options.incoming_mode,
            filter: self.options.filter.clone(),
            responses: self.options.tap_responses,
        };
        let message = match &self.options.tls {
            Some(tls) => ClientMessage::SubscribeTls {
                subscription,
                tls: tls.clone(),
            },
            // Whole stolen connections go to the program's listener as their
            // sockets when the agent passes descriptors; under a filter, or
            // for a mirror, a socket the agent writes the requests (or their
            // copies) to. A mirror that wants the target's answers too is read
            // by graft, not by a program.
            None if self.fds.is_some()
                && to_listener
                && (subscription.mode == IncomingMode::Steal || !subscription.responses) =>
            {
                ClientMessage::SubscribeFds(subscription)
            }
            None => ClientMessage::Subscribe(subscription),
        };
        if first && self.send(message).await.is_err() {
            self.state().steals.remove(&port);
        }
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err((steal_errno(&error), error.to_string())),
            Err(_) => Err(aborted(
                self.state().ended.as_ref().unwrap_or(&LinkEnd::Closed),
            )),
        }
    }

    /// Drops the subscription of `port` when `pid` owns it, and stops stealing.
    pub(crate) async fn unlisten(&self, port: u16, pid: u32) {
        self.unlisten_here(port, pid).await;
        let secondaries = lock(&self.secondaries).clone();
        for secondary in secondaries {
            secondary.unlisten_here(port, pid).await;
        }
    }

    /// [`Shared::unlisten`] on this session's agent only.
    async fn unlisten_here(&self, port: u16, pid: u32) {
        let owned = {
            let mut state = self.state();
            match state.steals.get(&port) {
                Some(sub) if sub.pid == pid => state.steals.remove(&port).is_some(),
                _ => false,
            }
        };
        if owned {
            self.forget_direct(port);
            tracing::info!(port, pid, "unstealing port: its listener closed");
            let _ = self.send(ClientMessage::Unsubscribe { port }).await;
        }
    }

    /// The real addresses of a delivered connection whose proxy-side address is
    /// `proxy_side`.
    pub(crate) fn peer_of(&self, proxy_side: SocketAddr) -> Option<DeliveredPeer> {
        self.peer_of_here(proxy_side).or_else(|| {
            let secondaries = lock(&self.secondaries).clone();
            secondaries.iter().find_map(|s| s.peer_of_here(proxy_side))
        })
    }

    /// [`Shared::peer_of`] among this session's connections only.
    fn peer_of_here(&self, proxy_side: SocketAddr) -> Option<DeliveredPeer> {
        let state = self.state();
        state.delivered.get(&proxy_side).copied().or_else(|| {
            // A dual-stack listener may report an IPv4 peer as IPv4-mapped IPv6.
            match proxy_side.ip() {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().and_then(|v4| {
                    state
                        .delivered
                        .get(&SocketAddr::new(IpAddr::V4(v4), proxy_side.port()))
                        .copied()
                }),
                IpAddr::V4(_) => None,
            }
        })
    }

    /// The local listener an active steal of `port` delivers to, when it is one
    /// (not a [`Delivery::Channel`]).
    pub(super) fn listener_of(&self, port: u16) -> Option<SocketAddr> {
        let state = self.state();
        let sub = state.steals.get(&port)?;
        match (&sub.state, &sub.deliver_to) {
            (StealState::Active, Delivery::Listener(addr)) => Some(*addr),
            _ => None,
        }
    }

    /// Records a delivered connection for `PeerOf`.
    pub(crate) fn add_delivered(&self, proxy_side: SocketAddr, peer: DeliveredPeer) {
        self.state().delivered.insert(proxy_side, peer);
    }

    /// Forgets a delivered connection.
    pub(crate) fn remove_delivered(&self, proxy_side: SocketAddr) {
        self.state().delivered.remove(&proxy_side);
    }
}
