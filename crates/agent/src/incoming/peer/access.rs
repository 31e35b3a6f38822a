//! A session's access to the hub of its target, wherever the hub lives: this
//! agent becomes its owner when it wins the election (publishing the hub key),
//! else it joins the owner's hub; it takes over when the owner goes, and moves
//! its subscriptions to the next hub when the owner hands it over
//! ([`super::handover`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use graft_protocol::incoming::{SessionListing, SubscribeError, Subscription};
use tokio::sync::Mutex;

use super::handover::{Handover, LIVE_WAIT, MOVE_WAIT};
use super::key::{self, Published};
use super::link::Listener;
use super::{
    AcceptDelivery, FromHub, HubConn, HubError, HubState, Peers, ToHub, join_existing, serve_peers,
};
use crate::incoming::tls::{TlsSetup, TlsSubscriber};
use crate::incoming::{Hub, OwnerId, RulesState, Subscriber};

/// How this agent reaches the hub of its target.
enum Role {
    /// Not needed yet.
    Idle,
    /// This agent owns the hub; the table with its key lives as long as `key`.
    /// Both are `None` for a hub that cannot be shared (no nf_tables).
    Owner {
        hub: Arc<Hub>,
        owner: OwnerId,
        server: Option<tokio::task::JoinHandle<()>>,
        key: Option<Published>,
        peers: Arc<Peers>,
    },
    /// Another agent owns it.
    Client { conn: Arc<HubConn> },
}

/// A session's access to the hub of its target, wherever it lives; takes over the
/// hub when its owner goes.
pub struct Access {
    client: String,
    chain: String,
    rules_touched: Arc<AtomicBool>,
    local: Arc<dyn Subscriber>,
    role: Mutex<Role>,
    /// Each port's subscription and when it was first made.
    subscriptions: std::sync::Mutex<Vec<(Subscription, u64)>>,
    /// The TLS termination of each port subscribed with one ([`Access::set_tls`]).
    tls: std::sync::Mutex<std::collections::HashMap<u16, Arc<TlsSetup>>>,
    accept_delivery: AcceptDelivery,
    /// Keeps conntrack on while this session takes part in the hub.
    conntrack: std::sync::Mutex<Option<key::ConntrackHold>>,
    /// Set while the session's client is detached ([`Access::suspend`]): the
    /// subscriptions are kept here but are not in the hub.
    suspended: AtomicBool,
    /// Links to hubs handed over by their owners: kept until those owners close
    /// them, since connections they still relay may be delivered over them.
    leaving: std::sync::Mutex<Vec<Arc<HubConn>>>,
}

impl Access {
    /// Access for the session of `client` whose connections go to `local` (when
    /// this agent owns the hub) or arrive as deliveries handled by
    /// `accept_delivery` (when another agent does).
    pub fn new(
        client: String,
        chain: String,
        rules_touched: Arc<AtomicBool>,
        local: Arc<dyn Subscriber>,
        accept_delivery: AcceptDelivery,
    ) -> Arc<Access> {
        Arc::new(Access {
            client,
            chain,
            rules_touched,
            local,
            role: Mutex::new(Role::Idle),
            subscriptions: std::sync::Mutex::default(),
            tls: std::sync::Mutex::default(),
            accept_delivery,
            conntrack: std::sync::Mutex::default(),
            suspended: AtomicBool::new(false),
            leaving: std::sync::Mutex::default(),
        })
    }

