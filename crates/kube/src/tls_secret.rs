//! The certificate and key of TLS steal from a `kubernetes.io/tls` Secret
//! (`--tls-cert secret/NAME`): read by the CLI with the user's own credentials,
//! in the target's namespace, and sent to the agent over the session link only.
//!
//! A TLS Secret holds the PEM certificate chain under `tls.crt` and the PEM
//! private key under `tls.key` (Kubernetes docs, "Secrets", TLS secrets).

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use zeroize::Zeroizing;

use crate::rbac::Permission;
use crate::{Cluster, KubeError};

/// What reading a TLS Secret needs.
pub const GET_SECRETS: Permission = Permission {
    group: "",
    resource: "secrets",
    verb: "get",
    why: "read the TLS certificate of --tls-cert secret/NAME",
};

/// The contents of a TLS Secret.
pub struct TlsSecret {
    /// `tls.crt`: the PEM certificate chain.
    pub cert_pem: String,
    /// `tls.key`: the PEM private key; zeroed when dropped.
    pub key_pem: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for TlsSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSecret").finish_non_exhaustive()
    }
}

/// Why a TLS Secret could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsSecretError {
    /// The API refused or failed (not found, no `get secrets`, …).
    #[error(transparent)]
    Kube(#[from] KubeError),
    /// The Secret exists but does not hold a certificate and key.
    #[error(
        "secret {name:?} in namespace {namespace:?} is not a TLS Secret ({why}): create it \
         with `kubectl create secret tls {name} --cert=FILE --key=FILE`"
    )]
    NotTls {
        /// The Secret.
        name: String,
        /// Its namespace.
        namespace: String,
        /// What is missing.
        why: &'static str,
    },
}

/// Reads the TLS Secret `name` of `cluster`'s namespace.
///
/// # Errors
///
/// [`KubeError::NotFound`], [`KubeError::Forbidden`] (no `get secrets`), or
/// [`TlsSecretError::NotTls`] when it has no `tls.crt` or `tls.key`, or a
/// certificate that is not text.
pub async fn read_tls_secret(cluster: &Cluster, name: &str) -> Result<TlsSecret, TlsSecretError> {
    let api: Api<Secret> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let secret = api
        .get(name)
        .await
        .map_err(|e| KubeError::from_api(e, GET_SECRETS, &cluster.namespace, "secret", name))?;
    let mut data = secret.data.unwrap_or_default();
    let not_tls = |why: &'static str| TlsSecretError::NotTls {
        name: name.to_owned(),
        namespace: cluster.namespace.clone(),
        why,
    };
    let key = data
        .remove("tls.key")
        .ok_or_else(|| not_tls("no tls.key"))?;
    let key_pem = Zeroizing::new(key.0);
    let cert = data
        .remove("tls.crt")
        .ok_or_else(|| not_tls("no tls.crt"))?;
    let cert_pem = String::from_utf8(cert.0).map_err(|_| not_tls("tls.crt is not PEM text"))?;
    Ok(TlsSecret { cert_pem, key_pem })
}

/// `graft doctor --tls-cert secret/NAME`: whether the Secret may be read and is
/// a TLS Secret whose certificate and key are PEM.
pub async fn check(cluster: &Cluster, name: &str) -> crate::Check {
    let verdict = match read_tls_secret(cluster, name).await {
        Ok(secret) => {
            let pem = |text: &[u8], label: &str| {
                String::from_utf8_lossy(text).contains(&format!("-----BEGIN {label}"))
            };
            if pem(secret.cert_pem.as_bytes(), "CERTIFICATE") && pem(&secret.key_pem, "") {
                crate::Verdict::ok(format!(
                    "secret {name:?} in namespace {:?} holds a PEM certificate and key",
                    cluster.namespace
                ))
            } else {
                crate::Verdict::fail(
                    format!("secret {name:?} holds tls.crt and tls.key, but not as PEM"),
                    format!("recreate it: kubectl create secret tls {name} --cert=FILE --key=FILE"),
                )
            }
        }
        Err(TlsSecretError::Kube(KubeError::Forbidden { .. })) => crate::Verdict::fail(
            format!(
                "not allowed to get secret {name:?} in namespace {:?}",
                cluster.namespace
            ),
            format!(
                "ask for `get secrets` in namespace {} (a Role bound to you), or pass \
                 --tls-cert FILE --tls-key FILE instead",
                cluster.namespace
            ),
        ),
        Err(e) => crate::Verdict::fail(e.to_string(), "give an existing kubernetes.io/tls Secret"),
    };
    crate::Check {
        name: format!("TLS secret {name}"),
        verdict,
    }
}
