//! The fake kubelet: runs a container of a pod (the real `graft-agent` for an
//! agent image, an image pull failure for anything else), moves its state
//! `waiting` → `running` → `terminated`, records its output as the
//! container's log and removes a deleted pod once its containers exited.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;

use super::select::{random_hex, rfc3339};
use super::state::Ctr;
use super::{IMAGE_PATH, Log, Shared, jobs, key};
use crate::agent_bin;

pub(super) fn is_agent_image(image: &str) -> bool {
    image
        .rsplit('/')
        .next()
        .is_some_and(|last| last.starts_with("graft-agent"))
}

/// Runs one container of a pod: the real `graft-agent` for an agent image,
/// an image pull failure for anything else.
pub(super) async fn run_container(
    shared: Arc<Shared>,
    ns: String,
    pod: String,
    spec: Value,
    ephemeral: bool,
) {
    let name = spec["name"].as_str().unwrap_or("").to_owned();
    let image = spec["image"].as_str().unwrap_or("").to_owned();
    let ctr = Ctr {
        namespace: &ns,
        pod: &pod,
        name: &name,
        ephemeral,
        image: &image,
    };
    let field_path = Some(if ephemeral {
        format!("spec.ephemeralContainers{{{name}}}")
    } else {
        format!("spec.containers{{{name}}}")
    });
    shared.commit(|s| {
        s.set_container_state(
            &ctr,
            None,
            json!({"waiting": {"reason": "ContainerCreating"}}),
        );
    });
    if !is_agent_image(&image) {
        let message = format!(
            "Failed to pull image \"{image}\": rpc error: code = NotFound desc = failed to pull \
             and unpack image \"{image}\": not found"
        );
        shared.commit(|s| {
            s.event(&ns, &pod, field_path.clone(), "Warning", "Failed", &message);
            s.set_container_state(
                &ctr,
                None,
                json!({"waiting": {"reason": "ErrImagePull", "message": message}}),
            );
        });
        return;
    }
    let args: Vec<String> = spec["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    // `--target-pid 1`: in an ephemeral container, PID 1 of the target
    // container's PID namespace is the target itself (the real pid of the pod
    // the container was added to); in a pod of its own (a targetless agent),
    // PID 1 is the agent, in the pod's network. This fake's other pods share
    // the cluster network of the first bed's target namespace, so there it
    // becomes the first target's real pid.
    let target = shared.pod_of_agent(&pod, ephemeral, &args);
    // The bed's host stands for both the node and every client of the tests, so
    // the kubelet-probe exclusion (`--probe-source gateway`: the target's
    // default gateway is the host) would keep every test request from being
    // stolen; tests/tests/rules.rs covers it on its own.
    let mut kept = Vec::with_capacity(args.len());
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        if arg == "--probe-source" {
            it.next();
        } else if !arg.starts_with("--probe-source=") {
            kept.push(arg);
        }
    }
    let mut args = kept;
    {
        let real = target.target_pid.to_string();
        for i in 0..args.len() {
            if args[i] == "--target-pid=1" {
                args[i] = format!("--target-pid={real}");
            } else if args[i] == "--target-pid" && args.get(i + 1).map(String::as_str) == Some("1")
            {
                args[i + 1] = real.clone();
            }
        }
    }
    let mut command = tokio::process::Command::new(agent_bin());
    command
        .args(&args)
        .env_clear()
        .env("PATH", IMAGE_PATH)
        .env("HOSTNAME", &pod)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0);
    for var in spec["env"].as_array().into_iter().flatten() {
        if let (Some(k), Some(v)) = (var["name"].as_str(), var["value"].as_str()) {
            command.env(k, v);
        }
    }
    for (k, v) in &target.process_env {
        command.env(k, v);
    }
    let log_key = key(&ns, &pod, &name);
    shared.commit(|s| {
        s.logs.insert(log_key.clone(), Log::default());
        s.event(
            &ns,
            &pod,
            field_path.clone(),
            "Normal",
            "Pulled",
            &format!("Container image \"{image}\" already present on machine"),
        );
    });
    let container_id = random_hex(32);
    let started = rfc3339(SystemTime::now());
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            let message = format!("failed to start {}: {e}", agent_bin().display());
            shared.commit(|s| {
                s.event(&ns, &pod, field_path.clone(), "Warning", "Failed", &message);
                if let Some(log) = s.logs.get_mut(&log_key) {
                    log.done = true;
                }
                s.set_container_state(
                    &ctr,
                    Some(&container_id),
                    json!({"terminated": {"exitCode": 128, "reason": "StartError",
                                          "message": message, "startedAt": started,
                                          "finishedAt": started}}),
                );
            });
            return;
        }
    };
    let pid = child.id().unwrap_or(0);
    shared.commit(|s| {
        s.agents.insert(log_key.clone(), pid);
        s.event(
            &ns,
            &pod,
            field_path.clone(),
            "Normal",
            "Created",
            &format!("Created container: {name}"),
        );
        s.event(
            &ns,
            &pod,
            field_path.clone(),
            "Normal",
            "Started",
            &format!("Started container {name}"),
        );
        s.set_container_state(
            &ctr,
            Some(&container_id),
            json!({"running": {"startedAt": started}}),
        );
    });
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        child
            .stderr
            .take()
            .map(|e| Box::new(e) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
    ]
    .into_iter()
    .flatten()
    .map(|pipe| {
        let shared = shared.clone();
        let log_key = log_key.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(pipe);
            let mut line = Vec::new();
            loop {
                line.clear();
                match lines.read_until(b'\n', &mut line).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => shared.commit(|s| {
                        if let Some(log) = s.logs.get_mut(&log_key) {
                            log.text.extend_from_slice(&line);
                        }
                    }),
                }
            }
        })
    })
    .collect();
    let exit = child.wait().await;
    // The agent's watchdog inherits the pipes: give it a moment, not forever.
    for reader in readers {
        let _ = tokio::time::timeout(Duration::from_secs(2), reader).await;
    }
    let code = match exit {
        Ok(status) => {
            use std::os::unix::process::ExitStatusExt;
            status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
        }
        Err(_) => 255,
    };
    let finished = rfc3339(SystemTime::now());
    shared.commit(|s| {
        s.agents.remove(&log_key);
        let mut terminated = json!({
            "exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" },
            "startedAt": started, "finishedAt": finished,
            "containerID": format!("containerd://{container_id}"),
        });
        let log = s.logs.get_mut(&log_key).map(|log| {
            log.done = true;
            log.text.clone()
        });
        if code != 0
            && spec["terminationMessagePolicy"] == "FallbackToLogsOnError"
            && let Some(text) = log
        {
            let tail: Vec<&str> = std::str::from_utf8(&text)
                .unwrap_or("")
                .lines()
                .rev()
                .take(20)
                .collect();
            let message: Vec<&str> = tail.into_iter().rev().collect();
            terminated["message"] = json!(message.join("\n"));
        }
        s.set_container_state(
            &ctr,
            Some(&container_id),
            json!({ "terminated": terminated }),
        );
        // A pod being deleted goes once none of its containers runs.
        let deleting = s
            .get("pods", &ns, &pod)
            .is_some_and(|p| p["metadata"]["deletionTimestamp"].is_string());
        let others = s
            .agents
            .keys()
            .any(|(a_ns, a_pod, _)| *a_ns == ns && *a_pod == pod);
        if deleting && !others {
            s.remove("pods", &ns, &pod);
        }
    });
    if !ephemeral {
        jobs::pod_exited(&shared, &ns, &pod);
    }
}
