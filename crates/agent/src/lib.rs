//! `graft-agent`: runs beside the target process, enters its network namespace,
//! and serves one graft session over one link: it steals the target's incoming
//! traffic, makes connections and resolves names from the target's network, and
//! reads and writes files and the environment of the target.
//!
//! ```text
//! GRAFT_AGENT_SECRET=... graft-agent --target-pid PID --listen unix:/run/graft/S/agent.sock
//! ```
//!
//! Startup, in this order (see `docs/architecture.md`): check the target exists;
//! enter the target's network namespace on the main thread; take the rules lock
//! (see `rules::stale`) and fork the watchdog while the process has one thread;
//! open the target's root; build the async runtime (its threads inherit the
//! namespace); remove dead agents' stale rules in the background; listen (on
//! TCP: with TLS 1.3 and a key pair made for this run, whose certificate's
//! SHA-256 is printed first as `link-cert sha256:HEX`); print `ready <address>`
//! on stdout; accept one client (on TCP: the first that proves the session
//! secret inside TLS); serve it. On the way out every packet rule is removed and
//! every connection reset.
//!
//! Exit codes: 0 the session ran and ended; 1 any other failure; 2 bad arguments or
//! environment; 3 the target does not exist; 4 not allowed to enter the target's
//! namespaces; 5 no client connected in time; 6 the handshake failed (wrong secret,
//! incompatible version, not a graft client).
//!
//! The binary (`main.rs`) only parses [`Args`] and sets up logging; the work is
//! in this library, starting at [`run`].

mod args;
mod direct;
mod dns;
mod env;
mod files;
mod incoming;
mod limits;
mod ns;
mod outgoing;
mod passing;
mod relay;
mod rules;
mod session;
mod sockopt;
mod startup;
mod steal;
mod target;
mod target_id;
mod tcp_link;
mod transparent;
mod watchdog;

pub use args::Args;
pub use startup::{Failure, run};
