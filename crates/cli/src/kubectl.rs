//! `kubectl graft …`: graft as a kubectl plugin. kubectl runs `kubectl-graft`
//! from `PATH` with the words after `graft` (kubectl plugin mechanism,
//! <https://kubernetes.io/docs/tasks/extend-kubectl/kubectl-plugins/>);
//! `scripts/install` links `kubectl-graft` to `graft`. Invoked under that
//! name, graft accepts kubectl's global flags before the subcommand, as
//! kubectl users write them (`kubectl graft -n shop ls --target deploy/api`),
//! by moving them after it, where graft's own `-n/--namespace`, `--context`
//! and `--kubeconfig` take them. kubectl flags graft cannot honour
//! (`--cluster`, `--user`, `--token`, …) are refused by name rather than
//! ignored: the session would otherwise reach another cluster or identity
//! than the user asked for.

use std::ffi::{OsStr, OsString};
use std::path::Path;

use crate::failure::Failure;

/// The name kubectl finds graft under.
pub const PLUGIN_NAME: &str = "kubectl-graft";

/// kubectl's global flags that graft maps to its own (same names), each
/// taking a value.
const MAPPED: [&str; 4] = ["-n", "--namespace", "--context", "--kubeconfig"];

/// kubectl's global flags that pick a cluster, credentials or identity, which
/// graft has no equivalent of; with a value unless `=` carries it.
const REFUSED: [&str; 13] = [
    "--cluster",
    "--user",
    "--token",
    "--as",
    "--as-group",
    "--as-uid",
    "-s",
    "--server",
    "--username",
    "--password",
    "--client-certificate",
    "--client-key",
    "--certificate-authority",
];

/// Whether graft was started as `kubectl-graft`.
pub fn is_plugin(argv0: &OsStr) -> bool {
    Path::new(argv0).file_name() == Some(OsStr::new(PLUGIN_NAME))
}

/// The arguments for clap: unchanged unless graft runs as `kubectl-graft`,
/// then with kubectl's global flags moved after the subcommand.
///
/// # Errors
///
/// A usage failure for a kubectl flag graft cannot honour, or a mapped flag
/// without its value.
pub fn args(argv: impl IntoIterator<Item = OsString>) -> Result<Vec<OsString>, Failure> {
    let argv: Vec<OsString> = argv.into_iter().collect();
    let Some(argv0) = argv.first() else {
        return Ok(argv);
    };
    if !is_plugin(argv0) {
        return Ok(argv);
    }
    let mut moved = Vec::new();
    let mut rest = argv[1..].iter();
    let mut out = vec![argv0.clone()];
    while let Some(arg) = rest.next() {
        let text = arg.to_string_lossy();
        let (name, inline) = match text.split_once('=') {
            Some((name, value)) if name.starts_with("--") => (name, Some(value)),
            _ => (text.as_ref(), None),
        };
        if REFUSED.contains(&name) {
            return Err(Failure::usage(format!(
                "kubectl graft does not support kubectl's {name}: graft reaches the cluster \
                 through a kubeconfig context"
            ))
            .hint("pick the cluster and user with --context CONTEXT (see kubectl config get-contexts)"));
        }
        if MAPPED.contains(&name) {
            moved.push(OsString::from(name));
            match inline {
                Some(value) => moved.push(value.into()),
                None => moved.push(rest.next().cloned().ok_or_else(|| {
                    Failure::usage(format!("kubectl graft: {name} needs a value"))
                })?),
            }
            continue;
        }
        if let Some(value) = text
            .strip_prefix("-n")
            .filter(|v| !v.is_empty() && !text.starts_with("--"))
        {
            moved.extend(["-n".into(), value.into()]);
            continue;
        }
        // The first word that is not a kubectl flag is graft's subcommand (or a
        // flag of graft's own, `--help`, `--version`): the moved flags follow it.
        out.push(arg.clone());
        out.append(&mut moved);
        out.extend(rest.cloned());
        break;
    }
    if !moved.is_empty() {
        return Err(
            Failure::usage("kubectl graft: a command is missing after the kubectl flags")
                .hint("for example: kubectl graft -n shop ls --target deploy/api"),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Vec<String>, Failure> {
        args_strings(args.iter().map(OsString::from))
    }

    fn args_strings(argv: impl Iterator<Item = OsString>) -> Result<Vec<String>, Failure> {
        Ok(args(argv)?
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect())
    }

    #[test]
    fn graft_itself_is_untouched() {
        let argv = ["/usr/bin/graft", "-n", "shop", "ls"];
        assert_eq!(run(&argv).unwrap(), argv);
    }

    #[test]
    fn kubectl_flags_move_after_the_subcommand() {
        assert_eq!(
            run(&[
                "/usr/local/bin/kubectl-graft",
                "-n",
                "shop",
                "--context=kind",
                "--kubeconfig",
                "/k",
                "ls",
                "--target",
                "deploy/api",
            ])
            .unwrap(),
            [
                "/usr/local/bin/kubectl-graft",
                "ls",
                "-n",
                "shop",
                "--context",
                "kind",
                "--kubeconfig",
                "/k",
                "--target",
                "deploy/api"
            ]
        );
        assert_eq!(
            run(&["kubectl-graft", "-nshop", "--namespace=x", "doctor"]).unwrap(),
            ["kubectl-graft", "doctor", "-n", "shop", "--namespace", "x"]
        );
        // After the subcommand, graft parses them itself.
        let argv = [
            "kubectl-graft",
            "run",
            "-n",
            "shop",
            "--",
            "x",
            "--context",
            "y",
        ];
        assert_eq!(run(&argv).unwrap(), argv);
    }

    #[test]
    fn flags_graft_cannot_honour_are_refused() {
        for argv in [
            &["kubectl-graft", "--cluster", "c", "ls"][..],
            &["kubectl-graft", "--user=u", "ls"][..],
            &["kubectl-graft", "-n"][..],
            &["kubectl-graft", "-n", "shop"][..],
        ] {
            let err = run(argv).unwrap_err();
            assert_eq!(err.code, crate::failure::EXIT_USAGE, "{argv:?}");
        }
        assert!(
            run(&["kubectl-graft", "--user", "u", "ls"])
                .unwrap_err()
                .message
                .contains("--user")
        );
    }

    #[test]
    fn the_cli_parses_what_comes_out() {
        use crate::args::{Cli, Command};
        use clap::Parser;
        let argv = run(&[
            "kubectl-graft",
            "-n",
            "shop",
            "--context",
            "kind",
            "clean",
            "--dry-run",
        ])
        .unwrap();
        let Command::Clean(clean) = Cli::try_parse_from(argv).unwrap().command else {
            panic!("not graft clean")
        };
        assert_eq!(clean.kube.namespace.as_deref(), Some("shop"));
        assert_eq!(clean.kube.context.as_deref(), Some("kind"));
        assert!(clean.dry_run);
    }
}
