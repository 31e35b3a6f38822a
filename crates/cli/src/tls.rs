//! TLS steal on the CLI side: reads the certificate and key that `--tls-cert`
//! names (PEM files, or a `kubernetes.io/tls` Secret read with the user's own
//! Kubernetes credentials) into the [`TlsTermination`] the session sends to the
//! agent with each subscription. The key stays in memory only, in buffers that
//! are zeroed when dropped.

use graft_config::tls::{CertSource, TlsSettings};
use graft_config::{Config, Target};
use graft_kube::ClientOptions;
use graft_protocol::incoming::{SecretBytes, TlsTermination};
use zeroize::Zeroizing;

use crate::failure::Failure;

/// The termination `config` asks for, with its certificate and key loaded.
///
/// # Errors
///
/// A usage failure when a file cannot be read or `secret/NAME` is used with a
/// target that is not in Kubernetes; a session failure when the Secret cannot
/// be read (not found, not allowed, not a TLS Secret).
pub async fn load(config: &Config) -> Result<Option<TlsTermination>, Failure> {
    let Some(settings) = &config.tls else {
        return Ok(None);
    };
    if config.layer.filter.is_none() {
        eprintln!(
            "graft: warning: --tls-cert only matters with a filter (--filter-header, \
             --filter-path, --filter-method): without one, whole connections are taken and \
             their TLS passes through unchanged"
        );
    }
    let (cert_chain_pem, key_pem) = match &settings.source {
        CertSource::Files { cert, key } => {
            let cert_pem = std::fs::read_to_string(cert).map_err(|e| {
                Failure::usage(format!(
                    "cannot read the TLS certificate {} (--tls-cert): {e}",
                    cert.display()
                ))
            })?;
            let key_pem = Zeroizing::new(std::fs::read(key).map_err(|e| {
                Failure::usage(format!(
                    "cannot read the TLS key {} (--tls-key): {e}",
                    key.display()
                ))
            })?);
            (cert_pem, key_pem)
        }
        CertSource::Secret(name) => secret(config, name).await?,
    };
    Ok(Some(termination(settings, cert_chain_pem, &key_pem)))
}

/// The message for the agent.
fn termination(settings: &TlsSettings, cert_chain_pem: String, key_pem: &[u8]) -> TlsTermination {
    TlsTermination {
        cert_chain_pem,
        key_pem: SecretBytes(key_pem.to_vec()),
        insecure_upstream: settings.insecure_upstream,
        local: settings.local,
    }
}

/// Reads the TLS Secret `name` of the target's namespace.
async fn secret(config: &Config, name: &str) -> Result<(String, Zeroizing<Vec<u8>>), Failure> {
    if !matches!(config.target, Target::Kube(_)) {
        return Err(Failure::usage(format!(
            "--tls-cert secret/{name} reads a Kubernetes Secret, and the target {} is not in \
             Kubernetes: give the files with --tls-cert FILE --tls-key FILE",
            config.target
        )));
    }
    let options = ClientOptions {
        kubeconfig: config.kube.kubeconfig.clone(),
        context: config.kube.context.clone(),
        namespace: config.kube.namespace.clone(),
    };
    let cluster = graft_kube::connect(&options)
        .await
        .map_err(|e| Failure::session_error(&e))?;
    let secret = graft_kube::tls_secret::read_tls_secret(&cluster, name)
        .await
        .map_err(|e| Failure::session(format!("--tls-cert secret/{name}: {e}")))?;
    Ok((
        secret.cert_pem.clone(),
        Zeroizing::new(secret.key_pem.to_vec()),
    ))
}
