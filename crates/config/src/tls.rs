//! TLS steal settings: `--tls-cert`, `--tls-key`, `--tls-insecure-upstream`,
//! `--tls-local` and `[incoming.tls]` of `graft.toml`, resolved to
//! [`TlsSettings`] (flags win over the file, key by key).
//!
//! ```toml
//! [incoming.tls]
//! cert = "certs/api.crt"       # or "secret/api-tls": a kubernetes.io/tls Secret
//! key = "certs/api.key"        # not with a Secret (it holds the key)
//! insecure_upstream = false    # true: accept any certificate from the target
//! local = false                # true: CMD gets matched requests over TLS
//! ```
//!
//! The certificate is what the target's server presents; the agent terminates
//! TLS with it on filtered ports only (an unfiltered steal passes TLS through).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::ConfigError;

/// `[incoming.tls]` of `graft.toml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    /// The server's PEM certificate chain file, or `secret/NAME`: a
    /// `kubernetes.io/tls` Secret in the target's namespace (`--tls-cert`).
    pub cert: Option<String>,
    /// The PEM private key file of `cert` (`--tls-key`); not with a Secret.
    pub key: Option<PathBuf>,
    /// Accept any certificate from the target's own server
    /// (`--tls-insecure-upstream`); by default it must be `cert` or chain to it.
    pub insecure_upstream: Option<bool>,
    /// Deliver matched requests to CMD over TLS (`--tls-local`); by default CMD
    /// gets them as plain HTTP.
    pub local: Option<bool>,
}

/// The `--tls-*` flags, raw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFlags {
    /// `--tls-cert`.
    pub cert: Option<String>,
    /// `--tls-key`.
    pub key: Option<PathBuf>,
    /// `--tls-insecure-upstream`.
    pub insecure_upstream: bool,
    /// `--tls-local`.
    pub local: bool,
}

/// Where the certificate and key come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertSource {
    /// PEM files on this machine.
    Files {
        /// The certificate chain.
        cert: PathBuf,
        /// The private key.
        key: PathBuf,
    },
    /// A `kubernetes.io/tls` Secret of the target's namespace, by name.
    Secret(String),
}

/// Resolved TLS steal settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// The certificate and key.
    pub source: CertSource,
    /// Accept any certificate from the target's server.
    pub insecure_upstream: bool,
    /// Re-encrypt to CMD.
    pub local: bool,
}

/// Resolves the flags over the file.
///
/// # Errors
///
/// [`ConfigError::Invalid`] for a key without a certificate (or the other way
/// round), a key beside `secret/NAME`, an empty Secret name, or
/// `--tls-insecure-upstream`/`--tls-local` without a certificate.
pub fn resolve(
    flags: &TlsFlags,
    file: Option<&TlsFile>,
) -> Result<Option<TlsSettings>, ConfigError> {
    let file = file.cloned().unwrap_or_default();
    let cert = flags.cert.clone().or(file.cert);
    let key = flags.key.clone().or(file.key);
    let insecure_upstream = flags.insecure_upstream || file.insecure_upstream.unwrap_or(false);
    let local = flags.local || file.local.unwrap_or(false);
    let invalid = |value: String, reason: &str| ConfigError::Invalid {
        what: "TLS setting",
        value,
        reason: reason.to_owned(),
    };
    let source = match (cert, key) {
        (None, None) => {
            if insecure_upstream || local {
                return Err(invalid(
                    "--tls-insecure-upstream/--tls-local".into(),
                    "these change how the agent terminates TLS, which needs the server's \
                     certificate: add --tls-cert FILE --tls-key FILE (or --tls-cert secret/NAME)",
                ));
            }
            return Ok(None);
        }
        (None, Some(key)) => {
            return Err(invalid(
                key.display().to_string(),
                "--tls-key needs --tls-cert FILE (the certificate of that key)",
            ));
        }
        (Some(cert), key) => match (cert.strip_prefix("secret/"), key) {
            (Some(""), _) => {
                return Err(invalid(cert, "name the Secret: --tls-cert secret/NAME"));
            }
            (Some(name), None) => CertSource::Secret(name.to_owned()),
            (Some(_), Some(_)) => {
                return Err(invalid(
                    cert,
                    "a TLS Secret holds its key (tls.key): drop --tls-key",
                ));
            }
            (None, Some(key)) => CertSource::Files {
                cert: PathBuf::from(cert),
                key,
            },
            (None, None) => {
                return Err(invalid(
                    cert,
                    "--tls-cert FILE needs --tls-key FILE (its private key), or use \
                     --tls-cert secret/NAME for a kubernetes.io/tls Secret",
                ));
            }
        },
    };
    Ok(Some(TlsSettings {
        source,
        insecure_upstream,
        local,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(cert: Option<&str>, key: Option<&str>) -> TlsFlags {
        TlsFlags {
            cert: cert.map(str::to_owned),
            key: key.map(PathBuf::from),
            ..TlsFlags::default()
        }
    }

    #[test]
    fn files_secrets_and_mistakes() {
        assert_eq!(resolve(&TlsFlags::default(), None).unwrap(), None);
        let files = resolve(&flags(Some("a.crt"), Some("a.key")), None)
            .unwrap()
            .unwrap();
        assert_eq!(
            files.source,
            CertSource::Files {
                cert: "a.crt".into(),
                key: "a.key".into()
            }
        );
        let secret = resolve(&flags(Some("secret/api-tls"), None), None)
            .unwrap()
            .unwrap();
        assert_eq!(secret.source, CertSource::Secret("api-tls".into()));
        for (cert, key, needle) in [
            (Some("a.crt"), None, "needs --tls-key"),
            (None, Some("a.key"), "needs --tls-cert"),
            (Some("secret/x"), Some("a.key"), "drop --tls-key"),
            (Some("secret/"), None, "name the Secret"),
        ] {
            let e = resolve(&flags(cert, key), None).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        let lonely = TlsFlags {
            local: true,
            ..TlsFlags::default()
        };
        assert!(
            resolve(&lonely, None)
                .unwrap_err()
                .to_string()
                .contains("--tls-cert")
        );
    }

    #[test]
    fn flags_win_over_the_file_key_by_key() {
        let file = TlsFile {
            cert: Some("secret/from-file".into()),
            key: None,
            insecure_upstream: Some(true),
            local: None,
        };
        let got = resolve(
            &TlsFlags {
                local: true,
                ..TlsFlags::default()
            },
            Some(&file),
        )
        .unwrap()
        .unwrap();
        assert_eq!(got.source, CertSource::Secret("from-file".into()));
        assert!(got.insecure_upstream && got.local);
    }
}
