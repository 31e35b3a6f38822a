//! The command line, parsed by clap into raw flags; [`RunArgs::overrides`] hands
//! them to `graft_config`, which alone turns them into a resolved `Config`.

use std::{ffi::OsString, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};
use graft_config::{FsMode, RunOverrides};

/// graft runs a local command as if it were inside a target: the target's
/// incoming traffic, outgoing network, DNS, files and environment.
#[derive(Debug, Parser)]
#[command(name = "graft", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run CMD on this machine as if it were inside the target.
    #[command(
        override_usage = "graft run [OPTIONS] [--] <CMD>...",
        after_help = "Example:\n  sudo graft run --target pid:$(pgrep -f server) --steal -- python3 app.py"
    )]
    Run(Box<RunArgs>),
    /// List the graft sessions on a target: who holds which port, how, since when.
    #[command(after_help = "Example:\n  sudo graft ls --target pid:$(pgrep -f server)")]
    Ls(LsArgs),
    /// Write a container image archive of graft-agent (built without Docker) for
    /// `docker load`, `ctr images import` or `kind load image-archive`.
    #[command(
        after_help = "Example:\n  graft agent-image --output graft-agent.tar && kind load image-archive graft-agent.tar"
    )]
    AgentImage(AgentImageArgs),
    /// Check whether graft can work against a cluster and namespace: access,
    /// version, RBAC permissions, Pod Security, and with --target a dry run of
    /// the agent.
    #[command(after_help = "Example:\n  graft doctor -n shop --target deploy/api")]
    Doctor(crate::doctor::DoctorArgs),
    /// Remove the node-mode agent pods, `graft expose` Services and
    /// `--copy-target` copies crashed sessions left behind (restoring the
    /// workloads their `--scale-down` left at 0), and this machine's dead graft
    /// mounts.
    #[command(after_help = "Example:\n  graft clean -n shop")]
    Clean(crate::clean::CleanArgs),
    /// List what --target can name in a namespace: deployments, statefulsets,
    /// daemonsets and pods.
    #[command(after_help = "Example:\n  graft targets -n shop -o json")]
    Targets(crate::targets::TargetsArgs),
    /// The graft.toml JSON Schema, and a check of a config file.
    #[command(after_help = "Example:\n  graft config check graft.toml")]
    Config(crate::config::ConfigArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(after_help = "Example:\n  graft completions bash > /etc/bash_completion.d/graft")]
    Completions(crate::shell::CompletionsArgs),
    /// Print the man page (or write every page into a directory).
    #[command(after_help = "Example:\n  graft man | man -l -")]
    Man(crate::shell::ManArgs),
    /// Connect this whole machine to the cluster (or a `pid:` target's network):
    /// routes to its pod and Service ranges and its names, until `graft quit`.
    /// Needs root.
    #[command(after_help = "Example:\n  sudo graft connect -n shop && curl http://web.shop/")]
    Connect(Box<crate::connect::ConnectArgs>),
    /// Show what `graft connect` connected, and the running intercepts.
    Status(crate::connect::StatusArgs),
    /// End the connection and every intercept; restores DNS, removes the tun and
    /// its routes (also after a crash).
    Quit(crate::connect::QuitArgs),
    /// Send a target's incoming traffic on a port to a local port, for any
    /// program on this machine, until Ctrl-C or `graft leave`.
    #[command(
        after_help = "Example:\n  sudo graft intercept deploy/api --port 8080:80 --env-file api.env"
    )]
    Intercept(Box<crate::intercept::InterceptArgs>),
    /// End an intercept by name.
    Leave(crate::intercept::LeaveArgs),
    /// Mount the target's filesystem at an empty local directory (FUSE) until
    /// Ctrl-C, for programs graft's layer does not reach.
    #[command(
        after_help = "Example:\n  graft mount --target pid:$(pgrep -f server) /tmp/target-fs"
    )]
    Mount(crate::mount::MountArgs),
    /// Forward local ports to addresses and names as the target reaches them
    /// (`-L [ADDR:]PORT:HOST:PORT`, many at once), until Ctrl-C.
    #[command(
        after_help = "Example:\n  graft port-forward -n shop -L 8080:api.shop:80 -L 5432:db.shop:5432"
    )]
    PortForward(Box<crate::port_forward::PortForwardArgs>),
    /// Make a Service NAME in the cluster whose traffic reaches a local port,
    /// until Ctrl-C (its pod and Service are deleted on the way out).
    #[command(after_help = "Example:\n  graft expose 3000 --as web-dev -n shop --port 80")]
    Expose(Box<crate::expose::ExposeArgs>),
    /// Record the requests reaching a port of the target and the target's
    /// responses as a HAR 1.2 file (mirrored: the target keeps serving).
    #[command(
        after_help = "Example:\n  graft record --target deploy/api -n shop --port 8080 --duration 5m -o api.har"
    )]
    Record(Box<crate::record::RecordArgs>),
    /// Send the requests of a HAR file to a server (or to CMD, started first and
    /// stopped at the end) and compare each answer with the recorded one; exit 1
    /// when any differs.
    #[command(
        after_help = "Examples:\n  graft replay api.har --to http://127.0.0.1:8080 --ignore-header Date --ignore-json-path '$.id'\n  graft replay api.har --target deploy/api -n shop --ignore-header Date -- ./api"
    )]
    Replay(Box<crate::replay::ReplayArgs>),
    /// Serve the traffic inspector for the sessions already running on this
    /// machine: a web page on 127.0.0.1 (URL with a secret token printed) of
    /// each request, live, until Ctrl-C.
    #[command(after_help = "Example:\n  graft ui")]
    Ui(crate::ui::UiArgs),
}

