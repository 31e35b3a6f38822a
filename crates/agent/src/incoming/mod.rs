//! Incoming traffic of the target: the hub that holds every session's
//! subscriptions on the target and routes each redirected connection (or, under
//! HTTP filters, each request) to a session or to the target's own server.
//!
//! There is one hub per target network namespace. The first agent that needs it
//! owns it; agents of other sessions on the same target reach it through
//! [`peer`] (an abstract Unix socket, which Linux scopes to the network
//! namespace, unix(7)). The hub owner redirects subscribed ports to itself
//! ([`crate::steal::Redirector`]) and routes each accepted connection:
//!
//! - a port that is only mirrored is not redirected at all where the agent may
//!   open a packet socket: [`sniff`] copies its connections off the packet path
//!   ([`capture`], [`reassembly`]) and the target's clients talk to the target
//!   directly; without `CAP_NET_RAW` (or with TLS termination for filters) the
//!   port is redirected and passed through as below;
//! - no HTTP filter on the port: the whole connection goes to the unfiltered
//!   stealer, or, when there is none, to the target's own server (redirect and
//!   pass-through) — and unfiltered mirrors get a copy of the client's bytes
//!   through a bounded buffer that is dropped on overflow ([`tee`]);
//! - a filter on the port: the first bytes decide: HTTP/1.x or HTTP/2 prior
//!   knowledge is served by [`http`], which routes each request (HTTP/1.1 on a
//!   port of steals without body filters by [`h1`], which forwards the bytes as
//!   they are and hands anything unusual to [`http`]); anything else (or
//!   silence for [`DETECT_TIMEOUT`]) is handled as without filters.
//!
//! Conflicts: a port has at most one unfiltered steal; a second is refused with
//! the holder's name and start. Filtered steals and mirrors coexist with anything.
//! When the filters of several sessions match one request, the session that
//! subscribed first (oldest `since`, kept across a hub take-over) gets it; the
//! later session is told so when it starts (by graft, from the listing).
//!
//! Rules and in-flight connections: the hub's redirect rules are
//! [`RulesState::Live`] normally; a hub started to take over from an owner that
//! hands over ([`peer::handover`]) keeps its subscriptions without rules
//! ([`RulesState::Staged`]) until the old owner, whose rules still catch every new
//! connection with every session's subscription, lets it go live; the old owner's
//! hub then retires its rules ([`RulesState::Retired`]) and relays the
//! connections it holds until they end ([`Hub::drain`]). Every routed connection
//! runs under the hub's [`TaskTracker`], which is what the drain waits for.