    /// Makes sure the role is settled: owner or client. A hub this agent comes
    /// to own starts with `rules` ([`RulesState::Staged`] when it takes over from
    /// an owner that hands its hub over).
    async fn ensure<'a>(
        self: &Arc<Self>,
        role: &mut tokio::sync::MutexGuard<'a, Role>,
        rules: RulesState,
    ) -> Result<(), HubError> {
        if !matches!(**role, Role::Idle) {
            return Ok(());
        }
        self.hold_conntrack();
        for _ in 0..250 {
            let published = match key::publish() {
                Ok(published) => published,
                Err(e @ key::KeyError::Unsupported(_)) => {
                    // Better one session than none: this one works, alone.
                    tracing::warn!("this session cannot share the target with other sessions: {e}");
                    let hub = Hub::start(
                        self.chain.clone(),
                        self.rules_touched.clone(),
                        RulesState::Live,
                    );
                    let owner = hub.new_owner();
                    **role = Role::Owner {
                        hub,
                        owner,
                        server: None,
                        key: None,
                        peers: Arc::default(),
                    };
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            };
            match published {
                Some(published) => {
                    let name = published.key.hub_name();
                    let listener = Listener::bind_abstract(&name)
                        .map_err(|error| HubError::Listen { name, error })?;
                    let hub = Hub::start(self.chain.clone(), self.rules_touched.clone(), rules);
                    let owner = hub.new_owner();
                    let peers = Arc::new(Peers::default());
                    let server = tokio::spawn(serve_peers(
                        listener,
                        hub.clone(),
                        published.key.clone(),
                        peers.clone(),
                    ));
                    tracing::info!(?rules, "this agent owns the target's hub");
                    **role = Role::Owner {
                        hub,
                        owner,
                        server: Some(server),
                        key: Some(published),
                        peers,
                    };
                    return Ok(());
                }
                None => {
                    // `None`: the owner left between our attempt and the read:
                    // elect again.
                    if let Some(conn) = join_existing(Some(self.accept_delivery.clone())).await? {
                        let conn = Arc::new(conn);
                        tracing::info!("joined the target's hub of another agent");
                        **role = Role::Client { conn: conn.clone() };
                        self.watch(conn);
                        return Ok(());
                    }
                    // The owner's table is still being reaped by the kernel.
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            }
        }
        Err(HubError::OwnerKeepsChanging)
    }

    /// Keeps conntrack on for as long as this session takes part in the hub
    /// (see [`key::hold_conntrack`]); a failure only costs the survival of
    /// handed-over connections when the hub's owner ends.
    fn hold_conntrack(&self) {
        let mut hold = self.conntrack.lock().expect("conntrack lock poisoned");
        if hold.is_none() {
            match key::hold_conntrack() {
                Ok(h) => *hold = Some(h),
                Err(e) => tracing::warn!(
                    "connections handed to this session will not survive the hub owner's \
                     end: {e}"
                ),
            }
        }
    }

    /// When the hub's owner goes, take over and subscribe again; when it hands
    /// the hub over, move to the next hub ([`Access::move_on`]).
    fn watch(self: &Arc<Self>, conn: Arc<HubConn>) {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            let state = conn.reached(HubState::HandingOver).await;
            let Some(this) = this.upgrade() else { return };
            if state < HubState::Closed {
                this.move_on(conn).await;
                return;
            }
            tracing::warn!("the target's hub went away; taking over");
            let mut role = this.role.lock().await;
            if matches!(&*role, Role::Client { conn: c } if Arc::ptr_eq(c, &conn)) {
                *role = Role::Idle;
            } else {
                return;
            }
            this.settle(&mut role, RulesState::Live).await;
        });
    }

    /// Settles the role again after the hub's owner went, and subscribes again.
    async fn settle<'a>(
        self: &Arc<Self>,
        role: &mut tokio::sync::MutexGuard<'a, Role>,
        rules: RulesState,
    ) {
        if let Err(e) = self.ensure(role, rules).await {
            tracing::warn!("could not take over the hub: {e}");
            return;
        }
        if self.suspended.load(Ordering::SeqCst) {
            // Subscribed again by `resume`.
            return;
        }
        let subs = self
            .subscriptions
            .lock()
            .expect("subscriptions lock poisoned")
            .clone();
        for (sub, since) in subs {
            let port = sub.port;
            if let Err(e) = self.subscribe_in(role, sub, since).await {
                tracing::warn!(port, "could not subscribe again: {e}");
            }
        }
    }

    /// The owner of the hub behind `old` hands it over: elect or join the next
    /// hub (staged: its rules wait), subscribe there, tell `old` we moved, let
    /// the next hub's rules in when `old` releases it, and keep `old` for the
    /// deliveries of the connections it still relays until it closes the link.
    async fn move_on(self: &Arc<Self>, old: Arc<HubConn>) {
        tracing::info!("the target's hub is handed over; moving to the next one");
        {
            let mut role = self.role.lock().await;
            if !matches!(&*role, Role::Client { conn: c } if Arc::ptr_eq(c, &old)) {
                return;
            }
            *role = Role::Idle;
            self.leaving
                .lock()
                .expect("leaving lock poisoned")
                .push(old.clone());
            self.settle(&mut role, RulesState::Staged).await;
        }
        let _ = old.call(ToHub::Moved).await;
        // The old owner bounds its own waits; this bound only guards against an
        // owner that stops answering without closing the link.
        let released =
            tokio::time::timeout(MOVE_WAIT + LIVE_WAIT, old.reached(HubState::Released)).await;
        if released.is_err() {
            tracing::warn!("the old hub did not release the target in time; taking it");
        }
        if let Role::Owner { hub, .. } = &*self.role.lock().await {
            hub.go_live().await;
        }
        if *old.state.borrow() < HubState::Closed {
            let _ = old.call(ToHub::Live).await;
        }
        let closed = {
            let mut closed = old.state.clone();
            drop(old);
            async move {
                let _ = closed.wait_for(|s| *s == HubState::Closed).await;
            }
        };
        closed.await;
        self.leaving
            .lock()
            .expect("leaving lock poisoned")
            .retain(|c| *c.state.borrow() != HubState::Closed);
    }

    async fn subscribe_in(
        &self,
        role: &Role,
        subscription: Subscription,
        since: u64,
    ) -> Result<(), SubscribeError> {
        let hub_error = |reason: String| SubscribeError::Hub { reason };
        match role {
            Role::Idle => Err(hub_error("no hub".into())),
            Role::Owner { hub, owner, .. } => {
                let tls = self
                    .tls
                    .lock()
                    .expect("tls lock poisoned")
                    .get(&subscription.port)
                    .cloned();
                let to: Arc<dyn Subscriber> = match tls {
                    Some(setup) => Arc::new(TlsSubscriber {
                        inner: self.local.clone(),
                        setup,
                    }),
                    None => self.local.clone(),
                };
                hub.subscribe(*owner, &self.client, subscription, to, Some(since))
                    .await
            }
            Role::Client { .. }
                if self
                    .tls
                    .lock()
                    .expect("tls lock poisoned")
                    .contains_key(&subscription.port) =>
            {
                Err(SubscribeError::Tls {
                    reason: "another session's agent owns this target's hub (graft ls lists its \
                             sessions), and TLS termination (--tls-cert) works only in the hub \
                             owner's agent: run this session when the other has ended, or give \
                             the certificate to the older session"
                        .to_owned(),
                })
            }
            Role::Client { conn } => {
                let message = ToHub::Subscribe {
                    client: self.client.clone(),
                    subscription,
                    since_unix: since,
                };
                match conn.call(message).await {
                    Ok(FromHub::Done(None)) => Ok(()),
                    Ok(FromHub::Refused(e)) => Err(e),
                    Ok(FromHub::Done(Some(e))) => Err(hub_error(e)),
                    Ok(_) => Err(hub_error("the hub answered out of turn".into())),
                    Err(e) => Err(hub_error(format!("the target's hub is unreachable: {e}"))),
                }
            }
        }
    }

    /// Subscribes (or replaces the subscription of a port).
    ///
    /// # Errors
    ///
    /// The hub's refusal (conflict, bad filter, rules failed), its absence, or a
    /// hub that is not graft's (it could not prove it knows the hub key).
    pub async fn subscribe(
        self: &Arc<Self>,
        subscription: Subscription,
    ) -> Result<(), SubscribeError> {
        let mut role = self.role.lock().await;
        let since = self
            .subscriptions
            .lock()
            .expect("subscriptions lock poisoned")
            .iter()
            .find(|(s, _)| s.port == subscription.port)
            .map_or_else(crate::incoming::now_unix, |(_, since)| *since);
        // While suspended it is only kept, for `resume`.
        if !self.suspended.load(Ordering::SeqCst) {
            self.ensure(&mut role, RulesState::Live)
                .await
                .map_err(|e| SubscribeError::Hub {
                    reason: e.to_string(),
                })?;
            self.subscribe_in(&role, subscription.clone(), since)
                .await?;
        }
        let mut subs = self
            .subscriptions
            .lock()
            .expect("subscriptions lock poisoned");
        subs.retain(|(s, _)| s.port != subscription.port);
        subs.push((subscription, since));
        Ok(())
    }

    /// Sets (or, with `None`, clears) the TLS termination that the next
    /// subscriptions of `port` carry.
    pub fn set_tls(&self, port: u16, setup: Option<Arc<TlsSetup>>) {
        let mut tls = self.tls.lock().expect("tls lock poisoned");
        match setup {
            Some(setup) => tls.insert(port, setup),
            None => tls.remove(&port),
        };
    }

    /// Drops the subscription of `port`.
    pub async fn unsubscribe(self: &Arc<Self>, port: u16) {
        self.subscriptions
            .lock()
            .expect("subscriptions lock poisoned")
            .retain(|(s, _)| s.port != port);
        let role = self.role.lock().await;
        match &*role {
            Role::Idle => {}
            Role::Owner { hub, owner, .. } => hub.unsubscribe(*owner, port).await,
            Role::Client { conn } => {
                let _ = conn.call(ToHub::Unsubscribe { port }).await;
            }
        }
    }

    /// Takes this session's subscriptions out of the hub and keeps them for
    /// [`Access::resume`]: while the client is detached the target serves its
    /// own traffic (DESIGN.md). Connections already delivered go on.
    pub async fn suspend(self: &Arc<Self>) {
        let role = self.role.lock().await;
        if self.suspended.swap(true, Ordering::SeqCst) {
            return;
        }
        let ports: Vec<u16> = self
            .subscriptions
            .lock()
            .expect("subscriptions lock poisoned")
            .iter()
            .map(|(s, _)| s.port)
            .collect();
        for port in ports {
            match &*role {
                Role::Idle => {}
                Role::Owner { hub, owner, .. } => hub.unsubscribe(*owner, port).await,
                Role::Client { conn } => {
                    let _ = conn.call(ToHub::Unsubscribe { port }).await;
                }
            }
            tracing::info!(
                port,
                "the client is detached: the target serves this port again"
            );
        }
    }

    /// Puts this session's subscriptions in the hub again as they are, so
    /// that the hub reads again what the session takes
    /// ([`crate::incoming::Subscriber::takes_listener`]); nothing for a
    /// session whose agent does not own the hub.
    pub async fn reapply(self: &Arc<Self>) {
        let role = self.role.lock().await;
        if let Role::Owner { hub, owner, .. } = &*role {
            hub.reapply(*owner).await;
        }
    }

    /// Puts the subscriptions kept by [`Access::suspend`] back into the hub,
    /// each with its first subscription time, so its place among overlapping
    /// filters is kept. Returns those the hub refused now (e.g. another session
    /// stole the port meanwhile), with the reason; they are dropped.
    pub async fn resume(self: &Arc<Self>) -> Vec<(u16, SubscribeError)> {
        let mut role = self.role.lock().await;
        if !self.suspended.swap(false, Ordering::SeqCst) {
            return Vec::new();
        }
        let subs = self
            .subscriptions
            .lock()
            .expect("subscriptions lock poisoned")
            .clone();
        let mut refused = Vec::new();
        if subs.is_empty() {
            return refused;
        }
        if let Err(e) = self.ensure(&mut role, RulesState::Live).await {
            let e = SubscribeError::Hub {
                reason: e.to_string(),
            };
            refused.extend(subs.iter().map(|(s, _)| (s.port, e.clone())));
        } else {
            for (sub, since) in subs {
                let port = sub.port;
                match self.subscribe_in(&role, sub, since).await {
                    Ok(()) => tracing::info!(port, "the client is back: subscribed again"),
                    Err(e) => refused.push((port, e)),
                }
            }
        }
        self.subscriptions
            .lock()
            .expect("subscriptions lock poisoned")
            .retain(|(s, _)| !refused.iter().any(|(port, _)| *port == s.port));
        refused
    }

    /// Every subscription on the target; empty when no hub exists.
    ///
    /// # Errors
    ///
    /// The hub could not be read or reached, or is not graft's.
    pub async fn list(self: &Arc<Self>) -> Result<Vec<SessionListing>, HubError> {
        let role = self.role.lock().await;
        let listing = match &*role {
            Role::Owner { hub, .. } => return Ok(hub.list()),
            Role::Client { conn } => conn.call(ToHub::List).await,
            Role::Idle => match join_existing(None).await? {
                Some(conn) => conn.call(ToHub::List).await,
                None => return Ok(Vec::new()),
            },
        };
        match listing {
            Ok(FromHub::Listing(l)) => Ok(l),
            Ok(FromHub::Done(Some(e))) => Err(HubError::Answered(e)),
            Ok(_) => Err(HubError::OutOfTurn),
            Err(e) => Err(HubError::Unreachable(e)),
        }
    }

    /// Ends this session's part: its subscriptions go at once; an owned hub's key
    /// is withdrawn (the kernel deletes its table with the netlink socket) and its
    /// socket closed. When other agents' sessions are on an owned hub, the hub
    /// is returned to be handed over to them ([`Handover::run`]) or, dropped,
    /// ended at once.
    pub async fn close(&self) -> Option<Handover> {
        let mut role = self.role.lock().await;
        self.leaving.lock().expect("leaving lock poisoned").clear();
        let conntrack = self
            .conntrack
            .lock()
            .expect("conntrack lock poisoned")
            .take();
        match std::mem::replace(&mut *role, Role::Idle) {
            Role::Owner {
                hub,
                owner,
                server,
                key,
                peers,
            } => {
                // Nobody joins this hub any more; then the key goes, so the
                // peers elect the next owner among themselves.
                if let Some(server) = server {
                    server.abort();
                    let _ = server.await;
                }
                hub.drop_owner(owner).await;
                drop(key);
                if peers.is_empty() {
                    return None;
                }
                Some(Handover {
                    hub,
                    peers,
                    conntrack,
                })
            }
            Role::Client { conn } => {
                drop(conn);
                None
            }
            Role::Idle => None,
        }
    }
}
