//! A pod's events, read when the agent does not start so the error can show
//! why (`Failed: Failed to pull image …`, `FailedScheduling: …`).
//!
//! One `list` of core/v1 events (GA everywhere) with a field selector on the
//! pod; [`format_events`] turns them into lines, oldest first, keeping only
//! the pod's own events and those of the agent's container.

use k8s_openapi::api::core::v1::Event;
use kube::Client;
use kube::api::{Api, ListParams};

use crate::{KubeError, rbac};

/// At most this many events are shown.
pub const MAX_EVENTS: usize = 10;

/// The recent events of `pod`, formatted by [`format_events`]. With
/// `container`, events about the pod's other containers are left out.
///
/// # Errors
///
/// [`KubeError::Forbidden`] without `list events`, or another API failure.
pub async fn pod_events(
    client: &Client,
    namespace: &str,
    pod: &str,
    container: Option<&str>,
) -> Result<Vec<String>, KubeError> {
    let api: Api<Event> = Api::namespaced(client.clone(), namespace);
    let params = ListParams::default().fields(&format!(
        "involvedObject.kind=Pod,involvedObject.name={pod}"
    ));
    let events = api
        .list(&params)
        .await
        .map_err(|e| KubeError::from_api(e, rbac::LIST_EVENTS, namespace, "pod", pod))?;
    Ok(format_events(events.items, container))
}

/// Formats events as `Warning Failed: message (x3)`, oldest first, the last
/// [`MAX_EVENTS`]. With `container`, keeps pod-level events and those whose
/// `fieldPath` names that container (`spec.ephemeralContainers{NAME}`,
/// `spec.containers{NAME}`).
pub fn format_events(mut events: Vec<Event>, container: Option<&str>) -> Vec<String> {
    if let Some(container) = container {
        let wanted = format!("{{{container}}}");
        events.retain(|e| match e.involved_object.field_path.as_deref() {
            None | Some("") => true,
            Some(path) => path.ends_with(&wanted),
        });
    }
    // Events carry one of three timestamps depending on who wrote them.
    let when = |e: &Event| {
        e.last_timestamp
            .as_ref()
            .map(|t| t.0)
            .or_else(|| e.event_time.as_ref().map(|t| t.0))
            .or_else(|| e.metadata.creation_timestamp.as_ref().map(|t| t.0))
    };
    events.sort_by_key(when);
    let skip = events.len().saturating_sub(MAX_EVENTS);
    events
        .iter()
        .skip(skip)
        .map(|e| {
            let mut line = format!(
                "{} {}: {}",
                e.type_.as_deref().unwrap_or("Normal"),
                e.reason.as_deref().unwrap_or("?"),
                e.message.as_deref().unwrap_or("").trim()
            );
            if let Some(count) = e.count.filter(|c| *c > 1) {
                line.push_str(&format!(" (x{count})"));
            }
            line
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(reason: &str, at: &str, field_path: Option<&str>, count: i32) -> Event {
        serde_json::from_value(json!({
            "metadata": {"name": format!("e-{reason}")},
            "involvedObject": {"kind": "Pod", "name": "api-1", "fieldPath": field_path},
            "type": "Warning",
            "reason": reason,
            "message": format!("{reason} happened "),
            "lastTimestamp": at,
            "count": count,
        }))
        .expect("test event is valid")
    }

    #[test]
    fn oldest_first_only_this_container_and_the_pod() {
        let events = vec![
            event(
                "BackOff",
                "2026-01-01T00:00:03Z",
                Some("spec.ephemeralContainers{graft-agent-1}"),
                4,
            ),
            event("Scheduled", "2026-01-01T00:00:01Z", None, 1),
            event(
                "Failed",
                "2026-01-01T00:00:02Z",
                Some("spec.containers{app}"),
                1,
            ),
        ];
        assert_eq!(
            format_events(events, Some("graft-agent-1")),
            [
                "Warning Scheduled: Scheduled happened",
                "Warning BackOff: BackOff happened (x4)"
            ]
        );
    }

    #[test]
    fn keeps_the_last_few() {
        let events: Vec<Event> = (0..15)
            .map(|i| {
                event(
                    &format!("R{i:02}"),
                    &format!("2026-01-01T00:00:{i:02}Z"),
                    None,
                    1,
                )
            })
            .collect();
        let lines = format_events(events, None);
        assert_eq!(lines.len(), MAX_EVENTS);
        assert!(lines[0].contains("R05"));
        assert!(lines[MAX_EVENTS - 1].contains("R14"));
    }
}