pub mod body;
pub mod capture;
pub mod framing;
pub mod h1;
pub mod http;
pub mod pace;
pub mod pair;
pub mod peer;
pub mod reassembly;
pub mod ring;
pub mod routes;
pub mod segment;
pub mod sniff;
pub mod tee;
pub mod tls;
pub mod tls_verify;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use graft_filter::HttpFilter;
use graft_protocol::incoming::{
    IncomingMode, RoutedRequest, SessionListing, SubscribeError, Subscription,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use crate::steal::{Accepted, Redirector};

/// How long a connection on a filtered port may stay silent before it is treated
/// as not HTTP and passed through.
pub const DETECT_TIMEOUT: Duration = Duration::from_millis(1000);

/// A byte stream to or from a session. It is [`std::any::Any`] too, so a
/// mirror's writer can tell a plain TCP socket (the loopback pair of a local
/// program, [`pair`]) from the rest ([`tee`]).
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + std::any::Any + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A boxed [`Io`].
pub type BoxIo = Box<dyn Io>;

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What a session is told about an incoming connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnMeta {
    /// The target's port.
    pub port: u16,
    /// The client's address.
    pub peer: SocketAddr,
    /// The address the client connected to.
    pub local: SocketAddr,
}

/// Where a subscription's connections go: one session, in this agent or another.
pub trait Subscriber: Send + Sync + 'static {
    /// Opens a new connection to the session's program for `meta` and returns the
    /// agent's end of it.
    fn open(self: Arc<Self>, meta: ConnMeta) -> BoxFuture<io::Result<BoxIo>>;

    /// Hands a whole accepted connection to the session. The default opens a
    /// connection and splices the two.
    fn hand_over(self: Arc<Self>, meta: ConnMeta, stream: TcpStream) -> BoxFuture<io::Result<()>> {
        Box::pin(async move {
            let session = self.open(meta).await?;
            tokio::spawn(tee::pipe(stream, session, Vec::new()));
            Ok(())
        })
    }

    /// The TLS termination this subscription brought ([`tls`]); none by default.
    fn tls(&self) -> Option<Arc<tls::TlsSetup>> {
        None
    }

    /// Tells the session that the hub refused its subscription of `port` after
    /// it started (e.g. [`tls::refusal`]), and drops that subscription. The
    /// default only logs it.
    fn refuse(self: Arc<Self>, port: u16, reason: String) {
        tracing::warn!(port, "subscription refused: {reason}");
    }

    /// Whether the session reads the time frames of [`graft_protocol::incoming::tap`]
    /// (its `Hello` named [`graft_protocol::version::FEATURE_TAP_TIMES`]). None
    /// does by default.
    fn tap_times(&self) -> bool {
        false
    }

    /// Whether the session wants a record of each request of its filtered
    /// ports that went elsewhere ([`routes`]); checked per request, so it must
    /// be cheap. None does by default.
    fn watches_routes(&self) -> bool {
        false
    }

    /// Hands the session such a record; dropped when it cannot take it now.
    fn routed(&self, record: RoutedRequest) {
        drop(record);
    }

    /// Whether the session's program takes a direct listener of `port`
    /// ([`crate::direct`]) and accepts the port's stolen connections itself.
    /// Checked when the session's unfiltered steal is the port's only
    /// subscription. None does by default.
    fn takes_listener(&self, port: u16) -> bool {
        let _ = port;
        false
    }

    /// Whether the session's program takes an IPv6 direct listener beside
    /// the IPv4 one. None does by default.
    fn takes_ipv6_listener(&self) -> bool {
        false
    }

    /// Passes the session the direct listener `offer` of `port`. The default
    /// drops the offer: the agent keeps taking the listener's connections and
    /// hands them over.
    fn pass_listener(self: Arc<Self>, port: u16, offer: crate::direct::Offer) -> BoxFuture<()> {
        let _ = (port, offer);
        Box::pin(async {})
    }
}

/// Who holds subscriptions: a session of this agent, or another agent's.
pub type OwnerId = u64;

/// One subscription in the hub.
pub struct Sub {
    /// Its holder.
    pub owner: OwnerId,
    /// The holder's `user@host`.
    pub client: String,
    /// Seconds since the Unix epoch when it was made.
    pub since_unix: u64,
    /// What was asked.
    pub subscription: Subscription,
    /// The compiled filter.
    pub filter: Option<HttpFilter>,
    /// Where its connections go.
    pub to: Arc<dyn Subscriber>,
}

impl Sub {
    /// Whether this is an unfiltered steal.
    fn is_plain_steal(&self) -> bool {
        self.subscription.mode == IncomingMode::Steal && self.filter.is_none()
    }
}

/// The subscriptions of one port, oldest first; replaced (never mutated) on change.
#[derive(Default)]
pub struct PortSubs {
    /// In the order they were made.
    pub subs: Vec<Arc<Sub>>,
}

impl PortSubs {
    /// The unfiltered steal, if any.
    pub fn plain_steal(&self) -> Option<&Arc<Sub>> {
        self.subs.iter().find(|s| s.is_plain_steal())
    }

    /// Unfiltered mirrors.
    pub fn plain_mirrors(&self) -> impl Iterator<Item = &Arc<Sub>> {
        self.subs
            .iter()
            .filter(|s| s.subscription.mode == IncomingMode::Mirror && s.filter.is_none())
    }

    /// Whether some subscription filters HTTP requests.
    pub fn has_filters(&self) -> bool {
        self.subs.iter().any(|s| s.filter.is_some())
    }

    /// The TLS termination of the oldest subscription that brought one.
    pub fn tls(&self) -> Option<Arc<tls::TlsSetup>> {
        self.subs.iter().find_map(|s| s.to.tls())
    }
}

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Whether a hub's subscriptions have redirect rules.
///
/// `Staged` → `Live` ([`Hub::go_live`]) → `Retired` ([`Hub::retire_rules`]); a hub
/// that takes nothing over starts `Live`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RulesState {
    /// Subscriptions are kept and routed, but no rule redirects their ports: the
    /// previous owner's rules still do, until it lets this hub go live.
    Staged,
    /// Every subscribed port is redirected to this hub.
    Live,
    /// This hub's owner handed the hub over: its rules are gone and never come
    /// back; it only relays the connections it already holds.
    Retired,
}

