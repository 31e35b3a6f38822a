//! Item 4 of issue 2, environment: CMD starts with the target process's environment
//! laid over the local one; `--env-include` / `--env-exclude` globs choose what
//! comes over; the variables of the local machine and session (PATH, HOME, TERM,
//! SHELL, USER, ...) stay local unless named exactly; `--no-remote-env` keeps the
//! local environment as it is.

use std::collections::BTreeMap;

use graft_tests::Bed;

/// Runs `env` under graft with `flags`, with a few local variables set, and returns
/// the environment CMD saw.
fn env_under_graft(bed: &Bed, flags: &[&str]) -> BTreeMap<String, String> {
    let target = format!("pid:{}", bed.target_pid);
    let mut args = vec!["run", "--target", target.as_str()];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--", "env"]);
    let mut command = bed.graft(&args);
    command
        .env("GRAFT_TEST_OVERLAY", "local")
        .env("GRAFT_TEST_LOCAL_ONLY", "still-here")
        .env("TERM", "local-term")
        .env("SHELL", "/bin/local-shell")
        .env("USER", "local-user")
        .env("HOME", "/root");
    let out = bed.finish(
        bed.spawn(command, "graft run -- env"),
        graft_tests::RUN_TIMEOUT,
    );
    out.assert_success()
        .stdout
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn get<'a>(env: &'a BTreeMap<String, String>, key: &str) -> Option<&'a str> {
    env.get(key).map(String::as_str)
}

#[test]
fn target_environment_is_laid_over_the_local_environment() {
    let bed = Bed::new();
    let env = env_under_graft(&bed, &[]);
    assert_eq!(get(&env, "GRAFT_TEST_MARKER"), Some(bed.marker.as_str()));
    let database = format!("postgres://db.graft.test:5432/app-{}", bed.n);
    assert_eq!(get(&env, "DATABASE_URL"), Some(database.as_str()));
    assert_eq!(get(&env, "APP_MODE"), Some("target"));
    assert_eq!(
        get(&env, "GRAFT_TEST_OVERLAY"),
        Some("remote"),
        "the target's value wins"
    );
    assert_eq!(get(&env, "GRAFT_TEST_LOCAL_ONLY"), Some("still-here"));
}

#[test]
fn machine_and_session_variables_stay_local() {
    let bed = Bed::new();
    let env = env_under_graft(&bed, &[]);
    let local_path = std::env::var("PATH").unwrap();
    assert_eq!(get(&env, "PATH"), Some(local_path.as_str()));
    assert_eq!(get(&env, "HOME"), Some("/root"));
    assert_eq!(get(&env, "TERM"), Some("local-term"));
    assert_eq!(get(&env, "SHELL"), Some("/bin/local-shell"));
    assert_eq!(get(&env, "USER"), Some("local-user"));
}

#[test]
fn env_include_glob_brings_only_matching_target_variables() {
    let bed = Bed::new();
    let env = env_under_graft(&bed, &["--env-include", "GRAFT_TEST_*"]);
    assert_eq!(get(&env, "GRAFT_TEST_MARKER"), Some(bed.marker.as_str()));
    assert_eq!(get(&env, "GRAFT_TEST_OVERLAY"), Some("remote"));
    assert_eq!(get(&env, "DATABASE_URL"), None);
    assert_eq!(get(&env, "APP_MODE"), None);
    assert_eq!(get(&env, "GRAFT_TEST_LOCAL_ONLY"), Some("still-here"));
}

#[test]
fn env_include_is_repeatable() {
    let bed = Bed::new();
    let env = env_under_graft(
        &bed,
        &["--env-include", "DATABASE_*", "--env-include", "APP_MODE"],
    );
    assert!(get(&env, "DATABASE_URL").is_some());
    assert_eq!(get(&env, "APP_MODE"), Some("target"));
    assert_eq!(get(&env, "GRAFT_TEST_MARKER"), None);
}

#[test]
fn env_exclude_glob_drops_matching_target_variables() {
    let bed = Bed::new();
    let env = env_under_graft(
        &bed,
        &[
            "--env-exclude",
            "DATABASE_*",
            "--env-exclude",
            "GRAFT_TEST_OVER*",
        ],
    );
    assert_eq!(get(&env, "DATABASE_URL"), None);
    assert_eq!(
        get(&env, "GRAFT_TEST_OVERLAY"),
        Some("local"),
        "excluded: the local value stays"
    );
    assert_eq!(get(&env, "GRAFT_TEST_MARKER"), Some(bed.marker.as_str()));
    assert_eq!(get(&env, "APP_MODE"), Some("target"));
}

#[test]
fn env_include_naming_a_session_variable_exactly_brings_it_over() {
    let bed = Bed::new();
    let env = env_under_graft(
        &bed,
        &["--env-include", "TERM", "--env-include", "GRAFT_TEST_*"],
    );
    assert_eq!(get(&env, "TERM"), Some("target-term"));
    assert_eq!(get(&env, "SHELL"), Some("/bin/local-shell"));
}

#[test]
fn no_remote_env_keeps_the_local_environment() {
    let bed = Bed::new();
    let env = env_under_graft(&bed, &["--no-remote-env"]);
    assert_eq!(get(&env, "GRAFT_TEST_MARKER"), None);
    assert_eq!(get(&env, "DATABASE_URL"), None);
    assert_eq!(get(&env, "GRAFT_TEST_OVERLAY"), Some("local"));
    assert_eq!(get(&env, "GRAFT_TEST_LOCAL_ONLY"), Some("still-here"));
}
