//! Stale chains: iptables chains whose agent and watchdog are both gone (the
//! container was OOM-killed, the whole cgroup was killed), removed by the next
//! agent that starts on the same target.
//!
//! Whether a chain's agent lives is told by a lock that the kernel releases
//! with the process: every agent binds the abstract Unix socket
//! `graft-rules/<chain>` in the target's network namespace (abstract names are
//! scoped to the network namespace, unix(7)) before it writes any rule, and its
//! watchdog inherits the socket. While either process lives the name is taken;
//! once both are gone, binding it succeeds, and the chain is stale.
//!
//! [`sweep`] lists the `GRAFT-` chains of both iptables flavours and both
//! families (every table, so the client-address `mangle` chain is found too)
//! and removes each whose lock it can take, with the policy rule and route
//! table that go with it. A process in the pod that
//! binds a lock name itself only keeps a dead chain in place — it could break
//! its own pod's traffic more simply — and can never make the agent remove a
//! live agent's chain.

use std::collections::BTreeSet;
use std::os::fd::OwnedFd;

use nix::errno::Errno;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, bind, socket};

use super::CHAIN_PREFIX;
use super::iptables::{self, Family, Flavour};

/// The abstract socket name that says `chain`'s agent is alive.
fn lock_name(chain: &str) -> String {
    format!("graft-rules/{chain}")
}

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error("the lock of {0} is held by another process")]
    Held(String),
    /// The socket could not be made.
    #[error("could not create the rules lock of {chain}: {errno}")]
    Socket {
        /// The chain.
        chain: String,
        /// What the kernel said.
        errno: Errno,
    },
}

/// Takes `chain`'s lock in the calling thread's network namespace; the lock is
/// held as long as the returned descriptor is open in some process.
///
/// # Errors
///
/// [`LockError::Held`] when another process holds the name, else
/// [`LockError::Socket`].
pub fn lock(chain: &str) -> Result<OwnedFd, LockError> {
    let err = |errno| LockError::Socket {
        chain: chain.to_owned(),
        errno,
    };
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(err)?;
    let addr = UnixAddr::new_abstract(lock_name(chain).as_bytes()).map_err(err)?;
    match bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr) {
        Ok(()) => Ok(fd),
        Err(Errno::EADDRINUSE) => Err(LockError::Held(chain.to_owned())),
        Err(e) => Err(err(e)),
    }
}

/// A fresh chain name whose lock this process now holds.
///
/// # Errors
///
/// [`LockError::Socket`] when no lock socket can be made at all.
pub fn new_locked_chain() -> Result<(String, OwnedFd), LockError> {
    let mut last = None;
    for _ in 0..8 {
        let chain = super::random_chain_name();
        match lock(&chain) {
            Ok(fd) => return Ok((chain, fd)),
            Err(e @ LockError::Held(_)) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("the loop ran and every name was held"))
}

/// The `GRAFT-` chains declared in an `iptables-save` dump (`:NAME - [0:0]`).
pub fn chains_in(dump: &str) -> BTreeSet<String> {
    dump.lines()
        .filter_map(|line| line.strip_prefix(':'))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter(|name| {
            name.strip_prefix(CHAIN_PREFIX)
                .is_some_and(|hex| hex.len() == 8 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        })
        .map(str::to_owned)
        .collect()
}

/// Removes every `GRAFT-` chain of the calling thread's network namespace
/// whose agent is gone, in both flavours and both families; returns how many
/// it removed.
pub async fn sweep() -> usize {
    let mut removed = 0;
    for flavour in [Flavour::Legacy, Flavour::Nft, Flavour::System] {
        let mut found = BTreeSet::new();
        for family in Family::ALL {
            if let Some(dump) = iptables::save(flavour, family).await {
                found.extend(chains_in(&dump));
            }
        }
        for chain in found {
            // Taking the lock proves the chain's agent and watchdog are gone;
            // holding it while removing keeps a new agent from reusing the name.
            let Ok(_held) = lock(&chain) else { continue };
            iptables::cleanup(flavour, &chain).await;
            // The chain's client-address rules (a mangle chain of the same name,
            // a policy rule and a route table derived from it) are not part of the
            // nat rules; without this they outlive the agent and mark the pod's
            // replies for a table nobody serves.
            let same = chain.clone();
            let _ =
                tokio::task::spawn_blocking(move || crate::transparent::cleanup_blocking(&same))
                    .await;
            tracing::info!(%chain, ?flavour, "removed the packet rules of a dead agent");
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dumps_name_only_graft_chains() {
        let dump = "*nat\n:PREROUTING ACCEPT [0:0]\n:GRAFT-0badcafe - [0:0]\n\
                    :GRAFT-xyz - [0:0]\n:KUBE-SERVICES - [0:0]\n\
                    -A PREROUTING -j GRAFT-0badcafe\nCOMMIT\n";
        assert_eq!(
            chains_in(dump).into_iter().collect::<Vec<_>>(),
            ["GRAFT-0badcafe"]
        );
    }

    #[test]
    fn a_held_lock_cannot_be_taken_twice_and_is_free_once_closed() {
        let (chain, held) = new_locked_chain().unwrap();
        assert!(matches!(lock(&chain), Err(LockError::Held(_))));
        drop(held);
        assert!(lock(&chain).is_ok());
    }
}