/// `graft agent-image` flags.
#[derive(Debug, Args)]
pub struct AgentImageArgs {
    /// Where to write the image archive (a tar holding both the OCI image layout
    /// and the `docker save` layout).
    #[arg(long, short, value_name = "FILE.tar")]
    pub output: PathBuf,
    /// The image name [default: the image graft uses for its Kubernetes agent].
    #[arg(long, value_name = "NAME:TAG")]
    pub tag: Option<String>,
    /// The graft-agent binary to put in the image [default: the one graft runs].
    #[arg(long, value_name = "PATH")]
    pub agent: Option<PathBuf>,
}

/// `graft ls` flags.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// The target: `pid:PID`, or a Kubernetes workload `KIND/NAME` (a short-lived
    /// node-mode agent pod asks the pod's hub, then is deleted).
    #[arg(long, env = "GRAFT_TARGET", value_name = "TARGET")]
    pub target: Option<String>,
    /// Kubernetes access.
    #[command(flatten)]
    pub kube: KubeFlags,
    /// The agent image (default: graft's, tagged with its version).
    #[arg(long, value_name = "IMAGE")]
    pub agent_image: Option<String>,
    /// The agent image's pull policy: Always, IfNotPresent or Never.
    #[arg(long, value_name = "POLICY", value_parser = ["Always", "IfNotPresent", "Never"])]
    pub agent_pull_policy: Option<String>,
    /// Output format.
    #[command(flatten)]
    pub output: crate::output::OutputFlag,
}

/// How to reach a Kubernetes cluster, as kubectl's flags (shared by the
/// subcommands that talk to one).
#[derive(Debug, Clone, Default, Args)]
pub struct KubeFlags {
    /// The namespace of the target (default: the context's).
    #[arg(short = 'n', long, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
    /// The kubeconfig context to use (default: the current one).
    #[arg(long, value_name = "CONTEXT")]
    pub context: Option<String>,
    /// The kubeconfig file (default: KUBECONFIG, else ~/.kube/config, else the
    /// in-cluster service account).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
}

