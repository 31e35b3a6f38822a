//! The local end of a graft session.
//!
//! A [`Session`] owns the one link to the agent beside the target (any byte
//! stream: a Unix socket to a local agent, a port-forward to one in a cluster) and
//! multiplexes over it everything the user's program does remotely: every layer
//! connection's requests, stolen incoming connections and outgoing connections.
//!
//! ```no_run
//! # async fn run() -> Result<(), graft_proxy::ProxyError> {
//! use graft_protocol::remote::{RemoteRequest, RemoteResponse};
//!
//! let stream = tokio::net::UnixStream::connect("/run/graft/s1/agent.sock").await.unwrap();
//! let session = graft_proxy::Session::connect(stream, "secret", "me@host").await?;
//! if let RemoteResponse::Env(vars) = session.remote(RemoteRequest::Env).await? {
//!     println!("{} remote variables", vars.len());
//! }
//! session.serve_layer("/run/graft/s1/layer.sock".as_ref())?;
//! let why = session.closed().await;
//! eprintln!("link ended: {why}");
//! # Ok(()) }
//! ```
//!
//! Modules: `session` (the link, its tasks and shared state), `layer` (the layer
//! socket), `flows` (connections for front ends without the layer: a user-space
//! stack, port-forward, intercept), `splice` (byte paths of each connection),
//! `tap` (a copy of delivered connections for the inspector), `error`.

mod error;
mod flows;
mod layer;
mod overlap;
mod session;
mod splice;
mod tap;

pub use error::{LinkEnd, ProxyError};
pub use flows::{Delivery, IncomingTcp, LocalStream, OutgoingTcp, OutgoingUdp};
pub use session::direct::{DIRECT_ENV, PAUSE_WAIT, PauseHandle};
pub use session::{AgentInfo, Session, SessionOptions};
pub use tap::{IncomingTap, ROUTES_POLL, TAP_QUEUE, TappedConnection};
