//! `graft run`: resolve the configuration, start the agent beside the target,
//! open the session, run CMD with the layer and the merged environment, and end
//! everything in order however CMD or the link ends.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::ExitStatus,
    time::Duration,
};

use graft_config::{Config, ConfigFile, LayerConfig, Target, env::merge_env};
use graft_protocol::{
    incoming::IncomingMode as PortMode,
    layer::{CONFIG_ENV, SOCKET_ENV},
    remote::{RemoteRequest, RemoteResponse},
};
use std::sync::Arc;

use graft_proxy::{Session, SessionOptions};
use nix::sys::signal::Signal;
use tokio::process::{Child, Command};

use crate::{
    agent::simple_level,
    args::RunArgs,
    cluster,
    failure::{EXIT_SESSION, Failure},
    isolate,
    locate::locate,
    open::{self, OpenRequest},
    process::{self, Signals},
    session_dir::{SessionDir, random_hex},
    shadow::{self, DiffRequest, Settle, Shadow},
};

/// What a session of `graft run` (or `graft replay -- CMD`) needs before its
/// agent starts: graft's other pieces, the private session directory, the
/// session secret and the `GRAFT_LOG` setting passed on.
pub(crate) struct Prepared {
    pub pieces: crate::locate::Pieces,
    pub dir: SessionDir,
    pub secret: String,
    pub graft_log: Option<String>,
}

/// Locates graft's pieces, creates the session directory and makes the secret.
///
/// # Errors
///
/// When a piece is missing, the directory cannot be made, or no randomness.
pub(crate) fn prepare() -> Result<Prepared, Failure> {
    let exe = std::env::current_exe().ok();
    let pieces = locate(exe.as_deref(), &|name| std::env::var_os(name))?;
    let uid = nix::unistd::getuid().as_raw();
    let dir = SessionDir::create(uid, std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from))?;
    let secret = random_hex(32)?;
    let graft_log = std::env::var("GRAFT_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    Ok(Prepared {
        pieces,
        dir,
        secret,
        graft_log,
    })
}

/// How long CMD may take to stop after SIGTERM before it is killed.
pub(crate) const CMD_GRACE: Duration = Duration::from_secs(5);
/// `--diff-timeout`'s default.
const DIFF_BOUND: Duration = Duration::from_secs(10);