/// `graft run` flags.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The target: `pid:PID` (a local process, or a process of a container), a
    /// Kubernetes workload `KIND/NAME[/container/NAME]` (pod, deploy, sts, ds, rs,
    /// job, cronjob, rollout), or `targetless`.
    #[arg(long, env = "GRAFT_TARGET", value_name = "TARGET")]
    pub target: Option<String>,
    /// Kubernetes access.
    #[command(flatten)]
    pub kube: KubeFlags,
    /// How the agent is placed beside a Kubernetes target: an `ephemeral`
    /// container in the pod (default), or a pod on the target's `node`.
    #[arg(long, value_name = "MODE", value_parser = ["ephemeral", "node"])]
    pub agent_mode: Option<String>,
    /// The agent image (default: graft's, tagged with its version).
    #[arg(long, value_name = "IMAGE")]
    pub agent_image: Option<String>,
    /// The agent image's pull policy: Always, IfNotPresent or Never (default: the
    /// cluster's).
    #[arg(long, value_name = "POLICY", value_parser = ["Always", "IfNotPresent", "Never"])]
    pub agent_pull_policy: Option<String>,
    /// Place an agent on every ready pod of the workload and steal (or mirror) on
    /// all of them; outgoing traffic, names, files and environment come from the
    /// pod graft picks.
    #[arg(long)]
    pub all_pods: bool,
    /// Run the session against a copy of the target pod that graft creates (and
    /// deletes at the end) instead of the original: same spec, graft's labels
    /// (no Service selects it), no probes; a Job's or CronJob's copy is made from
    /// its pod template and sleeps instead of running the job.
    #[arg(long)]
    pub copy_target: bool,
    /// With --copy-target: scale the original Deployment, StatefulSet or
    /// ReplicaSet to 0 for the session, and back on every way out (`graft
    /// clean` restores it after a crash).
    #[arg(long, requires = "copy_target")]
    pub scale_down: bool,
    /// With --copy-target: the copy keeps the original's labels, so the Services
    /// that select the original send it traffic too.
    #[arg(long, requires = "copy_target")]
    pub copy_keep_labels: bool,
    /// Steal the target's incoming TCP traffic to the ports CMD listens on: it goes
    /// to CMD instead of the target.
    #[arg(long)]
    pub steal: bool,
    /// Mirror the target's incoming TCP traffic to the ports CMD listens on: the
    /// target keeps serving and CMD gets a copy; CMD's answers are dropped. The
    /// default unless graft.toml sets `[incoming] mode`.
    #[arg(long, conflicts_with = "steal")]
    pub mirror: bool,
    /// Take only HTTP requests with a header line `name: value` (name in lower
    /// case) matching REGEX, searched case-insensitively; `(?-i)` turns that off
    /// (repeatable; every filter flag must match).
    #[arg(long = "filter-header", value_name = "REGEX")]
    pub filter_header: Vec<String>,
    /// Take only HTTP requests whose path and query (e.g. `/api/users?id=7`) match
    /// REGEX (repeatable; every filter flag must match).
    #[arg(long = "filter-path", value_name = "REGEX")]
    pub filter_path: Vec<String>,
    /// Take only HTTP requests whose method is exactly METHOD, e.g. `GET`
    /// (repeatable; every filter flag must match).
    #[arg(long = "filter-method", value_name = "METHOD")]
    pub filter_method: Vec<String>,
    /// Take only HTTP requests whose body matches REGEX (`regex` crate syntax,
    /// searched in the raw bytes); a body longer than `--filter-body-limit` is
    /// routed by the other filter flags (repeatable; every filter flag must
    /// match).
    #[arg(long = "filter-body", value_name = "REGEX")]
    pub filter_body: Vec<String>,
    /// Take only HTTP requests whose JSON body holds VALUE at POINTER (RFC 6901),
    /// e.g. `/user/id=42` or `/user/name=alice` (VALUE is JSON, else a string;
    /// repeatable; every filter flag must match).
    #[arg(long = "filter-json", value_name = "POINTER=VALUE")]
    pub filter_json: Vec<String>,
    /// How much of a request body `--filter-body` and `--filter-json` look at,
    /// in KiB (1 to 1024) [default: 64].
    #[arg(long = "filter-body-limit", value_name = "KIB")]
    pub filter_body_limit: Option<u32>,
    /// The server's PEM certificate for a filtered port that serves HTTPS, or
    /// `secret/NAME` (a kubernetes.io/tls Secret of the target's namespace): the
    /// agent decrypts with it so the filters read each request.
    #[arg(long = "tls-cert", value_name = "FILE|secret/NAME")]
    pub tls_cert: Option<String>,
    /// The PEM private key of --tls-cert FILE.
    #[arg(long = "tls-key", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Accept any certificate from the target's own server when passing it the
    /// unmatched requests (default: it must be --tls-cert's or chain to it).
    #[arg(long = "tls-insecure-upstream")]
    pub tls_insecure_upstream: bool,
    /// Deliver matched HTTPS requests to CMD over TLS (default: plain HTTP).
    #[arg(long = "tls-local")]
    pub tls_local: bool,
    /// CMD listens on LOCAL; the target's REMOTE port is stolen or mirrored
    /// (repeatable).
    #[arg(long = "port-map", value_name = "LOCAL:REMOTE")]
    pub port_map: Vec<String>,
    /// Outgoing destinations that stay local besides loopback: a CIDR, an
    /// address, a name (`db.internal`, `*.corp.example`) or nothing, with an
    /// optional `:PORT` and `tcp://`/`udp://` prefix, e.g. `10.0.0.0/8`,
    /// `db.internal:5432`, `udp://:53` (repeatable; wins over
    /// `--outgoing-remote`).
    #[arg(long = "outgoing-local", value_name = "[PROTO://]HOST[:PORT]")]
    pub outgoing_local: Vec<String>,
    /// When given, only these outgoing destinations go through the target and
    /// the rest stay local; same forms as `--outgoing-local`, e.g.
    /// `*.svc.cluster.local` or `10.96.0.0/12` (repeatable).
    #[arg(long = "outgoing-remote", value_name = "[PROTO://]HOST[:PORT]")]
    pub outgoing_remote: Vec<String>,
    /// Names resolved by this machine's resolver instead of the target's:
    /// `host.example` or `*.example` (repeatable; wins over `--dns-remote`).
    #[arg(long = "dns-local", value_name = "NAME")]
    pub dns_local: Vec<String>,
    /// When given, only these names are resolved by the target's resolver and
    /// the rest by this machine's, e.g. `*.svc.cluster.local` (repeatable).
    #[arg(long = "dns-remote", value_name = "NAME")]
    pub dns_remote: Vec<String>,
    /// Take only the target's environment variables matching GLOB (repeatable).
    #[arg(long = "env-include", value_name = "GLOB")]
    pub env_include: Vec<String>,
    /// Never take the target's environment variables matching GLOB (repeatable).
    #[arg(long = "env-exclude", value_name = "GLOB")]
    pub env_exclude: Vec<String>,
    /// Start CMD with the local environment only.
    #[arg(long = "no-remote-env")]
    pub no_remote_env: bool,
    /// Files: `read` remote paths in the target (default), also `write` them, or
    /// keep every file `local`.
    #[arg(long, value_enum, value_name = "MODE")]
    pub fs: Option<FsArg>,
    /// Paths matching REGEX stay local (repeatable; wins over everything).
    #[arg(long = "fs-local", value_name = "REGEX")]
    pub fs_local: Vec<String>,
    /// Paths matching REGEX are remote (repeatable).
    #[arg(long = "fs-remote", value_name = "REGEX")]
    pub fs_remote: Vec<String>,
    /// Run CMD in its own network and mount namespace whose traffic graft's
    /// user-space TCP/IP stack sends out from the target: reaches any program,
    /// static and Go binaries included (the default for those). Needs
    /// unprivileged user namespaces, or root.
    #[arg(long, conflicts_with = "no_isolate")]
    pub isolate: bool,
    /// Always run CMD with the LD_PRELOAD layer, even a static or Go binary.
    #[arg(long = "no-isolate")]
    pub no_isolate: bool,
    /// Config file: TOML, or JSON / YAML by its extension [default: the first of
    /// ./graft.toml, ./graft.json, ./graft.yaml that exists].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Shadow diff (with --mirror, the default mode): compare CMD's answer to each
    /// mirrored HTTP/1.x request with the target's; counts in the terminal, each
    /// difference as a JSON line in --diff-out; exit 1 when any differs.
    #[arg(long, conflicts_with = "steal")]
    pub diff: bool,
    /// Where --diff writes its JSON lines [default: diff-ID.jsonl beside the
    /// session directory, printed at start].
    #[arg(long = "diff-out", value_name = "FILE", requires = "diff")]
    pub diff_out: Option<PathBuf>,
    /// With --diff: a response header not compared, e.g. `Date` (repeatable;
    /// case-insensitive).
    #[arg(long = "ignore-header", value_name = "NAME", requires = "diff")]
    pub ignore_header: Vec<String>,
    /// With --diff: a JSON path removed from both JSON bodies before they are
    /// compared, e.g. `$.id`, `items[*].created` (repeatable).
    #[arg(long = "ignore-json-path", value_name = "PATH", requires = "diff")]
    pub ignore_json_path: Vec<String>,
    /// With --diff: how long one side's answer may lag behind the other's before
    /// the request counts as unanswered, e.g. `10s` [default: 10s].
    #[arg(long = "diff-timeout", value_name = "DURATION", requires = "diff",
          value_parser = crate::shadow::parse_bound)]
    pub diff_timeout: Option<std::time::Duration>,
    /// Serve the traffic inspector: a web page on 127.0.0.1 (its URL, with a
    /// secret token, is printed at start) showing each request of this session
    /// and of this user's other sessions on this machine, live.
    #[arg(long)]
    pub ui: bool,
    /// The command to run, and its arguments (after `--`).
    #[arg(
        value_name = "CMD",
        required = true,
        num_args = 1..,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub command: Vec<OsString>,
}

