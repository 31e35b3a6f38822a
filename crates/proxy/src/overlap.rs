//! Overlapping filters: when this session steals a port with an HTTP filter and
//! other sessions steal the same port with filters of their own, a request that
//! matches several filters goes to the session that subscribed first (the hub
//! keeps subscriptions oldest first and routes a request to the first filter
//! that matches; see the agent's `incoming` module). Filters are regular
//! expressions, so whether two of them can match one request is not decided
//! here: the session that came later is told, at start, which older sessions
//! win the requests both match.

use graft_protocol::incoming::{HttpFilterSpec, IncomingMode, SessionListing, clock};

/// The warning for a session that steals `port` with `mine`, given the hub's
/// `listing` (oldest first, this session included); `None` when no older
/// session steals the port with a filter.
pub fn notice(port: u16, mine: &HttpFilterSpec, listing: &[SessionListing]) -> Option<String> {
    let filtered_steals: Vec<&SessionListing> = listing
        .iter()
        .filter(|l| {
            l.subscription.port == port
                && l.subscription.mode == IncomingMode::Steal
                && l.subscription.filter.is_some()
        })
        .collect();
    // This session: the newest filtered steal of the port with this filter.
    let me = filtered_steals
        .iter()
        .rposition(|l| l.subscription.filter.as_ref() == Some(mine))?;
    let older: Vec<String> = filtered_steals[..me]
        .iter()
        .map(|l| {
            let filter = l
                .subscription
                .filter
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default();
            format!("{} ({filter}, since {})", l.client, clock(l.since_unix))
        })
        .collect();
    if older.is_empty() {
        return None;
    }
    Some(format!(
        "port {port} is also stolen with a filter by {}; a request that matches one of \
         those filters and this session's ({mine}) goes to the session that came first, \
         so this session gets only the requests that match its filter and none of theirs \
         (see `graft ls`)",
        older.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use graft_protocol::incoming::{Combine, FilterRule, Subscription};

    fn steal(client: &str, since: u64, port: u16, re: Option<&str>) -> SessionListing {
        SessionListing {
            client: client.into(),
            since_unix: since,
            subscription: Subscription {
                port,
                mode: IncomingMode::Steal,
                filter: re.map(|re| HttpFilterSpec {
                    combine: Combine::AllOf,
                    rules: vec![FilterRule::Header(re.into())],
                }),
                responses: false,
            },
        }
    }

    #[test]
    fn the_later_session_is_told_the_older_one_wins() {
        let listing = [
            steal("alice@a", 10, 80, Some(".*")),
            steal("carol@c", 11, 81, Some("x")),
            steal("dave@d", 11, 80, None),
            steal("bob@b", 12, 80, Some("x-user: bob")),
        ];
        let bob = listing[3].subscription.filter.clone().unwrap();
        let text = notice(80, &bob, &listing).expect("bob is warned");
        assert!(
            text.contains("alice@a (header~\".*\", since 00:00:10 UTC)"),
            "{text}"
        );
        assert!(!text.contains("carol") && !text.contains("dave"), "{text}");
        // alice came first: nothing to say to her.
        let alice = listing[0].subscription.filter.clone().unwrap();
        assert_eq!(notice(80, &alice, &listing), None);
    }
}
