//! graft's layer: a shared library loaded into the user's process with
//! `LD_PRELOAD`. It exports libc's socket, name-resolution and file functions;
//! each export decides, on a fast path that never leaves the process, whether the
//! call concerns the target, and only then asks the proxy (over this thread's
//! Unix-socket connection, see [`client`]).
//!
//! Data enters through the hooked calls of the program and leaves as
//! [`graft_protocol::layer::LayerRequest`]s; everything the program gets back is a
//! real kernel file descriptor (a relay socket of the proxy, a memfd holding a
//! remote file), so nothing else of the program's I/O has to be hooked.
//!
//! Settings come from two environment variables the CLI sets:
//! `GRAFT_LAYER_SOCKET` (the proxy) and `GRAFT_LAYER_CONFIG` (JSON of
//! [`graft_config::LayerConfig`]). Without them the layer stays inert: every
//! export calls the real function.
//!
//! `unsafe` is this crate's job (C ABI exports, raw pointers from the program);
//! every block says why it is sound.

#![allow(unsafe_code)]
#![allow(clippy::missing_safety_doc)]

#[macro_use]
pub mod log;
#[macro_use]
mod real;
pub mod addr;
pub mod client;
mod dns;
mod exec;
pub mod fds;
mod files;
pub mod guard;
mod local_writes;
mod socket;

use std::{path::PathBuf, sync::OnceLock};

use graft_config::{FsRules, LayerConfig};

/// What the layer knows about its session; set once by the constructor.
#[derive(Debug)]
pub struct State {
    /// The proxy's Unix socket.
    pub socket_path: PathBuf,
    /// The session's settings.
    pub config: LayerConfig,
    fs_rules: OnceLock<FsRules>,
}

impl State {
    /// The file rules if a hook compiled them already: for the checks that run
    /// outside the re-entry guard, which must not compile them (compiling reads
    /// `/proc/self/exe`, through the hooks).
    pub fn fs_rules_ready(&self) -> Option<&FsRules> {
        self.fs_rules.get()
    }

    /// The file rules, compiled on first use (the CLI already checked they compile).
    pub fn fs_rules(&self) -> &FsRules {
        self.fs_rules.get_or_init(|| {
            let mut rules = FsRules::new(&self.config).unwrap_or_else(|_| {
                FsRules::new(&LayerConfig {
                    fs_local: vec![],
                    fs_remote: vec![],
                    ..self.config.clone()
                })
                .expect("rules without user regexes always compile")
            });
            // The program's own installation stays local: its directory, or the
            // parent of a `bin` directory (`/opt/app/bin/app` → `/opt/app`).
            if let Ok(exe) = std::fs::read_link("/proc/self/exe")
                && let Some(dir) = exe.parent()
            {
                let dir = if dir.ends_with("bin") {
                    dir.parent().unwrap_or(dir)
                } else {
                    dir
                };
                rules.add_local_dir(&dir.to_string_lossy());
            }
            rules
        })
    }
}

static STATE: OnceLock<State> = OnceLock::new();

/// The session state, or `None` when the layer is inert (not started by graft).
#[inline]
pub fn state() -> Option<&'static State> {
    STATE.get()
}

/// Reads the session settings. Runs before `main`: it must not start threads or
/// talk to the proxy (the first hook that needs the proxy connects).
#[ctor::ctor(unsafe)]
fn init() {
    let _guard = guard::enter();
    let Some(socket_path) = std::env::var_os(graft_protocol::layer::SOCKET_ENV) else {
        return;
    };
    let config = match std::env::var(graft_protocol::layer::CONFIG_ENV) {
        Ok(json) => match serde_json::from_str::<LayerConfig>(&json) {
            Ok(config) => config,
            Err(e) => {
                eprintln!(
                    "graft layer: ignoring malformed {}: {e}",
                    graft_protocol::layer::CONFIG_ENV
                );
                return;
            }
        },
        Err(_) => LayerConfig::default(),
    };
    log::init(&config);
    exec::init();
    socket::ahead::init();
    let _ = STATE.set(State {
        socket_path: socket_path.into(),
        config,
        fs_rules: OnceLock::new(),
    });
    layer_log!(debug, "layer loaded into pid {}", std::process::id());
}