/// Runs `graft run`; returns the exit code (CMD's, or 1 when the link was lost).
pub async fn run(args: RunArgs) -> Result<u8, Failure> {
    let flags = args.overrides();
    let file = load_file(args.config.as_deref())?;
    let cwd = std::env::current_dir().ok();
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let mut config = Config::resolve(&flags, &file, cwd.as_deref(), home.as_deref())?;
    let mut remote_env = !flags.no_remote_env && file.env.remote.unwrap_or(true);
    if config.target == Target::Kube(cluster::TARGETLESS.into()) {
        // A targetless agent has no workload: nothing comes in, its files and
        // environment are the agent image's own.
        if flags.steal || flags.mirror {
            return Err(Failure::usage(
                "a targetless session has no incoming traffic: drop --steal/--mirror",
            ));
        }
        config.layer.incoming = graft_config::IncomingMode::Off;
        config.layer.filter = None;
        config.incoming_defaulted = false;
        config.layer.fs = graft_config::FsMode::Local;
        remote_env = false;
    }

    // Before anything is placed: a failed start in a cluster costs an
    // ephemeral container that Kubernetes never removes.
    check_program(&args.command)?;
    let Prepared {
        pieces,
        dir,
        secret,
        graft_log,
    } = prepare()?;
    let plan = Plan {
        target: config.target.to_string(),
        config: &config,
        remote_env,
        layer: &pieces.layer,
        dir: dir.path(),
        command: &args.command,
        graft_log: graft_log.as_deref(),
        isolate: isolate::chosen(&config, &args.command),
        stdout_to_stderr: false,
    };
    let diff = diff_request(&args, &config, plan.isolate)?;
    let mut options = plan.session_options();
    options.tls = crate::tls::load(&config).await?;
    // The shadow diff's differences also appear in the inspector (rows marked DIFF).
    let differences = diff.as_ref().map(|request| request.differences.watch());
    let shadow = match diff {
        Some(request) => {
            let (shadow, conns_tx) = Shadow::start(request, plan.target.clone(), dir.path())?;
            options.tap_responses = true;
            options.tapped_listeners = Some(conns_tx);
            Some(shadow)
        }
        None => None,
    };
    // The session's requests for the inspector (`graft ui`, `--ui`): copied only
    // while somebody watches.
    let feed = crate::ui::session_feed(dir.path(), &plan.target, &args.command, &options)?;
    options.incoming_tap = Some(feed.tap());
    if let Some(mut differences) = differences {
        let feed = feed.feed();
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                match differences.recv().await {
                    Ok(difference) => match serde_json::to_value(&*difference) {
                        Ok(json) => feed.publish_difference(json),
                        Err(e) => tracing::debug!("a difference is not JSON: {e}"),
                    },
                    // The page misses what it could not keep up with; the file has all.
                    Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => break,
                }
            }
        });
    }
    let inspector = if args.ui {
        let running = crate::ui::start().await?;
        eprintln!("graft: inspector at {}", running.url());
        Some(running)
    } else {
        None
    };
    let opened = open::open(OpenRequest {
        config: &config,
        dir: dir.path(),
        agent_binary: &pieces.agent,
        secret: &secret,
        graft_log: graft_log.as_deref(),
        options,
    })
    .await;
    let opened = match opened {
        Ok(opened) => opened,
        Err(failure) => {
            if let Some(shadow) = shadow {
                shadow.abandon().await;
            }
            return Err(failure);
        }
    };
    // While somebody watches the inspector, every stolen connection passes
    // graft: the session's direct listeners pause before a watcher is shown
    // anything, and resume when the last one leaves.
    let pause = opened.session.pause_handle();
    let watched = Arc::new(feed.feed().watched_fn());
    let turn = Arc::new(tokio::sync::Mutex::new(()));
    feed.feed().on_watchers_changed(Arc::new(move || {
        let (pause, watched, turn) = (pause.clone(), watched.clone(), turn.clone());
        Box::pin(async move {
            let _turn = turn.lock().await;
            pause.set(watched()).await;
        })
    }));
    let settle = shadow.as_ref().map(Shadow::settle);
    let result = plan.run(opened.session, settle).await;
    // The link is closed by now: the agents remove their rules and exit.
    let link_lost = matches!(result, Ok(Ended::LinkLost) | Err(_));
    opened.agents.stop(link_lost).await;
    let differs = match shadow {
        Some(shadow) => Some(shadow.finish().await.differs()),
        None => None,
    };
    drop(inspector);
    drop(feed);
    drop(dir);
    result.map(|ended| match (ended, differs) {
        // With --diff the comparison is the verdict: 1 when anything differed,
        // else CMD's own failure, else 0 (Ctrl-C is how a shadow diff ends).
        (Ended::Command(status), Some(true)) if status.success() => 1,
        (Ended::Command(status), _) => process::exit_code(status),
        (Ended::Stopped(_), Some(differs)) => u8::from(differs),
        (Ended::Stopped(signal), None) => 128u8.wrapping_add(signal as u8),
        (Ended::LinkLost, _) => EXIT_SESSION,
    })
}

