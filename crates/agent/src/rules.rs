//! Packet rules: how the agent redirects a target port to its own listeners, in
//! a way that dies with the agent whatever kills it.
//!
//! Two backends, chosen on the first redirect ([`PacketRules::open`]):
//!
//! - [`nft`]: an nf_tables table owned by the agent's netlink socket
//!   (`NFT_TABLE_F_OWNER`, Linux ≥ 5.12). The kernel deletes it when the socket
//!   closes, so the rules go with the agent even when its whole process group or
//!   container is killed. The default wherever the kernel offers it.
//! - [`iptables`]: a `GRAFT-xxxxxxxx` chain of the `nat` table, written with the
//!   node's flavour of `iptables` (legacy or nft, detected), removed by the agent
//!   on its way out, by the [`crate::watchdog`] (its own session, so a signal to
//!   the agent's process group spares it) when the agent dies, and otherwise by
//!   the next agent on the target, which removes every chain whose agent is gone
//!   ([`stale`]) when it starts.
//!
//! Both backends first let through the connections of the *probe sources*
//! ([`probes`]): the node's addresses from which the kubelet probes the pod, so
//! liveness, readiness and startup probes keep reaching the target's own server.
//!
//! The agent is configured once at startup ([`configure`]); the redirector reads
//! the settings when it opens the rules.

pub mod iptables;
pub mod nft;
pub mod probes;
pub mod stale;

use std::net::IpAddr;
use std::sync::OnceLock;

pub use iptables::Family;

/// Prefix of every chain and table graft creates.
pub const CHAIN_PREFIX: &str = "GRAFT-";

/// The environment variable that carries the session secret; removed from the
/// environment of every command the agent runs.
pub const SECRET_ENV: &str = "GRAFT_AGENT_SECRET";
/// The environment variable with the SHA-256 of the session secret, as 64 hex
/// digits (agents placed in a cluster: the pod spec never holds the secret).
pub const SECRET_DIGEST_ENV: &str = "GRAFT_AGENT_SECRET_SHA256";

/// A fresh chain name: [`CHAIN_PREFIX`] + 8 random lowercase hex digits.
pub fn random_chain_name() -> String {
    // Four bytes from the kernel; a process with no random source at all falls
    // back to its pid, which is unique among the live agents on the node.
    let suffix = graft_protocol::secret::random_hex(4)
        .unwrap_or_else(|_| format!("{:08x}", std::process::id()));
    format!("{CHAIN_PREFIX}{suffix}")
}

/// Which backend the agent may use (`--packet-rules`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Backend {
    /// nf_tables owner tables where the kernel has them, else iptables.
    #[default]
    Auto,
    /// nf_tables owner tables only; fail when the kernel lacks them.
    Nftables,
    /// iptables (legacy or nft, detected) with the watchdog.
    Iptables,
}

/// The agent's rule settings, fixed at startup.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// The allowed backends.
    pub backend: Backend,
    /// Sources whose connections are never redirected (probe sources).
    pub excluded: Vec<IpAddr>,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

/// Sets the agent's rule settings; the first call wins.
pub fn configure(settings: Settings) {
    let _ = SETTINGS.set(settings);
}

/// The agent's rule settings (the defaults when [`configure`] was not called).
pub fn settings() -> &'static Settings {
    SETTINGS.get_or_init(Settings::default)
}

/// Why a port's traffic could not be redirected to the agent; the message goes
/// to the client (`SubscribeError::Redirect`).
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    /// The agent's own listeners could not be opened.
    #[error("could not listen on {addr} in the target's network: {error}")]
    Listen {
        /// The address (`0.0.0.0:0`).
        addr: &'static str,
        /// Why.
        error: std::io::Error,
    },
    /// nf_tables refused the rules (or `--packet-rules nftables` allows no
    /// fallback to iptables).
    #[error("could not redirect port {port}: {error}")]
    Nftables {
        /// The target's port.
        port: u16,
        /// What nf_tables said.
        error: nft::NftError,
    },
    /// An iptables command failed.
    #[error("could not redirect port {port}: {error}")]
    Iptables {
        /// The target's port.
        port: u16,
        /// The failed command.
        error: iptables::RuleError,
    },
}

/// The rules of one agent, in whichever backend it opened.
#[derive(Debug)]
pub enum PacketRules {
    /// An nf_tables table owned by the agent's socket.
    Nft(nft::OwnerTable),
    /// An iptables chain, removed by the agent, its watchdog or the next agent.
    Iptables(iptables::Chains),
}