/// `--fs` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FsArg {
    /// Remote paths are read in the target; writes stay local.
    Read,
    /// Remote paths are read and written in the target.
    Write,
    /// Files are never remote.
    Local,
}

impl From<FsArg> for FsMode {
    fn from(arg: FsArg) -> FsMode {
        match arg {
            FsArg::Read => FsMode::Read,
            FsArg::Write => FsMode::Write,
            FsArg::Local => FsMode::Local,
        }
    }
}

impl RunArgs {
    /// The flags as `graft_config` takes them.
    pub fn overrides(&self) -> RunOverrides {
        RunOverrides {
            target: self.target.clone(),
            steal: self.steal,
            mirror: self.mirror,
            filter_header: self.filter_header.clone(),
            filter_path: self.filter_path.clone(),
            filter_method: self.filter_method.clone(),
            filter_body: self.filter_body.clone(),
            filter_json: self.filter_json.clone(),
            filter_body_limit_kib: self.filter_body_limit,
            port_map: self.port_map.clone(),
            outgoing_local: self.outgoing_local.clone(),
            outgoing_remote: self.outgoing_remote.clone(),
            dns_local: self.dns_local.clone(),
            dns_remote: self.dns_remote.clone(),
            env_include: self.env_include.clone(),
            env_exclude: self.env_exclude.clone(),
            no_remote_env: self.no_remote_env,
            fs: self.fs.map(FsMode::from),
            isolate: match (self.isolate, self.no_isolate) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            },
            fs_local: self.fs_local.clone(),
            fs_remote: self.fs_remote.clone(),
            namespace: self.kube.namespace.clone(),
            context: self.kube.context.clone(),
            kubeconfig: self.kube.kubeconfig.clone(),
            agent_mode: self.agent_mode.clone(),
            agent_image: self.agent_image.clone(),
            agent_pull_policy: self.agent_pull_policy.clone(),
            all_pods: self.all_pods,
            tls: graft_config::tls::TlsFlags {
                cert: self.tls_cert.clone(),
                key: self.tls_key.clone(),
                insecure_upstream: self.tls_insecure_upstream,
                local: self.tls_local,
            },
            copy_target: self.copy_target,
            scale_down: self.scale_down,
            copy_keep_labels: self.copy_keep_labels,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> RunArgs {
        let cli = Cli::try_parse_from(args).unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not graft run: {args:?}")
        };
        *run
    }