/// How a subscribed port reaches its subscriptions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortMode {
    /// Redirected to the agent ([`Redirector`]): steals, and mirrors where
    /// sniffing is not possible.
    Redirect,
    /// Only mirrored, copied off the packet path ([`sniff`]): the target's
    /// clients reach it directly.
    Sniff,
}

/// Whether the hub may sniff instead of redirect.
enum SniffState {
    /// Not needed yet.
    Untried,
    /// Capturing.
    Running(sniff::Sniffer),
    /// No packet socket here (no `CAP_NET_RAW`): mirrors pass through.
    Unavailable,
}

/// The redirector, the sniffer and the state of their rules, changed together.
struct Rules {
    redirector: Redirector,
    state: RulesState,
    sniff: SniffState,
    /// The mode of each port that has one.
    modes: HashMap<u16, PortMode>,
}

/// Whether `subs` can be served by sniffing: mirrors only, none of which needs
/// the traffic decrypted (TLS termination for HTTP filters, [`tls`]).
fn sniffable(subs: &[Arc<Sub>]) -> bool {
    subs.iter()
        .all(|s| s.subscription.mode == IncomingMode::Mirror)
        && !(subs.iter().any(|s| s.filter.is_some()) && subs.iter().any(|s| s.to.tls().is_some()))
}

impl Rules {
    /// The running sniffer, started on first use; `None` where packet sockets
    /// are not permitted.
    fn sniffer(&mut self, hub: &Weak<Hub>) -> Option<&sniff::Sniffer> {
        if matches!(self.sniff, SniffState::Untried) {
            self.sniff = match sniff::Sniffer::start(hub.clone()) {
                Ok(sniffer) => {
                    tracing::debug!("mirror: copying mirrored ports off the packet path");
                    SniffState::Running(sniffer)
                }
                Err(e) => {
                    tracing::debug!(
                        "mirror: no packet socket in the target's network ({e}); \
                         mirrored connections pass through the agent"
                    );
                    SniffState::Unavailable
                }
            };
        }
        match &self.sniff {
            SniffState::Running(sniffer) => Some(sniffer),
            _ => None,
        }
    }

    /// Puts `port` in the mode its subscriptions `subs` need: redirected when
    /// some steal (or sniffing is impossible), sniffed when only mirrored,
    /// neither when `subs` is empty. A port whose only subscription is an
    /// unfiltered steal of a session that takes a direct listener is
    /// redirected to one ([`crate::direct`]) when `may_start_direct`, and
    /// keeps the one it has while that stays so.
    ///
    /// Returns the direct listener's offer for `subs[0]` when one started.
    ///
    /// # Errors
    ///
    /// The redirect failed (the message is for the client); the port keeps its
    /// previous mode.
    async fn apply(
        &mut self,
        port: u16,
        subs: &[Arc<Sub>],
        hub: &Weak<Hub>,
        may_start_direct: bool,
    ) -> Result<Option<crate::direct::Offer>, crate::rules::RedirectError> {
        let current = self.modes.get(&port).copied();
        let direct = match subs {
            [only]
                if only.is_plain_steal()
                    && only.to.takes_listener(port)
                    && (may_start_direct || self.redirector.is_direct(port)) =>
            {
                Some(crate::direct::DirectFor {
                    owner: only.owner,
                    ipv6: only.to.takes_ipv6_listener(),
                })
            }
            _ => None,
        };
        let mut wanted = match subs {
            [] => None,
            _ if sniffable(subs) && self.sniffer(hub).is_some() => Some(PortMode::Sniff),
            _ => Some(PortMode::Redirect),
        };
        // A sniffed port's capture keeps the target's answers whole only while
        // a session reads them.
        let answers = subs.iter().any(|s| s.subscription.responses);
        if current == wanted && wanted.is_none() {
            return Ok(None);
        }
        if current == Some(PortMode::Sniff) && wanted == current {
            if let SniffState::Running(sniffer) = &self.sniff
                && let Err(e) = sniffer.watch(port, answers).await
            {
                tracing::debug!(
                    port,
                    "mirror: the capture of the answers is unchanged ({e})"
                );
            }
            return Ok(None);
        }
        if wanted == Some(PortMode::Sniff) {
            // Off the old mode first: a connection is copied once or not at all.
            if current == Some(PortMode::Redirect) {
                self.redirector.release(port).await;
            }
            let watched = match self.sniffer(hub) {
                Some(sniffer) => Some(sniffer.watch(port, answers).await),
                None => None,
            };
            match watched {
                Some(Ok(())) => tracing::info!(port, "mirroring off the packet path"),
                Some(Err(e)) => {
                    tracing::debug!(port, "mirror: cannot sniff ({e}); redirecting instead");
                    wanted = Some(PortMode::Redirect);
                }
                None => wanted = Some(PortMode::Redirect),
            }
        }
        let mut offer = None;
        if wanted == Some(PortMode::Redirect) {
            offer = self.redirector.redirect(port, direct).await?;
        }
        if current == Some(PortMode::Sniff)
            && wanted != Some(PortMode::Sniff)
            && let SniffState::Running(sniffer) = &self.sniff
        {
            sniffer.unwatch(port);
        }
        if current == Some(PortMode::Redirect) && wanted.is_none() {
            self.redirector.release(port).await;
        }
        match wanted {
            Some(mode) => self.modes.insert(port, mode),
            None => self.modes.remove(&port),
        };
        Ok(offer)
    }
}