/// What `--diff` asks for, checked against the session it needs: a mirror, CMD
/// run with the layer (the shadow diff reaches CMD's listener).
///
/// # Errors
///
/// A usage failure for a steal, no incoming traffic, an HTTP filter, an isolated
/// CMD, or a bad `--ignore-json-path`.
fn diff_request(
    args: &RunArgs,
    config: &Config,
    isolate: bool,
) -> Result<Option<DiffRequest>, Failure> {
    if !args.diff {
        return Ok(None);
    }
    if config.layer.incoming.subscription_mode() != Some(PortMode::Mirror) {
        return Err(Failure::usage(
            "--diff compares CMD's answers with the target's: it needs --mirror (the target keeps answering)",
        )
        .hint("drop --steal (or the config file's [incoming] mode) and run with --mirror --diff"));
    }
    if config.layer.filter.is_some() {
        // The agent sends a filtered port's mirrors the client's bytes only.
        return Err(Failure::usage(
            "--diff compares whole connections: the --filter-* flags do not go with it",
        )
        .hint("drop the --filter-* flags (and the config file's filter)"));
    }
    if isolate {
        return Err(Failure::usage(
            "--diff runs CMD with the LD_PRELOAD layer; this CMD would run isolated",
        )
        .hint("add --no-isolate (a static or Go binary cannot be shadowed yet)"));
    }
    let ignore =
        graft_traffic::diff::ignore_from_flags(&args.ignore_header, &args.ignore_json_path)
            .map_err(Failure::usage)?;
    Ok(Some(DiffRequest {
        out: args.diff_out.clone(),
        ignore,
        bound: args.diff_timeout.unwrap_or(DIFF_BOUND),
        differences: graft_traffic::diff::Differences::new(),
    }))
}

/// Checks that CMD's program exists and may be executed, as `execvp(3)` would
/// look for it (a name without `/` in each directory of `PATH`).
///
/// # Errors
///
/// A usage failure naming the program, with what to do.
pub(crate) fn check_program(command: &[OsString]) -> Result<(), Failure> {
    use std::os::unix::fs::PermissionsExt;
    let Some(program) = command.first() else {
        return Err(Failure::usage("no command to run: add it after `--`"));
    };
    let runnable = |path: &Path| {
        std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let shown = Path::new(program).display().to_string();
    if program.as_encoded_bytes().contains(&b'/') {
        let path = Path::new(program);
        if runnable(path) {
            return Ok(());
        }
        let why = if path.exists() {
            "is not an executable file"
        } else {
            "does not exist"
        };
        return Err(Failure::usage(format!("cannot run {shown}: it {why}"))
            .hint("check the path of the command after `--`"));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|dir| runnable(&dir.join(program))) {
        return Ok(());
    }
    Err(
        Failure::usage(format!("cannot run {shown}: command not found in PATH"))
            .hint("install it, or give its path (e.g. ./app); nothing was started"),
    )
}

pub(crate) fn load_file(explicit: Option<&Path>) -> Result<ConfigFile, Failure> {
    match explicit {
        Some(path) => Ok(ConfigFile::load(path)?),
        None => {
            if let Some(default) = graft_config::schema::default_file(Path::new(".")) {
                let file = ConfigFile::load(&default)?;
                // A forgotten file would silently change what a run does.
                let shown = std::fs::canonicalize(&default).unwrap_or(default);
                eprintln!(
                    "graft: using {} (--config FILE picks another)",
                    shown.display()
                );
                Ok(file)
            } else {
                Ok(ConfigFile::default())
            }
        }
    }
}

/// How a session ended.
pub(crate) enum Ended {
    /// CMD exited by itself.
    Command(ExitStatus),
    /// graft was told to stop by this signal (Ctrl-C: SIGINT) and stopped CMD:
    /// graft exits with 128 + its number, as shells report it.
    Stopped(Signal),
    /// The link to the agent died; CMD was stopped.
    LinkLost,
}

/// [`Ended::LinkLost`], said once, when the link had already ended as CMD
/// exited: its end resets CMD's relayed connections, which may be why CMD
/// exited, and `select!` picks at random between two ready branches. `None`
/// while the link is up.
pub(crate) fn lost_before_exit(session: &Session, status: ExitStatus) -> Option<Ended> {
    let reason = session.link_end()?;
    eprintln!("graft: lost the link to the agent ({reason}); CMD exited ({status})");
    Some(Ended::LinkLost)
}

/// Everything a session needs once the agent runs (`graft run`'s, and `graft
/// replay -- CMD`'s).
pub(crate) struct Plan<'a> {
    /// The target as the user wrote it, for messages.
    pub(crate) target: String,
    pub(crate) config: &'a Config,
    pub(crate) remote_env: bool,
    pub(crate) layer: &'a Path,
    pub(crate) dir: &'a Path,
    pub(crate) command: &'a [OsString],
    pub(crate) graft_log: Option<&'a str>,
    /// Run CMD in an isolated namespace instead of with the layer.
    pub(crate) isolate: bool,
    /// CMD writes its standard output to graft's standard error (graft's own
    /// output is a report: `graft replay -o json`).
    pub(crate) stdout_to_stderr: bool,
}

