//! Live cluster (see `graft_tests::cluster`): TLS steal with the certificate
//! from a `kubernetes.io/tls` Secret. The pod serves HTTPS with the Secret
//! mounted; `graft run --steal --filter-header ... --tls-cert secret/NAME` reads
//! the Secret with the user's kubeconfig and sends it to the agent over the
//! session link; curl on this machine (`--cacert` of the test CA) gets its
//! matching requests answered by the local program over plain HTTP and the
//! others by the pod over TLS. `graft doctor --tls-cert secret/NAME` checks that
//! the Secret may be read.

use std::process::Command;
use std::time::Duration;

use graft_tests::cluster::{APP_PORT, Live, SESSION_TIMEOUT, app_pod_serving, local_server};
use graft_tests::pki::{HOST, Pki};
use graft_tests::{Proc, wait_until};
use k8s_openapi::ByteString;
use serde_json::json;

/// The header filter of the session.
const ALICE: &str = "x-user: alice";

/// Who answered `curl https://HOST:APP_PORT/PATH` sent to `addr` (empty when
/// curl failed).
fn served_by(ca: &str, addr: std::net::SocketAddr, path: &str, headers: &[&str]) -> String {
    let resolve = format!("{HOST}:{APP_PORT}:{}", addr.ip());
    let mut command = Command::new("curl");
    command.args([
        "-sS",
        "--http1.1",
        "--max-time",
        "5",
        "--cacert",
        ca,
        "--resolve",
        &resolve,
    ]);
    command.args(["-o", "/dev/null", "-D", "-"]);
    for header in headers {
        command.args(["-H", header]);
    }
    let out = command
        .arg(format!("https://{HOST}:{APP_PORT}{path}"))
        .output()
        .expect("curl runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case("x-served-by"))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default()
}

#[test]
fn e2e_tls_steal_with_a_certificate_from_a_secret() {
    let Some(live) = Live::get() else { return };
    let ns = live.namespace("tls");
    let pki = Pki::new(None);
    let read = |name: &str| ByteString(std::fs::read(pki.path(name)).unwrap());
    ns.apply(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": "api-tls"},
        "data": {"tls.crt": read("server.crt"), "tls.key": read("server.key")},
    }));
    let port = APP_PORT.to_string();
    let mut pod = app_pod_serving(
        &live,
        &[
            "python3",
            "-u",
            "/fixtures/named_http.py",
            "pod",
            &port,
            "/tls/tls.crt",
            "/tls/tls.key",
        ],
    );
    pod["volumes"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "tls", "secret": {"secretName": "api-tls"}}));
    for container in pod["containers"].as_array_mut().unwrap() {
        container["volumeMounts"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "tls", "mountPath": "/tls", "readOnly": true}));
    }
    ns.apply(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "api", "labels": {"app": "api"}}, "spec": pod}));
    ns.wait_ready("app=api", 1);
    let addr = ns.app_addr("app=api");
    let ca = pki.path("ca.pem");

    // graft doctor says the Secret may be read.
    let doctor = ns
        .graft("doctor")
        .args(["--tls-cert", "secret/api-tls"])
        .output()
        .expect("graft doctor runs");
    let table = String::from_utf8_lossy(&doctor.stdout);
    let line = table
        .lines()
        .find(|l| l.starts_with("TLS secret api-tls"))
        .unwrap_or_else(|| panic!("no Secret check\n{table}"));
    assert!(line.contains("ok"), "{table}");

    let session = ns.run(
        "pod/api",
        &[
            "--steal",
            "--filter-header",
            ALICE,
            "--tls-cert",
            "secret/api-tls",
        ],
        &local_server("local", ""),
    );
    let routed = wait_until(SESSION_TIMEOUT, Duration::from_millis(300), || {
        (served_by(&ca, addr, "/probe", &[ALICE]) == "local").then_some(())
    });
    assert!(
        routed.is_some(),
        "never stolen\n{}",
        session.output_report()
    );
    assert_eq!(served_by(&ca, addr, "/other", &[]), "pod");
    assert_eq!(served_by(&ca, addr, "/mine", &[ALICE]), "local");
    let report = session.output_report();
    let key_line = pki.key_line();
    assert!(
        !report.contains(&key_line),
        "the key leaked into graft's output"
    );
    end(session);
}

/// Interrupts graft and waits for it.
fn end(session: Proc) {
    let out = graft_tests::cluster::interrupt(session);
    assert!(out.code().is_some(), "{out}");
}