/// The hub of one target: subscriptions, redirects and routing.
pub struct Hub {
    /// This hub, for the sniffer's lookups.
    me: Weak<Hub>,
    ports: RwLock<HashMap<u16, Arc<PortSubs>>>,
    rules: tokio::sync::Mutex<Rules>,
    next_owner: AtomicU64,
    /// Every routed connection, and the tasks that relay its parts.
    in_flight: TaskTracker,
}

impl Hub {
    /// Starts a hub whose rules live in `chain`; `rules_touched` is set before the
    /// first rule is installed. `rules` is [`RulesState::Live`], or
    /// [`RulesState::Staged`] for a hub that takes over from an owner handing it
    /// over.
    pub fn start(
        chain: String,
        rules_touched: Arc<std::sync::atomic::AtomicBool>,
        rules: RulesState,
    ) -> Arc<Hub> {
        let (tx, mut rx) = mpsc::channel::<Accepted>(1024);
        let hub = Arc::new_cyclic(|me| Hub {
            me: me.clone(),
            ports: RwLock::default(),
            rules: tokio::sync::Mutex::new(Rules {
                redirector: Redirector::new(chain, rules_touched, tx),
                state: rules,
                sniff: SniffState::Untried,
                modes: HashMap::new(),
            }),
            next_owner: AtomicU64::new(1),
            in_flight: TaskTracker::new(),
        });
        let weak = Arc::downgrade(&hub);
        tokio::spawn(async move {
            while let Some(accepted) = rx.recv().await {
                let Some(hub) = weak.upgrade() else { break };
                let subs = hub.port_subs(accepted.original.port());
                let tracker = hub.in_flight.clone();
                hub.in_flight.spawn(route(accepted, subs, tracker));
            }
        });
        hub
    }

    /// Redirects every subscribed port of a [`RulesState::Staged`] hub; nothing
    /// for a hub in another state. Failures are logged: the port's subscriptions
    /// stay, and their connections keep reaching the target.
    pub async fn go_live(&self) {
        let mut rules = self.rules.lock().await;
        if rules.state != RulesState::Staged {
            return;
        }
        rules.state = RulesState::Live;
        let ports: Vec<(u16, Arc<PortSubs>)> = self
            .ports
            .read()
            .expect("hub ports lock poisoned")
            .iter()
            .map(|(port, subs)| (*port, subs.clone()))
            .collect();
        for (port, subs) in ports {
            if let Err(e) = rules.apply(port, &subs.subs, &self.me, false).await {
                tracing::warn!(port, "could not redirect after the hub's take-over: {e}");
            }
        }
        tracing::info!("the hub's rules are live");
    }

    /// Removes every redirect rule for good and sniffs no new connection (the
    /// hub was handed over); the subscriptions stay, so connections already
    /// accepted (or being copied) are still routed.
    pub async fn retire_rules(&self) {
        let mut rules = self.rules.lock().await;
        rules.state = RulesState::Retired;
        let ports: Vec<u16> = rules.modes.keys().copied().collect();
        for port in ports {
            // Dropping every subscription's mode cannot fail.
            let _ = rules.apply(port, &[], &self.me, false).await;
        }
    }

    /// How many routed connections (and parts of them) are still relayed.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Waits until every connection this hub routed has ended, at most `max`;
    /// returns how many were still relayed when `max` ran out (0 when all ended).
    pub async fn drain(&self, max: Duration) -> usize {
        self.in_flight.close();
        match tokio::time::timeout(max, self.in_flight.wait()).await {
            Ok(()) => 0,
            Err(_) => self.in_flight.len(),
        }
    }

