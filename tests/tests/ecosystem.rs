//! Issue 15, graft in the user's shell and editor, without a cluster: the
//! bash completion script loads and completes subcommands and flags, the man
//! page renders with man-db, `graft config check` names the line of a
//! problem and `graft config schema` prints a schema that `docs/graft.schema.json`
//! matches, and `kubectl-graft` (the link `scripts/install` makes) maps
//! kubectl's global flags and refuses the ones graft cannot honour.

use std::process::Command;
use std::time::Duration;

use graft_tests::{Outcome, Proc, graft_bin, package_dir};

const TIMEOUT: Duration = Duration::from_secs(30);

fn graft(args: &[&str]) -> Outcome {
    let mut command = Command::new(graft_bin());
    command.args(args);
    Proc::spawn(command, &format!("graft {args:?}")).finish(TIMEOUT)
}

fn sh(program: &str, script: &str) -> Outcome {
    let mut command = Command::new(program);
    command.args(["-c", script]);
    Proc::spawn(command, &format!("{program} -c")).finish(TIMEOUT)
}

/// What bash completes after `words` (the last is the word being completed),
/// through the function `complete -p graft` names, as bash calls it.
fn bash_completions(words: &[&str]) -> Vec<String> {
    let graft = graft_bin();
    let line = words.join(" ");
    let array = words
        .iter()
        .map(|w| format!("'{w}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let script = format!(
        r#"set -e
source <('{graft}' completions bash)
spec="$(complete -p graft)"
func="$(printf '%s\n' "$spec" | sed -n 's/.*-F \([^ ]*\).*/\1/p')"
[ -n "$func" ] || {{ echo "no completion function in: $spec" >&2; exit 3; }}
COMP_WORDS=({array})
COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
COMP_LINE='{line}'
COMP_POINT=${{#COMP_LINE}}
"$func" graft "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
printf '%s\n' "${{COMPREPLY[@]}}"
"#,
        graft = graft.display()
    );
    let out = sh("bash", &script);
    assert!(out.success(), "bash completion failed\n{out}");
    out.lines().into_iter().map(str::to_owned).collect()
}

#[test]
fn bash_completion_loads_and_completes_subcommands_and_flags() {
    let subcommands = bash_completions(&["graft", "do"]);
    assert_eq!(subcommands, ["doctor"], "graft do<TAB>");
    let all = bash_completions(&["graft", ""]);
    for name in [
        "run",
        "ls",
        "doctor",
        "clean",
        "targets",
        "config",
        "completions",
        "man",
    ] {
        assert!(
            all.iter().any(|c| c == name),
            "graft <TAB> lacks {name}: {all:?}"
        );
    }
    let flags = bash_completions(&["graft", "clean", "--dr"]);
    assert_eq!(flags, ["--dry-run"], "graft clean --dr<TAB>");
    let values = bash_completions(&["graft", "ls", "--output", ""]);
    assert_eq!(values, ["text", "json"], "graft ls --output <TAB>");
}

#[test]
fn zsh_and_fish_scripts_name_graft() {
    for (shell, marker) in [("zsh", "#compdef graft"), ("fish", "complete -c graft")] {
        let out = graft(&["completions", shell]);
        assert!(
            out.success() && out.stdout.contains(marker),
            "{shell}\n{out}"
        );
    }
    let out = graft(&["completions", "tcsh"]);
    assert_eq!(out.code(), Some(2), "{out}");
}

#[test]
fn man_page_renders_with_man_db() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("graft.1");
    let out = graft(&["man"]);
    assert!(out.success(), "{out}");
    std::fs::write(&page, &out.stdout).unwrap();
    // man-db renders it as a reader would see it; warnings go to stderr.
    let script = format!(
        "MANWIDTH=100 MAN_KEEP_FORMATTING=0 man --warnings -l '{}' | col -b",
        page.display()
    );
    let shown = sh("sh", &script);
    assert!(shown.success(), "man -l failed\n{shown}");
    assert!(shown.stderr.trim().is_empty(), "man warns:\n{shown}");
    for text in [
        "NAME",
        "SYNOPSIS",
        "SUBCOMMANDS",
        "graft-run(1)",
        "graft-completions(1)",
    ] {
        assert!(
            shown.stdout.contains(text),
            "the page lacks {text}:\n{shown}"
        );
    }

    let pages = dir.path().join("man1");
    let out = graft(&["man", "--dir", pages.to_str().unwrap()]);
    assert!(out.success(), "{out}");
    for name in [
        "graft.1",
        "graft-run.1",
        "graft-config-check.1",
        "graft-targets.1",
    ] {
        assert!(
            pages.join(name).exists(),
            "graft man --dir did not write {name}"
        );
    }
    let run_page = sh(
        "sh",
        &format!(
            "MANWIDTH=100 man -l '{}' | col -b",
            pages.join("graft-run.1").display()
        ),
    );
    assert!(run_page.stdout.contains("--filter-header"), "{run_page}");
}

#[test]
fn config_check_names_the_line_and_accepts_the_example() {
    let example = package_dir().join("../docs/graft.example.toml");
    let out = graft(&["config", "check", example.to_str().unwrap()]);
    assert!(out.success(), "{out}");
    assert_eq!(out.lines(), [format!("{}: OK", example.display())], "{out}");

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("graft.toml");
    std::fs::write(
        &bad,
        "target = \"deploy/api\"\n\n[incoming]\nmode = \"steal\"\nport = 80\n",
    )
    .unwrap();
    let out = graft(&["config", "check", bad.to_str().unwrap()]);
    assert_eq!(out.code(), Some(2), "{out}");
    let expected = format!("graft: error: {}:5:1: unknown field `port`", bad.display());
    assert!(out.stderr.starts_with(&expected), "{out}");

    // Without FILE: ./graft.toml, then graft.json, graft.yaml.
    let json_only = tempfile::tempdir().unwrap();
    std::fs::write(
        json_only.path().join("graft.json"),
        "{\n  \"target\": \"deploy/api\",\n  \"fs\": {\"mode\": \"cloud\"}\n}\n",
    )
    .unwrap();
    let mut command = Command::new(graft_bin());
    command
        .current_dir(json_only.path())
        .args(["config", "check"]);
    let out = Proc::spawn(command, "graft config check").finish(TIMEOUT);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("graft.json:3:"), "{out}");
}

#[test]
fn the_committed_schema_is_the_one_graft_prints() {
    let out = graft(&["config", "schema"]);
    assert!(out.success(), "{out}");
    let printed: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let path = package_dir().join("../docs/graft.schema.json");
    let committed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(
        printed, committed,
        "docs/graft.schema.json is stale: graft config schema > docs/graft.schema.json"
    );
}

#[test]
fn kubectl_graft_maps_kubectl_flags_and_refuses_others() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("kubectl-graft");
    std::os::unix::fs::symlink(graft_bin(), &link).unwrap();
    let run = |args: &[&str]| {
        let mut command = Command::new(&link);
        command.args(args);
        Proc::spawn(command, &format!("kubectl-graft {args:?}")).finish(TIMEOUT)
    };
    let out = run(&["--cluster", "prod", "targets"]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains("--cluster") && out.stderr.contains("--context"),
        "{out}"
    );
    // The flags reach graft's own: a kubeconfig that does not exist is named.
    let missing = dir.path().join("no-such-kubeconfig");
    let out = run(&[
        "-n",
        "shop",
        "--kubeconfig",
        missing.to_str().unwrap(),
        "targets",
        "-o",
        "json",
    ]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("no-such-kubeconfig"), "{out}");
    let out = run(&["--version"]);
    assert!(out.success() && out.stdout.starts_with("graft "), "{out}");
}