    #[test]
    fn kubernetes_flags_parse() {
        let args = run(&[
            "graft",
            "run",
            "--target",
            "deploy/api",
            "-n",
            "shop",
            "--context",
            "kind",
            "--kubeconfig",
            "/tmp/kc",
            "--agent-mode",
            "node",
            "--agent-image",
            "img:1",
            "--",
            "true",
        ]);
        let o = args.overrides();
        assert_eq!(o.namespace.as_deref(), Some("shop"));
        assert_eq!(o.context.as_deref(), Some("kind"));
        assert_eq!(
            o.kubeconfig.as_deref(),
            Some(std::path::Path::new("/tmp/kc"))
        );
        assert_eq!(o.agent_mode.as_deref(), Some("node"));
        assert_eq!(o.agent_image.as_deref(), Some("img:1"));
        assert!(
            Cli::try_parse_from(["graft", "run", "--agent-mode", "sidecar", "--", "x"]).is_err()
        );
    }

    #[test]
    fn copy_target_flags_parse_and_scale_down_needs_it() {
        let args = run(&[
            "graft",
            "run",
            "--target",
            "deploy/api",
            "--copy-target",
            "--scale-down",
            "--copy-keep-labels",
            "--",
            "true",
        ]);
        let o = args.overrides();
        assert!(o.copy_target && o.scale_down && o.copy_keep_labels);
        for bad in ["--scale-down", "--copy-keep-labels"] {
            let err = Cli::try_parse_from(["graft", "run", bad, "--", "true"]).unwrap_err();
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::MissingRequiredArgument,
                "{err}"
            );
        }
    }

    #[test]
    fn ls_takes_a_target() {
        let cli = Cli::try_parse_from(["graft", "ls", "--target", "pid:7"]).unwrap();
        let Command::Ls(ls) = cli.command else {
            panic!("not graft ls")
        };
        assert_eq!(ls.target.as_deref(), Some("pid:7"));
    }

    #[test]
    fn agent_image_takes_output_tag_and_agent() {
        let cli = Cli::try_parse_from([
            "graft",
            "agent-image",
            "--output",
            "a.tar",
            "--tag",
            "x:1",
            "--agent",
            "/bin/agent",
        ])
        .unwrap();
        let Command::AgentImage(args) = cli.command else {
            panic!("not graft agent-image")
        };
        assert_eq!(args.output, PathBuf::from("a.tar"));
        assert_eq!(args.tag.as_deref(), Some("x:1"));
        assert_eq!(args.agent, Some(PathBuf::from("/bin/agent")));
        assert!(Cli::try_parse_from(["graft", "agent-image"]).is_err());
    }

    #[test]
    fn every_flag_maps_to_overrides() {
        let args = run(&[
            "graft",
            "run",
            "--target",
            "pid:7",
            "--steal",
            "--filter-header",
            "^x-user: alice$",
            "--filter-header",
            "x-b",
            "--filter-path",
            "^/api/",
            "--filter-method",
            "GET",
            "--port-map",
            "8080:80",
            "--port-map",
            "9090:90",
            "--outgoing-local",
            "10.0.0.0/8",
            "--env-include",
            "DB_*",
            "--env-exclude",
            "*_PASS",
            "--no-remote-env",
            "--fs",
            "write",
            "--fs-local",
            "^/etc/ssl/",
            "--fs-remote",
            "^/srv/",
            "--config",
            "x.toml",
            "--",
            "python3",
            "-m",
            "http.server",
        ]);
        assert_eq!(
            args.overrides(),
            RunOverrides {
                target: Some("pid:7".into()),
                steal: true,
                filter_header: vec!["^x-user: alice$".into(), "x-b".into()],
                filter_path: vec!["^/api/".into()],
                filter_method: vec!["GET".into()],
                port_map: vec!["8080:80".into(), "9090:90".into()],
                outgoing_local: vec!["10.0.0.0/8".into()],
                env_include: vec!["DB_*".into()],
                env_exclude: vec!["*_PASS".into()],
                no_remote_env: true,
                fs: Some(FsMode::Write),
                fs_local: vec!["^/etc/ssl/".into()],
                fs_remote: vec!["^/srv/".into()],
                // Conflicts with --steal; see `mirror_maps_to_overrides`.
                mirror: false,
                ..RunOverrides::default()
            }
        );
        assert_eq!(args.config, Some(PathBuf::from("x.toml")));
        assert_eq!(args.command, ["python3", "-m", "http.server"]);
    }

    #[test]
    fn command_flags_after_the_separator_belong_to_the_command() {
        let args = run(&[
            "graft", "run", "--target", "pid:7", "--", "ls", "--steal", "-l",
        ]);
        assert!(!args.steal);
        assert_eq!(args.command, ["ls", "--steal", "-l"]);
    }

    #[test]
    fn defaults_are_empty() {
        let args = run(&["graft", "run", "--target", "pid:1", "--", "true"]);
        assert_eq!(
            args.overrides(),
            RunOverrides {
                target: Some("pid:1".into()),
                ..RunOverrides::default()
            }
        );
    }

    #[test]
    fn mirror_maps_to_overrides() {
        let args = run(&["graft", "run", "--mirror", "--", "true"]);
        assert!(args.overrides().mirror);
        assert!(!args.overrides().steal);
    }

    #[test]
    fn steal_and_mirror_conflict() {
        let err =
            Cli::try_parse_from(["graft", "run", "--steal", "--mirror", "--", "true"]).unwrap_err();
        assert_eq!(
            err.kind(),
            clap::error::ErrorKind::ArgumentConflict,
            "{err}"
        );
    }

    #[test]
    fn missing_command_and_bad_fs_are_usage_errors() {
        for bad in [
            &["graft", "run", "--target", "pid:1"][..],
            &["graft", "run", "--fs", "cloud", "--", "true"][..],
        ] {
            let err = Cli::try_parse_from(bad).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{err}");
        }
    }
}