    /// A new owner id for a session's subscriptions.
    pub fn new_owner(&self) -> OwnerId {
        self.next_owner.fetch_add(1, Ordering::Relaxed)
    }

    fn port_subs(&self, port: u16) -> Option<Arc<PortSubs>> {
        self.ports
            .read()
            .expect("hub ports lock poisoned")
            .get(&port)
            .cloned()
    }

    /// Adds (or replaces) `owner`'s subscription of its port, made at `since`
    /// (seconds since the Unix epoch; now when `None` or in the future), which
    /// orders it among the port's other subscriptions: the oldest matching filter
    /// wins a request.
    ///
    /// # Errors
    ///
    /// The filter does not compile, the port is already stolen without a filter by
    /// another session (the message names it), or the redirect failed.
    pub async fn subscribe(
        &self,
        owner: OwnerId,
        client: &str,
        subscription: Subscription,
        to: Arc<dyn Subscriber>,
        since: Option<u64>,
    ) -> Result<(), SubscribeError> {
        let filter = match &subscription.filter {
            Some(spec) => {
                Some(
                    HttpFilter::compile(spec).map_err(|e| SubscribeError::BadFilter {
                        reason: e.to_string(),
                    })?,
                )
            }
            None => None,
        };
        let port = subscription.port;
        let sub = Arc::new(Sub {
            owner,
            client: client.to_owned(),
            since_unix: since.map_or_else(now_unix, |s| s.min(now_unix())),
            subscription,
            filter,
            to,
        });
        let mut rules = self.rules.lock().await;
        let current = self.port_subs(port).unwrap_or_default();
        if sub.is_plain_steal()
            && let Some(holder) = current
                .subs
                .iter()
                .find(|s| s.owner != owner && s.is_plain_steal())
        {
            return Err(SubscribeError::PortInUse {
                port,
                holder: holder.client.clone(),
                since_unix: holder.since_unix,
            });
        }
        let mut subs: Vec<Arc<Sub>> = current
            .subs
            .iter()
            .filter(|s| s.owner != owner)
            .cloned()
            .collect();
        subs.push(sub);
        let mut offer = None;
        if rules.state == RulesState::Live {
            offer = rules
                .apply(port, &subs, &self.me, true)
                .await
                .map_err(|e| SubscribeError::Redirect {
                    reason: e.to_string(),
                })?;
        }
        let sole = subs[0].to.clone();
        self.publish(port, subs);
        drop(rules);
        if let Some(offer) = offer {
            // Before the subscription's answer, which the session sends once
            // this returns: its program gets the listener with it.
            sole.pass_listener(port, offer).await;
        }
        Ok(())
    }

    /// Replaces the subscriptions of `port`; callers hold the redirector's lock,
    /// which orders changes with the rules they need.
    fn publish(&self, port: u16, mut subs: Vec<Arc<Sub>>) {
        // Oldest first (stable: same-second subscriptions keep their order).
        subs.sort_by_key(|s| s.since_unix);
        let mut ports = self.ports.write().expect("hub ports lock poisoned");
        if subs.is_empty() {
            ports.remove(&port);
        } else {
            ports.insert(port, Arc::new(PortSubs { subs }));
        }
    }

    /// Drops `owner`'s subscription of `port`; the port's redirect goes when no
    /// subscription is left.
    pub async fn unsubscribe(&self, owner: OwnerId, port: u16) {
        let mut rules = self.rules.lock().await;
        let Some(current) = self.port_subs(port) else {
            return;
        };
        let subs: Vec<Arc<Sub>> = current
            .subs
            .iter()
            .filter(|s| s.owner != owner)
            .cloned()
            .collect();
        if subs.len() == current.subs.len() {
            return;
        }
        if (rules.state == RulesState::Live || subs.is_empty())
            && let Err(e) = rules.apply(port, &subs, &self.me, false).await
        {
            tracing::warn!(
                port,
                "could not redirect port {port} for the remaining subscriptions: {e}"
            );
        }
        self.publish(port, subs);
    }

