use super::*;
use serde_json::json;

fn placement(mode: AgentMode) -> AgentPlacement {
    AgentPlacement {
        mode,
        namespace: "shop".into(),
        agent_pod: "api-1".into(),
        agent_container: "graft-agent-1".into(),
        target_namespace: "shop".into(),
        port_forward_pod: "api-1".into(),
        job: None,
    }
}

fn pod_with_agent(state: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": "api-1"},
        "status": {
            "phase": "Running",
            "ephemeralContainerStatuses": [{
                "name": "graft-agent-1", "ready": false, "restartCount": 0,
                "image": "graft-agent", "imageID": "", "state": state,
            }],
        },
    }))
    .expect("test pod is valid")
}

#[test]
fn agent_state_transitions() {
    let p = placement(AgentMode::Ephemeral);
    let no_status: Pod = serde_json::from_value(json!({"metadata": {"name": "api-1"}})).unwrap();
    assert_eq!(
        agent_state(Some(&no_status), &p),
        AgentState::Starting("no status yet".into())
    );
    assert_eq!(
        agent_state(
            Some(&pod_with_agent(
                json!({"waiting": {"reason": "ContainerCreating"}})
            )),
            &p
        ),
        AgentState::Starting("ContainerCreating".into())
    );
    assert_eq!(
        agent_state(Some(&pod_with_agent(json!({"running": {}}))), &p),
        AgentState::Running
    );
    assert_eq!(
        agent_state(
            Some(&pod_with_agent(json!({"waiting": {
                "reason": "ImagePullBackOff",
                "message": "Back-off pulling image \"graft-agent:0.1.0\""
            }}))),
            &p
        ),
        AgentState::Failed("ImagePullBackOff: Back-off pulling image \"graft-agent:0.1.0\"".into())
    );
    assert_eq!(
        agent_state(
            Some(&pod_with_agent(json!({"terminated": {
                "exitCode": 4, "reason": "Error", "message": "missing privileges\n"
            }}))),
            &p
        ),
        AgentState::Failed("exited with code 4 (Error): missing privileges".into())
    );
    assert!(matches!(agent_state(None, &p), AgentState::Failed(_)));
}

#[test]
fn node_mode_reads_container_statuses_and_pod_failures() {
    let p = placement(AgentMode::Node);
    let unschedulable: Pod = serde_json::from_value(json!({
        "metadata": {"name": "graft-agent-1"},
        "status": {
            "phase": "Pending",
            "conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "node(s) had untolerated taint",
            }],
        },
    }))
    .unwrap();
    assert_eq!(
        agent_state(Some(&unschedulable), &p),
        AgentState::Failed("Unschedulable: node(s) had untolerated taint".into())
    );
    let mut p = p;
    p.agent_container = "agent".into();
    let running: Pod = serde_json::from_value(json!({
        "metadata": {"name": "graft-agent-1"},
        "status": {"phase": "Running", "containerStatuses": [{
            "name": "agent", "ready": true, "restartCount": 0, "image": "a",
            "imageID": "", "state": {"running": {}},
        }]},
    }))
    .unwrap();
    assert_eq!(agent_state(Some(&running), &p), AgentState::Running);
}

#[test]
fn ready_line_gives_a_loopback_port() {
    assert_eq!(parse_ready_line("ready tcp:127.0.0.1:41234"), Some(41234));
    assert_eq!(parse_ready_line("ready tcp:[::1]:7\n"), Some(7));
    assert_eq!(parse_ready_line("ready tcp:10.0.0.1:80"), None);
    assert_eq!(parse_ready_line("ready unix:/run/x.sock"), None);
    assert_eq!(parse_ready_line("2026-01-01 INFO ready"), None);
}

#[test]
fn portforward_forbidden_names_the_verb_the_server_asked_for() {
    assert_eq!(
        portforward_permission("User \"bob\" cannot create resource \"pods/portforward\""),
        rbac::CREATE_PORTFORWARD
    );
    assert_eq!(
        portforward_permission("User \"bob\" cannot get resource \"pods/portforward\""),
        rbac::GET_PORTFORWARD
    );
}

#[test]
fn missing_subresource_is_told_apart_from_a_missing_pod() {
    let route = kube::Error::Api(
        kube::core::Status::failure(
            "the server could not find the requested resource",
            "NotFound",
        )
        .with_code(404)
        .boxed(),
    );
    assert!(is_missing_subresource(&route));
    let pod_gone = kube::Error::Api(
        kube::core::Status::failure("pods \"api-1\" not found", "NotFound")
            .with_code(404)
            .with_details(
                serde_json::from_value(json!({"name": "api-1", "kind": "pods"}))
                    .expect("valid status details"),
            )
            .boxed(),
    );
    assert!(!is_missing_subresource(&pod_gone));
}

/// `Condition` is what `await_condition` takes; make sure the closure
/// shape used in `wait_for_agent` satisfies it.
#[test]
fn settled_closure_is_a_condition() {
    fn takes<C: kube::runtime::wait::Condition<Pod>>(_: C) {}
    let p = placement(AgentMode::Ephemeral);
    takes(move |pod: Option<&Pod>| !matches!(agent_state(pod, &p), AgentState::Starting(_)));
}
