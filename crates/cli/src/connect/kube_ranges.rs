//! What a cluster's address ranges and names are, read from its API.
//!
//! - Pod ranges: every node's `spec.podCIDRs` (or the older `spec.podCIDR`).
//! - The Service range is an API server flag (`--service-cluster-ip-range`) that
//!   no API shows; as Telepresence does, graft asks the API server to create a
//!   Service with a ClusterIP outside every range in a dry run (`dryRun=All`,
//!   nothing is stored) and reads the range from the refusal ("The range of
//!   valid IPs is 10.96.0.0/12"). When that fails, the `kubernetes` Service's
//!   ClusterIP is reported and `--also-proxy` is the way to add the range.
//! - Names: the namespaces (each is a routing domain: `web.shop`).

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
};

/// What the cluster told about itself.
#[derive(Debug, Default)]
pub struct ClusterFacts {
    /// Pod and Service ranges.
    pub ranges: Vec<IpNet>,
    /// The namespaces' names.
    pub namespaces: Vec<String>,
    /// What could not be found out, for the log and the status.
    pub notes: Vec<String>,
}

/// Reads ranges and namespaces; every failure becomes a note, never an error.
pub async fn discover(client: &Client, namespace: &str) -> ClusterFacts {
    let mut facts = ClusterFacts::default();
    match Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(nodes) => {
            for node in nodes {
                let spec = node.spec.unwrap_or_default();
                let cidrs = spec
                    .pod_cidrs
                    .unwrap_or_default()
                    .into_iter()
                    .chain(spec.pod_cidr);
                for cidr in cidrs {
                    match cidr.parse::<IpNet>() {
                        Ok(net) if !facts.ranges.contains(&net.trunc()) => {
                            facts.ranges.push(net.trunc())
                        }
                        Ok(_) => {}
                        Err(_) => facts
                            .notes
                            .push(format!("a node has a bad podCIDR {cidr:?}")),
                    }
                }
            }
            if facts.ranges.is_empty() {
                facts.notes.push(
                    "no node has spec.podCIDRs (the network plugin assigns pod addresses): \
                     add the pod range with --also-proxy"
                        .into(),
                );
            }
        }
        Err(e) => facts
            .notes
            .push(format!("cannot list nodes for the pod ranges: {e}")),
    }
    for family in ["1.1.1.1", "::1"] {
        match service_range(client, namespace, family).await {
            Ok(Some(net)) => {
                if !facts.ranges.contains(&net) {
                    facts.ranges.push(net);
                }
            }
            Ok(None) => {}
            Err(note) if family == "1.1.1.1" => facts.notes.push(note),
            Err(_) => {}
        }
    }
    match Api::<Namespace>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(list) => facts.namespaces = list.into_iter().filter_map(|n| n.metadata.name).collect(),
        Err(e) => {
            facts.notes.push(format!(
                "cannot list namespaces ({e}): only {namespace} resolves as NAME.NAMESPACE"
            ));
            facts.namespaces.push(namespace.to_owned());
        }
    }
    facts
}

/// The Service range of one family, from a dry-run Service with `bogus` as its
/// ClusterIP. `Ok(None)`: the cluster has no range of that family.
async fn service_range(
    client: &Client,
    namespace: &str,
    bogus: &str,
) -> Result<Option<IpNet>, String> {
    let service: Service = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "graft-connect-range-probe"},
        "spec": {"clusterIP": bogus, "ports": [{"port": 80}]},
    }))
    .expect("the probe Service is valid JSON of a Service");
    let params = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    match Api::<Service>::namespaced(client.clone(), namespace)
        .create(&params, &service)
        .await
    {
        Ok(_) => Err(format!(
            "the API server accepted ClusterIP {bogus} in a dry run: the Service range is \
             unknown; add it with --also-proxy"
        )),
        Err(kube::Error::Api(status)) => match parse_valid_range(&status.message) {
            Some(net) => Ok(Some(net)),
            None if status.message.contains("not configured")
                || status.message.contains("family") =>
            {
                Ok(None)
            }
            None => Err(format!(
                "cannot read the Service range from the API server's answer ({}); add it \
                 with --also-proxy",
                status.message
            )),
        },
        Err(e) => Err(format!("cannot probe the Service range: {e}")),
    }
}

/// The CIDR after "valid IPs is" (Kubernetes' allocator message).
fn parse_valid_range(message: &str) -> Option<IpNet> {
    let (_, rest) = message.split_once("valid IPs is ")?;
    let cidr: String = rest
        .chars()
        .take_while(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '/'))
        .collect();
    cidr.trim_end_matches('.')
        .parse::<IpNet>()
        .ok()
        .map(|n| n.trunc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_range_is_read_from_the_refusal() {
        let message = "Service \"graft-connect-range-probe\" is invalid: spec.clusterIPs: \
                       Invalid value: []string{\"1.1.1.1\"}: failed to allocate IP 1.1.1.1: \
                       provided IP is not in the valid range. The range of valid IPs is \
                       198.19.160.0/20";
        assert_eq!(
            parse_valid_range(message),
            Some("198.19.160.0/20".parse().unwrap())
        );
        assert_eq!(
            parse_valid_range("The range of valid IPs is fd00:10:96::/112."),
            Some("fd00:10:96::/112".parse().unwrap())
        );
        assert_eq!(parse_valid_range("forbidden"), None);
    }
}