    /// Applies the subscriptions of `owner` again as they are: its session
    /// paused or resumed its direct listeners
    /// ([`Subscriber::takes_listener`]).
    pub async fn reapply(&self, owner: OwnerId) {
        let mut rules = self.rules.lock().await;
        if rules.state != RulesState::Live {
            return;
        }
        let ports: Vec<(u16, Arc<PortSubs>)> = self
            .ports
            .read()
            .expect("hub ports lock poisoned")
            .iter()
            .filter(|(_, p)| p.subs.iter().any(|s| s.owner == owner))
            .map(|(port, subs)| (*port, subs.clone()))
            .collect();
        let mut offers = Vec::new();
        for (port, subs) in ports {
            match rules.apply(port, &subs.subs, &self.me, true).await {
                Ok(Some(offer)) => offers.push((subs.subs[0].to.clone(), port, offer)),
                Ok(None) => {}
                Err(e) => tracing::warn!(port, "could not redirect port {port} again: {e}"),
            }
        }
        drop(rules);
        for (to, port, offer) in offers {
            to.pass_listener(port, offer).await;
        }
    }

    /// Drops every subscription of `owner`.
    pub async fn drop_owner(&self, owner: OwnerId) {
        let ports: Vec<u16> = self
            .ports
            .read()
            .expect("hub ports lock poisoned")
            .iter()
            .filter(|(_, p)| p.subs.iter().any(|s| s.owner == owner))
            .map(|(port, _)| *port)
            .collect();
        for port in ports {
            self.unsubscribe(owner, port).await;
        }
    }

    /// Every subscription, oldest first.
    pub fn list(&self) -> Vec<SessionListing> {
        let ports = self.ports.read().expect("hub ports lock poisoned");
        let mut all: Vec<SessionListing> = ports
            .values()
            .flat_map(|p| p.subs.iter())
            .map(|s| SessionListing {
                client: s.client.clone(),
                since_unix: s.since_unix,
                subscription: s.subscription.clone(),
            })
            .collect();
        all.sort_by_key(|l| (l.since_unix, l.subscription.port));
        all
    }
}

/// Routes one redirected connection; the parts it spawns run under `in_flight`.
async fn route(accepted: Accepted, subs: Option<Arc<PortSubs>>, in_flight: TaskTracker) {
    let Accepted {
        stream,
        peer,
        original,
    } = accepted;
    let meta = ConnMeta {
        port: original.port(),
        peer,
        local: original,
    };
    let Some(subs) = subs else {
        tracing::debug!(%peer, %original, "port no longer subscribed; connection refused");
        let _ = stream.set_zero_linger();
        return;
    };
    // The filters' servers, the pipes and the target's connect are boxed:
    // inline, their state (9 KiB in all) would be allocated and moved for
    // every connection, the stolen ones handed over whole too (now 0.6 KiB).
    if subs.has_filters() {
        match tls::detect(&stream).await {
            tls::Sniffed::Http if h1::eligible(&subs) => {
                Box::pin(h1::serve(stream, meta, subs, in_flight)).await;
                return;
            }
            tls::Sniffed::Http => {
                Box::pin(http::serve(stream, meta, subs, in_flight, None)).await;
                return;
            }
            tls::Sniffed::Tls => match subs.tls() {
                Some(setup) => {
                    Box::pin(tls::serve(stream, meta, subs, in_flight, setup)).await;
                    return;
                }
                None => tls::refuse_filters(&subs, meta.port),
            },
            tls::Sniffed::Other => {}
        }
    }
    pass_whole(stream, meta, &subs, &in_flight).await;
}

/// Sends a whole connection to the unfiltered stealer or to the target, with a
/// copy to every unfiltered mirror.
async fn pass_whole(stream: TcpStream, meta: ConnMeta, subs: &PortSubs, in_flight: &TaskTracker) {
    let mirrors = tee::start_mirrors(meta, subs.plain_mirrors(), in_flight);
    match subs.plain_steal() {
        Some(stealer) if mirrors.is_empty() => {
            if let Err(e) = stealer.to.clone().hand_over(meta, stream).await {
                tracing::debug!(peer = %meta.peer, "could not hand the connection over: {e}");
            }
        }
        Some(stealer) => match stealer.to.clone().open(meta).await {
            Ok(session) => Box::pin(tee::pipe(stream, session, mirrors)).await,
            Err(e) => {
                tracing::debug!(peer = %meta.peer, "could not open the session's connection: {e}");
                let _ = stream.set_zero_linger();
            }
        },
        None => match Box::pin(tee::connect_target(meta.local, meta.peer)).await {
            Ok(target) => Box::pin(tee::pipe(stream, Box::new(target), mirrors)).await,
            Err(e) => {
                tracing::debug!(target = %meta.local, "the target's server refused: {e}");
                let _ = stream.set_zero_linger();
            }
        },
    }
}
