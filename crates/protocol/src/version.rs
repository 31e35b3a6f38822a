//! The protocol version and the compatibility rule checked at every handshake.
//!
//! Versions are [semver](https://semver.org): peers are compatible when their major
//! versions match and, while the major version is 0, their minor versions match too.
//! New message variants are appended to the end of their enums (postcard encodes a
//! variant by its index), and a peer sends a variant only when the other peer's
//! version is new enough to know it. A field added to a struct changes its
//! encoding (postcard is not self-describing), so it takes a new minor version:
//! 0.4 added `Subscription::responses`, the typed `SubscribeError` and
//! `ClientMessage::SubscribeTls`.

use semver::Version;

/// This build's protocol version.
pub const PROTOCOL_VERSION: &str = "0.4.0";

/// The feature tag of descriptor passing ([`crate::fdpass`]): the sender of a
/// version carrying it can take descriptors on that link.
pub const FEATURE_FDS: &str = "fds";

/// The feature tag of routing records: a client naming it in its `Hello` can
/// read [`crate::link::AgentMessage::Routed`]; an agent naming it in its answer
/// takes [`crate::link::ClientMessage::WatchRoutes`].
pub const FEATURE_ROUTES: &str = "routes";

/// The feature tag of tap times: a client naming it in its `Hello` reads the
/// time frames of [`crate::incoming::tap`], and the agent sends them (when each
/// mirrored chunk was captured) only then.
pub const FEATURE_TAP_TIMES: &str = "tap-times";

/// The feature tag of direct listeners: a client naming it in its `Hello`
/// takes [`crate::link::AgentMessage::DirectListener`]; an agent naming it in
/// its answer takes [`crate::link::ClientMessage::DirectAttached`]. Only on a
/// link that passes descriptors ([`FEATURE_FDS`]).
pub const FEATURE_DIRECT: &str = "direct";

/// The feature tag of IPv6 direct listeners: a client naming it beside
/// [`FEATURE_DIRECT`] takes [`crate::link::AgentMessage::DirectListener6`],
/// and the agent then redirects a direct port's IPv6 connections to a
/// listener of their own that the program accepts from too.
pub const FEATURE_DIRECT6: &str = "direct6";

/// [`PROTOCOL_VERSION`] with `features` as its semver build metadata
/// (`0.3.0+fds`). Build metadata does not take part in [`check_compatible`], so a
/// peer that knows no feature reads the version as it always did, and a feature
/// is used only when both peers name it.
pub fn version_with(features: &[&str]) -> String {
    if features.is_empty() {
        PROTOCOL_VERSION.to_owned()
    } else {
        format!("{PROTOCOL_VERSION}+{}", features.join("."))
    }
}

/// Whether `version` (a peer's, as sent) names `feature` in its build metadata.
pub fn has_feature(version: &str, feature: &str) -> bool {
    Version::parse(version)
        .map(|v| v.build.as_str().split('.').any(|f| f == feature))
        .unwrap_or(false)
}

/// Why a peer's version was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VersionError {
    /// The peer sent something that is not a semver version.
    #[error("the peer sent an invalid protocol version {0:?}")]
    Invalid(String),
    /// The peer speaks a version this build cannot talk to.
    #[error(
        "protocol version mismatch: this side speaks {ours}, the peer speaks {theirs}; \
         use graft and graft-agent from the same release"
    )]
    Incompatible {
        /// This build's version.
        ours: String,
        /// The peer's version.
        theirs: String,
    },
}

/// Checks that a peer speaking `theirs` can talk to this build.
///
/// # Errors
///
/// [`VersionError::Invalid`] when `theirs` does not parse, [`VersionError::Incompatible`]
/// when it parses but is not compatible by the rule in the module docs.
pub fn check_compatible(theirs: &str) -> Result<(), VersionError> {
    let ours =
        Version::parse(PROTOCOL_VERSION).expect("PROTOCOL_VERSION is a valid semver literal");
    let peer = Version::parse(theirs).map_err(|_| VersionError::Invalid(theirs.to_owned()))?;
    let compatible = ours.major == peer.major && (ours.major != 0 || ours.minor == peer.minor);
    if compatible {
        Ok(())
    } else {
        Err(VersionError::Incompatible {
            ours: ours.to_string(),
            theirs: peer.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_version_is_compatible() {
        assert_eq!(check_compatible(PROTOCOL_VERSION), Ok(()));
    }

    #[test]
    fn patch_difference_is_compatible() {
        assert_eq!(check_compatible("0.4.7"), Ok(()));
    }

    #[test]
    fn other_minor_in_zero_major_is_refused() {
        assert!(matches!(
            check_compatible("0.3.0"),
            Err(VersionError::Incompatible { .. })
        ));
    }

    #[test]
    fn features_ride_in_build_metadata() {
        let v = version_with(&[FEATURE_FDS]);
        assert_eq!(check_compatible(&v), Ok(()));
        assert!(has_feature(&v, FEATURE_FDS));
        assert!(!has_feature(PROTOCOL_VERSION, FEATURE_FDS));
        assert!(!has_feature("0.3.0+fdsx", FEATURE_FDS));
        assert!(has_feature("0.3.0+tls.fds", FEATURE_FDS));
        assert_eq!(version_with(&[]), PROTOCOL_VERSION);
    }

    #[test]
    fn garbage_is_invalid() {
        assert_eq!(
            check_compatible("banana"),
            Err(VersionError::Invalid("banana".into()))
        );
    }
}