impl Plan<'_> {
    /// The proxy session's options: the incoming mode and filter.
    pub(crate) fn session_options(&self) -> SessionOptions {
        let layer = &self.config.layer;
        SessionOptions {
            incoming_mode: layer
                .incoming
                .subscription_mode()
                .unwrap_or(PortMode::Steal),
            filter: layer.filter.clone(),
            incoming_defaulted: self.config.incoming_defaulted,
            port_map: layer.port_map.iter().map(|m| (m.local, m.remote)).collect(),
            outgoing_local: layer.outgoing_local.clone(),
            ..SessionOptions::default()
        }
    }

    /// Runs CMD under `session` until it exits, a signal stops it or the link is
    /// lost, then closes the session; with a shadow diff (`settle`), a CMD that
    /// exited leaves the session open until the last comparisons have the
    /// target's answers (at most [`shadow::SETTLE`]).
    async fn run(&self, session: Session, settle: Option<Settle>) -> Result<Ended, Failure> {
        eprintln!("graft: agent ready for {}", self.target);
        let env = self.environment(&session).await?;
        if self.isolate {
            let isolated = isolate::Isolated {
                config: self.config,
                dir: self.dir,
                command: self.command,
                env,
            };
            return isolate::run(isolated, session).await;
        }
        // Registered before CMD starts, so no signal in between is lost.
        let mut signals = Signals::new()?;
        let mut child = self.start_with_layer(&session, env)?;
        let closed = session.closed();
        let ended = tokio::select! {
            status = child.wait() => {
                let status = status.map_err(|e| {
                    Failure::session(format!("cannot wait for the command: {e}"))
                })?;
                // A terminal's Ctrl-C reaches CMD and graft together: CMD may
                // end before graft reads its signal. Only a CMD that died of a
                // signal (or exited 128+N, as shells report one) can have beaten
                // it; any other exit looks once without waiting, so a plain run
                // does not end 50 ms late.
                let died_of_signal = std::os::unix::process::ExitStatusExt::signal(&status)
                    .is_some()
                    || status.code().is_some_and(|code| code > 128);
                let grace = if died_of_signal {
                    Duration::from_millis(50)
                } else {
                    Duration::ZERO
                };
                match tokio::time::timeout(grace, signals.recv()).await {
                    Ok(received) => Ended::Stopped(received),
                    Err(_) => lost_before_exit(&session, status).unwrap_or_else(|| {
                        self.explain_exit(&session, status);
                        Ended::Command(status)
                    }),
                }
            }
            received = signals.recv() => {
                tracing::info!(signal = ?received, "stopping the command");
                // A terminal's Ctrl-C has reached CMD already (same process group).
                let signalled = received == Signal::SIGINT && process::in_foreground();
                stop(&mut child, &mut signals, signalled).await?;
                Ended::Stopped(received)
            }
            reason = closed => {
                eprintln!("graft: lost the link to the agent ({reason}); stopping CMD");
                stop(&mut child, &mut signals, false).await?;
                Ended::LinkLost
            }
        };
        if let (Ended::Command(_), Some(settle)) = (&ended, settle) {
            settle.wait(shadow::SETTLE).await;
        }
        session.close().await;
        Ok(ended)
    }

    /// Serves the layer's socket and starts CMD with the layer and `env` (see
    /// [`Plan::environment`]).
    ///
    /// # Errors
    ///
    /// A failure naming the socket or the command that could not be started.
    pub(crate) fn start_with_layer(
        &self,
        session: &Session,
        env: Vec<(OsString, OsString)>,
    ) -> Result<Child, Failure> {
        let layer_socket = self.dir.join("layer.sock");
        session
            .serve_layer(&layer_socket)
            .map_err(|e| Failure::session_error(&e))?;
        self.spawn(env, &layer_socket)
    }

    /// Says when CMD failed after the agent refused one of its ports: a program
    /// whose `listen` failed usually exits on that, and the refusal is the cause.
    fn explain_exit(&self, session: &Session, status: ExitStatus) {
        let refused = session.refused_ports();
        if status.success() || refused.is_empty() {
            return;
        }
        let ports: Vec<String> = refused.iter().map(u16::to_string).collect();
        let how = match (
            status.code(),
            std::os::unix::process::ExitStatusExt::signal(&status),
        ) {
            (Some(code), _) => format!("with code {code}"),
            (None, Some(signal)) => format!("on signal {signal}"),
            (None, None) => "abnormally".to_owned(),
        };
        eprintln!(
            "graft: CMD exited {how} after the target's port {} was refused to it (see above)",
            ports.join(", ")
        );
    }

    /// The local environment with the target's laid over it by the rules.
    pub(crate) async fn environment(
        &self,
        session: &Session,
    ) -> Result<Vec<(OsString, OsString)>, Failure> {
        // merge_env works on UTF-8; local variables that are not stay as they are.
        let (local, not_utf8): (Vec<_>, Vec<_>) = std::env::vars_os()
            .map(|(k, v)| match (k.into_string(), v.into_string()) {
                (Ok(k), Ok(v)) => Ok((k, v)),
                (k, v) => Err((
                    k.map_or_else(|k| k, OsString::from),
                    v.map_or_else(|v| v, OsString::from),
                )),
            })
            .partition(Result::is_ok);
        let local: Vec<(String, String)> = local.into_iter().flatten().collect();
        let not_utf8 = not_utf8.into_iter().filter_map(Result::err);
        let merged = if self.remote_env {
            let failed = |why: String| {
                Failure::session(format!(
                    "cannot read the environment of {}: {why}",
                    self.target
                ))
                .hint("pass --no-remote-env to start the command with the local environment only")
            };
            match session.remote(RemoteRequest::Env).await {
                Ok(RemoteResponse::Env(remote)) => merge_env(local, &remote, &self.config.env),
                Ok(RemoteResponse::Error(e)) => return Err(failed(e.to_string())),
                Ok(other) => return Err(failed(format!("unexpected answer {other:?}"))),
                Err(e) => return Err(failed(e.to_string())),
            }
        } else {
            local
        };
        Ok(merged
            .into_iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .chain(not_utf8)
            .collect())
    }

    fn layer_config(&self) -> LayerConfig {
        let mut layer = self.config.layer.clone();
        layer.log_file = Some(
            std::env::var_os("GRAFT_LAYER_LOG")
                .filter(|p| !p.is_empty())
                .map_or_else(|| self.dir.join("layer.log"), PathBuf::from),
        );
        layer.log_level = match self.graft_log {
            Some(filter) => simple_level(filter).unwrap_or("debug").to_owned(),
            None => "warn".to_owned(),
        };
        layer
    }

    fn spawn(&self, env: Vec<(OsString, OsString)>, layer_socket: &Path) -> Result<Child, Failure> {
        let (program, args) = self.command.split_first().expect("clap requires CMD");
        let layer_config = serde_json::to_string(&self.layer_config())
            .expect("the layer configuration always serialises to JSON");
        let preload = ld_preload(
            self.layer,
            env.iter().find(|(k, _)| k == "LD_PRELOAD").map(|(_, v)| v),
        );
        let mut command = Command::new(program);
        command
            .args(args)
            .env_clear()
            .envs(env)
            .env("LD_PRELOAD", preload)
            .env(SOCKET_ENV, layer_socket)
            .env(CONFIG_ENV, layer_config);
        process::die_with_parent(&mut command);
        if self.stdout_to_stderr {
            command.stdout(stderr_copy()?);
        }
        command.spawn().map_err(|e| {
            let name = Path::new(program).display();
            match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
                    Failure::usage(format!("cannot run `{name}`: {e}"))
                        .hint("check the command name and that it is on your PATH and executable")
                }
                _ => Failure::session(format!("cannot run `{name}`: {e}")),
            }
        })
    }
}

