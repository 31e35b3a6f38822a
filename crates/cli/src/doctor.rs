//! `graft doctor`: checks whether graft can work against a cluster and
//! namespace, and prints a table of what it found and what to fix. The
//! checks themselves are `graft_kube::doctor`'s.

use clap::Args;
use graft_kube::doctor::{Check, DoctorOptions, any_failed, run_checks};
use graft_kube::manifest::default_agent_image;
use graft_kube::{AgentMode, ClientOptions, KubeTarget};

use crate::args::KubeFlags;
use crate::failure::Failure;

/// `graft doctor` flags.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// A Kubernetes target, `KIND/NAME[/container/NAME]`: resolve it and dry-run
    /// the agent beside it, which shows whether the cluster would admit it.
    #[arg(long, value_name = "TARGET")]
    pub target: Option<String>,
    /// Kubernetes access.
    #[command(flatten)]
    pub kube: KubeFlags,
    /// The agent placement to check: an `ephemeral` container in the pod
    /// (default), or a pod on the target's `node`.
    #[arg(long, value_name = "MODE", value_parser = ["ephemeral", "node"])]
    pub agent_mode: Option<String>,
    /// The agent image (default: graft's, tagged with its version).
    #[arg(long, value_name = "IMAGE")]
    pub agent_image: Option<String>,
    /// `secret/NAME`: check that this kubernetes.io/tls Secret (for TLS steal)
    /// may be read in the namespace.
    #[arg(long = "tls-cert", value_name = "secret/NAME")]
    pub tls_cert: Option<String>,
    /// Output format.
    #[command(flatten)]
    pub output: crate::output::OutputFlag,
}

/// The kubectl-style flags as `graft_kube` takes them.
pub fn client_options(flags: &KubeFlags) -> ClientOptions {
    ClientOptions {
        kubeconfig: flags.kubeconfig.clone(),
        context: flags.context.clone(),
        namespace: flags.namespace.clone(),
    }
}

/// Runs `graft doctor`: exit code 0 when no check fails, else 1.
pub async fn doctor(args: DoctorArgs) -> Result<u8, Failure> {
    let target = args
        .target
        .as_deref()
        .map(str::parse::<KubeTarget>)
        .transpose()
        .map_err(|e| Failure::usage_error(&e))?;
    let mode = match args.agent_mode.as_deref() {
        Some("node") => AgentMode::Node,
        _ => AgentMode::Ephemeral,
    };
    let options = DoctorOptions {
        target,
        mode,
        image: args.agent_image.unwrap_or_else(default_agent_image),
    };
    let mut checks = run_checks(&client_options(&args.kube), &options).await;
    if let Some(cert) = &args.tls_cert {
        let name = cert.strip_prefix("secret/").ok_or_else(|| {
            Failure::usage(format!(
                "--tls-cert {cert}: graft doctor checks Secrets only: pass secret/NAME"
            ))
        })?;
        match graft_kube::connect(&client_options(&args.kube)).await {
            Ok(cluster) => checks.push(graft_kube::tls_secret::check(&cluster, name).await),
            Err(e) => checks.push(Check {
                name: format!("TLS secret {name}"),
                verdict: graft_kube::Verdict::fail(e.to_string(), "fix the cluster access first"),
            }),
        }
    }
    if args.output.json() {
        crate::output::print_json(&crate::output::DoctorJson::new(&checks))?;
        return Ok(u8::from(any_failed(&checks)));
    }
    print!("{}", render_table(&checks));
    if any_failed(&checks) {
        println!("\ngraft doctor: some checks FAILED; fix them before running graft");
        Ok(1)
    } else {
        println!("\ngraft doctor: no check failed");
        Ok(0)
    }
}

/// The table: `CHECK  RESULT  DETAIL`, and under a row its fix.
pub fn render_table(checks: &[Check]) -> String {
    const HEAD: (&str, &str) = ("CHECK", "RESULT");
    let width = checks
        .iter()
        .map(|c| c.name.chars().count())
        .chain([HEAD.0.len()])
        .max()
        .unwrap_or(0);
    let result_width = 6;
    let mut out = format!("{:width$}  {:result_width$}  DETAIL\n", HEAD.0, HEAD.1);
    for check in checks {
        let v = &check.verdict;
        out.push_str(&format!(
            "{:width$}  {:result_width$}  {}\n",
            check.name,
            v.outcome.to_string(),
            v.detail
        ));
        if let Some(fix) = &v.fix {
            out.push_str(&format!(
                "{:width$}  {:result_width$}  fix: {fix}\n",
                "", ""
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::{Cli, Command};
    use clap::Parser;
    use graft_kube::doctor::Verdict;

    #[test]
    fn flags_parse() {
        let cli = Cli::try_parse_from([
            "graft",
            "doctor",
            "--target",
            "deploy/api",
            "-n",
            "shop",
            "--context",
            "kind",
            "--kubeconfig",
            "/k",
            "--agent-mode",
            "node",
            "--agent-image",
            "img:1",
        ])
        .unwrap();
        let Command::Doctor(args) = cli.command else {
            panic!("not graft doctor")
        };
        assert_eq!(args.target.as_deref(), Some("deploy/api"));
        assert_eq!(args.agent_mode.as_deref(), Some("node"));
        assert_eq!(args.agent_image.as_deref(), Some("img:1"));
        let o = client_options(&args.kube);
        assert_eq!(o.namespace.as_deref(), Some("shop"));
        assert_eq!(o.context.as_deref(), Some("kind"));
        assert_eq!(o.kubeconfig, Some("/k".into()));
        assert!(Cli::try_parse_from(["graft", "doctor", "--agent-mode", "sidecar"]).is_err());
    }

    #[test]
    fn table_aligns_and_puts_the_fix_under_its_row() {
        let checks = [
            Check {
                name: "cluster access".into(),
                verdict: Verdict::ok("connected"),
            },
            Check {
                name: "pod security".into(),
                verdict: Verdict::fail("enforce=baseline", "label it privileged"),
            },
        ];
        assert_eq!(
            render_table(&checks),
            "CHECK           RESULT  DETAIL\n\
             cluster access  ok      connected\n\
             pod security    FAIL    enforce=baseline\n\
             \x20                       fix: label it privileged\n"
        );
    }
}
