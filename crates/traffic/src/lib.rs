//! graft's view of the HTTP traffic it handles.
//!
//! A session that mirrors a port with responses (see
//! `graft_protocol::incoming::Subscription::responses`) receives each connection
//! as a tapped stream: [`tap::read_tapped`] turns it into [`Exchange`]s (a request
//! and the target's response, parsed by [`http1`] within fixed limits), which a
//! command publishes on [`Exchanges`] or writes as a HAR 1.2 archive ([`har`]),
//! redacted before anything is written. [`diff`] compares two answers to the
//! same request: a replayed one with the recorded one, or (the shadow diff) the
//! local process's with the target's.
//!
//! ```text
//! agent ──tap frames──► tap::read_tapped ──► Exchange ──► Exchanges / har::Har
//! proxy ──tap chunks──► tap::read_chunks ──► Exchange ──► inspector (live page)
//! ```

pub mod clock;
pub mod diff;
pub mod exchange;
pub mod har;
pub mod http1;
pub mod inspector;
pub mod replay;
pub mod tap;

pub use exchange::{Body, Exchange, Exchanges, Origin, Request, Response, Route};
pub use har::{Har, Redaction};
pub use tap::{TapError, read_chunks, read_tapped};