/// A copy of graft's standard error, for a child's standard output.
///
/// # Errors
///
/// A session failure when the descriptor cannot be duplicated.
pub(crate) fn stderr_copy() -> Result<std::process::Stdio, Failure> {
    use std::os::fd::AsFd;
    std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map(std::process::Stdio::from)
        .map_err(|e| Failure::session(format!("cannot pass standard error on to CMD: {e}")))
}

/// `LD_PRELOAD` with the layer first, before any library already preloaded.
fn ld_preload(layer: &Path, existing: Option<&OsString>) -> OsString {
    let mut preload = layer.as_os_str().to_owned();
    if let Some(existing) = existing.filter(|e| !e.is_empty()) {
        preload.push(":");
        preload.push(existing);
    }
    preload
}

/// Stops CMD and what it started ([`process::Tree`]): sends them SIGTERM
/// unless `signalled` (a terminal's Ctrl-C reached the whole process group
/// already), waits for CMD and kills it after [`CMD_GRACE`], or at once on a
/// second signal; then ends what CMD left running the same way.
pub(crate) async fn stop(
    child: &mut Child,
    signals: &mut Signals,
    signalled: bool,
) -> Result<ExitStatus, Failure> {
    // Looked up before CMD can exit: its orphans would belong to init.
    let tree = process::Tree::of(child);
    if !signalled {
        process::signal(child, Signal::SIGTERM);
        tree.signal(Signal::SIGTERM);
    }
    let mut cut = false;
    let status = tokio::select! {
        status = process::wait_or_kill(child, CMD_GRACE) => status,
        _ = signals.recv() => {
            cut = true;
            let _ = child.start_kill();
            child.wait().await
        }
    };
    let grace = if cut { Duration::ZERO } else { CMD_GRACE };
    tree.end(grace, async {
        signals.recv().await;
    })
    .await;
    status.map_err(|e| Failure::session(format!("cannot wait for the command: {e}")))
}