impl PacketRules {
    /// Opens the rules named `name` with the configured backend: nf_tables when
    /// allowed and possible, else iptables.
    ///
    /// # Errors
    ///
    /// The nf_tables error when `--packet-rules nftables` forbids the fallback.
    pub async fn open(name: &str) -> Result<PacketRules, nft::NftError> {
        let settings = settings();
        if settings.backend != Backend::Iptables {
            match nft::OwnerTable::create(name, &settings.excluded) {
                Ok(table) => {
                    tracing::debug!(table = name, "packet rules: nf_tables owner table");
                    return Ok(PacketRules::Nft(table));
                }
                Err(e) if settings.backend == Backend::Nftables => return Err(e),
                Err(e) => {
                    tracing::info!("{e}; using iptables and a watchdog instead");
                }
            }
        }
        let flavour = iptables::Flavour::detect().await;
        tracing::debug!(chain = name, ?flavour, "packet rules: iptables");
        Ok(PacketRules::Iptables(iptables::Chains::new(
            name.to_owned(),
            flavour,
            settings.excluded.clone(),
        )))
    }

    /// Redirects `port` to the listeners `to_v4` and `to_v6`.
    ///
    /// # Errors
    ///
    /// [`RedirectError`], whose message is for the client.
    pub async fn redirect(
        &mut self,
        port: u16,
        to_v4: u16,
        to_v6: Option<u16>,
    ) -> Result<(), RedirectError> {
        match self {
            PacketRules::Nft(table) => table
                .redirect(port, to_v4, to_v6)
                .map_err(|error| RedirectError::Nftables { port, error }),
            PacketRules::Iptables(chains) => chains.redirect(port, to_v4, to_v6).await,
        }
    }

    /// Moves `port`'s redirects from the listeners `from` (IPv4, IPv6) to
    /// `to` with no gap: nf_tables rewrites the chain in one transaction;
    /// iptables appends each family's new rule, and deletes the old one,
    /// matched first until then, after it ([`iptables::Chains::retarget`]).
    ///
    /// Returns the listeners the port is redirected to now: `to`, or, when
    /// iptables refused the IPv6 rule alone (logged), `to`'s IPv4 one and
    /// `from`'s IPv6 one.
    ///
    /// # Errors
    ///
    /// [`RedirectError`] (nf_tables, or iptables' IPv4 rule); the old
    /// redirect stays then.
    pub async fn retarget(
        &mut self,
        port: u16,
        from: (u16, Option<u16>),
        to: (u16, Option<u16>),
    ) -> Result<(u16, Option<u16>), RedirectError> {
        if from == to {
            return Ok(to);
        }
        match self {
            PacketRules::Nft(table) => table
                .redirect(port, to.0, to.1)
                .map(|()| to)
                .map_err(|error| RedirectError::Nftables { port, error }),
            PacketRules::Iptables(chains) => {
                chains.retarget(Family::V4, port, from.0, to.0).await?;
                let (Some(from_v6), Some(to_v6)) = (from.1, to.1) else {
                    return Ok((to.0, from.1));
                };
                match chains.retarget(Family::V6, port, from_v6, to_v6).await {
                    Ok(()) => Ok(to),
                    Err(e) => {
                        tracing::warn!("{e}; its IPv6 connections keep their listener");
                        Ok((to.0, from.1))
                    }
                }
            }
        }
    }

    /// Stops redirecting `port`; failures are logged.
    pub async fn release(&mut self, port: u16, to_v4: u16, to_v6: Option<u16>) {
        match self {
            PacketRules::Nft(table) => {
                if let Err(e) = table.release(port) {
                    tracing::warn!("could not remove the rules for port {port}: {e}");
                }
            }
            PacketRules::Iptables(chains) => chains.release(port, to_v4, to_v6).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_are_prefixed_hex_and_differ() {
        let a = random_chain_name();
        let b = random_chain_name();
        assert_eq!(a.len(), CHAIN_PREFIX.len() + 8);
        assert!(a.starts_with(CHAIN_PREFIX));
        assert!(
            a[CHAIN_PREFIX.len()..]
                .chars()
                .all(|c| c.is_ascii_hexdigit())
        );
        assert_ne!(a, b);
    }
}