/// `user@host`, for the agent's messages.
/// `user@host` of whoever runs graft: the user behind `sudo` when there is one.
pub(crate) fn client_name() -> String {
    let user = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| format!("uid{}", nix::unistd::getuid().as_raw()));
    let host = graft_proc::hostname().unwrap_or_else(|| "localhost".into());
    format!("{user}@{host}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_goes_first_in_ld_preload() {
        let layer = Path::new("/opt/graft/libgraft_layer.so");
        assert_eq!(
            ld_preload(layer, None),
            OsString::from("/opt/graft/libgraft_layer.so")
        );
        assert_eq!(
            ld_preload(layer, Some(&OsString::from("libasan.so"))),
            OsString::from("/opt/graft/libgraft_layer.so:libasan.so")
        );
        assert_eq!(
            ld_preload(layer, Some(&OsString::new())),
            OsString::from("/opt/graft/libgraft_layer.so")
        );
    }

    #[test]
    fn a_bad_config_file_is_a_usage_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("graft.toml");
        std::fs::write(&path, "bogus = 1").unwrap();
        let err = load_file(Some(&path)).unwrap_err();
        assert_eq!(err.code, crate::failure::EXIT_USAGE);
        assert!(err.message.contains("graft.toml"), "{}", err.message);
        let missing = load_file(Some(&dir.path().join("nope.toml"))).unwrap_err();
        assert_eq!(missing.code, crate::failure::EXIT_USAGE);
    }
}
