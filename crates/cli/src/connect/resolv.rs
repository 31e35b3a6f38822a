//! How this machine's resolver is pointed at graft's DNS server while connected,
//! and put back afterwards.
//!
//! Two ways, picked by [`DnsMode`]:
//!
//! - **systemd-resolved** (where it runs): the tun link gets graft's server as
//!   its per-link DNS server and the cluster's domains as its routing domains
//!   (`resolvectl dns`, `resolvectl domain`, `resolvectl default-route`; see
//!   `resolvectl(1)`), so only cluster names reach graft. The settings belong to
//!   the link and vanish with it; `resolvectl revert` removes them earlier.
//! - **a managed `/etc/resolv.conf`** (elsewhere): the original is saved under
//!   [`BACKUP_DIR`] (its bytes, and the link target when it is a symlink), then
//!   the file is rewritten in place (a bind-mounted file keeps working) with
//!   graft's server as the only `nameserver`, the cluster's search domains
//!   first and the original's after. graft's server answers cluster names and
//!   relays every other question to the original name servers. [`restore`] puts
//!   the original back byte for byte; a backup found with no graft running (a
//!   crash) is restored the same way by the next `graft connect` or `graft quit`.
//!   The backup lives on disk, not in `/run`, so a reboot in between loses nothing.

use std::{
    io::Write,
    net::IpAddr,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    process::Command,
};

use serde::{Deserialize, Serialize};

/// The machine's resolver configuration (`resolv.conf(5)`).
pub const RESOLV_CONF: &str = "/etc/resolv.conf";
/// Where the original `/etc/resolv.conf` is kept while graft manages it.
pub const BACKUP_DIR: &str = "/var/lib/graft/connect";
/// The first line of every `resolv.conf` graft writes.
pub const MARKER: &str = "# Written by graft connect";

/// How DNS is wired into this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DnsMode {
    /// Per-link DNS and routing domains of systemd-resolved on the tun link.
    SystemdResolved,
    /// `/etc/resolv.conf` rewritten (and restored).
    ResolvConf,
}

impl std::fmt::Display for DnsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DnsMode::SystemdResolved => "systemd-resolved",
            DnsMode::ResolvConf => "resolv.conf",
        })
    }
}

/// Whether systemd-resolved runs here: its runtime directory exists and
/// `resolvectl status` answers.
pub fn resolved_runs() -> bool {
    Path::new("/run/systemd/resolve").is_dir()
        && Command::new("resolvectl")
            .arg("status")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

/// The parts of a `resolv.conf` graft uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    /// `nameserver` lines, in order.
    pub nameservers: Vec<IpAddr>,
    /// The `search` (or `domain`) list; the last such line wins, as in glibc.
    pub search: Vec<String>,
    /// `options` lines, verbatim after the keyword.
    pub options: Vec<String>,
}

impl ResolvConf {
    /// Parses `resolv.conf(5)` text; unknown lines and bad addresses are skipped.
    pub fn parse(text: &str) -> ResolvConf {
        let mut conf = ResolvConf::default();
        for line in text.lines() {
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => {
                    // A scoped IPv6 address (`fe80::1%eth0`) keeps its address only.
                    if let Some(addr) = words
                        .next()
                        .and_then(|w| w.split('%').next())
                        .and_then(|w| w.parse().ok())
                    {
                        conf.nameservers.push(addr);
                    }
                }
                Some("search" | "domain") => conf.search = words.map(str::to_owned).collect(),
                Some("options") => conf.options.push(words.collect::<Vec<_>>().join(" ")),
                _ => {}
            }
        }
        conf
    }
}

/// The `resolv.conf` graft writes: its server, the cluster's search domains
/// before the original ones (each once), the original options.
pub fn render(server: IpAddr, cluster_search: &[String], original: &ResolvConf) -> String {
    let mut search: Vec<&str> = Vec::new();
    for domain in cluster_search.iter().chain(&original.search) {
        let domain = domain.trim_end_matches('.');
        if !domain.is_empty() && !search.contains(&domain) {
            search.push(domain);
        }
    }
    let mut text = format!(
        "{MARKER}: `graft quit` puts the original back (kept in {BACKUP_DIR}).\n\
         nameserver {server}\n"
    );
    if !search.is_empty() {
        text.push_str(&format!("search {}\n", search.join(" ")));
    }
    for options in &original.options {
        text.push_str(&format!("options {options}\n"));
    }
    text
}

/// What the backup says about the original file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct BackupMeta {
    /// The original was a symlink to this path.
    symlink: Option<PathBuf>,
    /// Its permission bits (a regular file).
    mode: u32,
}

/// The managed `resolv.conf`: the file and where its original is kept.
#[derive(Debug, Clone)]
pub struct Managed {
    /// The file (`/etc/resolv.conf`).
    pub path: PathBuf,
    /// The backup directory ([`BACKUP_DIR`]).
    pub backup: PathBuf,
}

/// What [`Managed::restore`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Restored {
    /// There was no backup: nothing to do.
    NothingSaved,
    /// The original is back.
    Original,
    /// Someone else rewrote the file while graft managed it: their version
    /// stays, the backup is removed.
    LeftTheirs,
}

impl Managed {
    /// The machine's `/etc/resolv.conf` with its backup under [`BACKUP_DIR`].
    pub fn system() -> Managed {
        Managed {
            path: RESOLV_CONF.into(),
            backup: BACKUP_DIR.into(),
        }
    }

    fn data_path(&self) -> PathBuf {
        self.backup.join("resolv.conf.orig")
    }

    fn meta_path(&self) -> PathBuf {
        self.backup.join("resolv.conf.json")
    }

    /// Whether a backup exists (graft manages the file now, or crashed while it
    /// did).
    pub fn saved(&self) -> bool {
        self.meta_path().exists()
    }

    /// The original file's settings (its name servers are where graft relays the
    /// names that are not the cluster's): the backup's when there is one, else the
    /// file's.
    ///
    /// # Errors
    ///
    /// The file cannot be read.
    pub fn original(&self) -> std::io::Result<ResolvConf> {
        let bytes = if self.saved() {
            std::fs::read(self.data_path())?
        } else {
            std::fs::read(&self.path)?
        };
        Ok(ResolvConf::parse(&String::from_utf8_lossy(&bytes)))
    }

    /// Saves the original and writes `content` in its place.
    ///
    /// # Errors
    ///
    /// A backup already exists (restore it first), or the file cannot be read,
    /// saved or written; nothing is left half done: a failed write restores.
    pub fn install(&self, content: &str) -> std::io::Result<()> {
        if self.saved() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!(
                    "{} already holds a saved resolv.conf; run `graft quit` to restore it",
                    self.backup.display()
                ),
            ));
        }
        let link = std::fs::symlink_metadata(&self.path)?;
        let symlink = link
            .file_type()
            .is_symlink()
            .then(|| std::fs::read_link(&self.path))
            .transpose()?;
        // For a symlink, the bytes it showed (for the name servers to relay to).
        let bytes = std::fs::read(&self.path).unwrap_or_default();
        let mode = std::fs::metadata(&self.path)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0o644);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.backup)?;
        write_synced(&self.data_path(), &bytes, 0o600)?;
        let meta = serde_json::to_vec(&BackupMeta { symlink, mode })
            .expect("the backup's metadata serialises");
        // The metadata is the commit mark: written last, removed first.
        write_synced(&self.meta_path(), &meta, 0o600)?;
        let written = if link.file_type().is_symlink() {
            std::fs::remove_file(&self.path)
                .and_then(|()| write_synced(&self.path, content.as_bytes(), mode | 0o444))
        } else {
            overwrite(&self.path, content.as_bytes())
        };
        if let Err(e) = written {
            let _ = self.restore();
            return Err(e);
        }
        Ok(())
    }

    /// Puts the original back (see [`Restored`]) and removes the backup.
    ///
    /// # Errors
    ///
    /// The backup or the file cannot be read or written; the backup then stays
    /// for the next try.
    pub fn restore(&self) -> std::io::Result<Restored> {
        let Ok(meta) = std::fs::read(self.meta_path()) else {
            // A data file without metadata is a backup that never completed.
            let _ = std::fs::remove_file(self.data_path());
            return Ok(Restored::NothingSaved);
        };
        let meta: BackupMeta = serde_json::from_slice(&meta).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is damaged: {e}", self.meta_path().display()),
            )
        })?;
        let ours = std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.file_type().is_file())
            && std::fs::read(&self.path).is_ok_and(|b| b.starts_with(MARKER.as_bytes()));
        let outcome = if !ours {
            Restored::LeftTheirs
        } else {
            match &meta.symlink {
                Some(target) => {
                    std::fs::remove_file(&self.path)?;
                    std::os::unix::fs::symlink(target, &self.path)?;
                }
                None => {
                    let original = std::fs::read(self.data_path())?;
                    overwrite(&self.path, &original)?;
                    std::fs::set_permissions(
                        &self.path,
                        std::fs::Permissions::from_mode(meta.mode),
                    )?;
                }
            }
            Restored::Original
        };
        std::fs::remove_file(self.meta_path())?;
        let _ = std::fs::remove_file(self.data_path());
        Ok(outcome)
    }
}

/// Rewrites `path` in place (same inode: a bind-mounted file stays mounted).
fn overwrite(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Creates (or replaces) `path` with `bytes` and mode `mode`, synced to disk.
fn write_synced(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path)
}

/// The `resolvectl` invocations that give the tun link `server` as its DNS
/// server for `domains`: search domains as they are, routing-only domains with
/// `~`, and no default route (other names keep the machine's own servers).
pub fn resolved_commands(
    link: &str,
    server: IpAddr,
    search: &[String],
    routing: &[String],
) -> Vec<Vec<String>> {
    let mut domains: Vec<String> = Vec::new();
    for domain in search {
        let domain = domain.trim_end_matches('.').to_owned();
        if !domain.is_empty() && !domains.contains(&domain) {
            domains.push(domain);
        }
    }
    for domain in routing {
        let domain = domain.trim_end_matches('.');
        let routed = format!("~{domain}");
        if !domain.is_empty() && !domains.iter().any(|d| d == domain || *d == routed) {
            domains.push(routed);
        }
    }
    let mut domain_command = vec!["resolvectl".to_owned(), "domain".into(), link.into()];
    domain_command.extend(domains);
    vec![
        vec![
            "resolvectl".into(),
            "dns".into(),
            link.into(),
            server.to_string(),
        ],
        domain_command,
        vec![
            "resolvectl".into(),
            "default-route".into(),
            link.into(),
            "false".into(),
        ],
    ]
}

/// Runs the commands of [`resolved_commands`].
///
/// # Errors
///
/// The first command that fails, with its stderr.
pub fn apply_resolved(commands: &[Vec<String>]) -> Result<(), String> {
    for command in commands {
        let out = Command::new(&command[0])
            .args(&command[1..])
            .output()
            .map_err(|e| format!("cannot run {}: {e}", command.join(" ")))?;
        if !out.status.success() {
            return Err(format!(
                "`{}` failed: {}",
                command.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    Ok(())
}

/// Removes the link's settings from systemd-resolved (`resolvectl revert`).
pub fn revert_resolved(link: &str) {
    let _ = Command::new("resolvectl")
        .args(["revert", link])
        .stderr(std::process::Stdio::null())
        .status();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_servers_search_and_options() {
        let conf = ResolvConf::parse(
            "# comment\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\nnameserver bogus\n\
             domain old.example\nsearch a.example b.example ; trailing\noptions ndots:2 edns0\n",
        );
        assert_eq!(
            conf.nameservers,
            vec![
                "10.0.0.2".parse::<IpAddr>().unwrap(),
                "fe80::1".parse().unwrap()
            ]
        );
        assert_eq!(conf.search, ["a.example", "b.example"]);
        assert_eq!(conf.options, ["ndots:2 edns0"]);
    }

    #[test]
    fn rendered_file_puts_the_cluster_first_and_keeps_options() {
        let original = ResolvConf::parse(
            "nameserver 10.0.0.2\nsearch corp.example cluster.local\noptions rotate\n",
        );
        let text = render(
            "169.254.53.53".parse().unwrap(),
            &["ns.svc.cluster.local".into(), "cluster.local.".into()],
            &original,
        );
        assert!(text.starts_with(MARKER), "{text}");
        let ours = ResolvConf::parse(&text);
        assert_eq!(
            ours.nameservers,
            ["169.254.53.53".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            ours.search,
            ["ns.svc.cluster.local", "cluster.local", "corp.example"]
        );
        assert_eq!(ours.options, ["rotate"]);
    }

    fn managed(dir: &Path) -> Managed {
        Managed {
            path: dir.join("resolv.conf"),
            backup: dir.join("backup"),
        }
    }

    #[test]
    fn a_regular_file_comes_back_byte_for_byte_with_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let m = managed(dir.path());
        let original = b"nameserver 10.0.0.2\n# odd bytes \xff\n";
        std::fs::write(&m.path, original).unwrap();
        std::fs::set_permissions(&m.path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&m.path).unwrap());
        m.install("# Written by graft connect\nnameserver 1.2.3.4\n")
            .unwrap();
        assert!(m.saved());
        assert!(
            std::fs::read_to_string(&m.path)
                .unwrap()
                .contains("1.2.3.4")
        );
        assert_eq!(
            std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&m.path).unwrap()),
            ino,
            "rewritten in place"
        );
        assert_eq!(m.original().unwrap().nameservers.len(), 1);
        assert!(
            m.install("again").is_err(),
            "a second install would lose the original"
        );
        assert_eq!(m.restore().unwrap(), Restored::Original);
        assert_eq!(std::fs::read(&m.path).unwrap(), original);
        assert_eq!(
            std::fs::metadata(&m.path).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert!(!m.saved());
        assert_eq!(m.restore().unwrap(), Restored::NothingSaved);
    }

    #[test]
    fn a_symlink_comes_back_as_the_same_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let m = managed(dir.path());
        let target = dir.path().join("stub-resolv.conf");
        std::fs::write(&target, "nameserver 127.0.0.53\n").unwrap();
        std::os::unix::fs::symlink(&target, &m.path).unwrap();
        m.install(&format!("{MARKER}\nnameserver 1.2.3.4\n"))
            .unwrap();
        assert!(
            !std::fs::symlink_metadata(&m.path)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(
            std::fs::read_to_string(&target).unwrap(),
            "nameserver 127.0.0.53\n",
            "the link's target is never written"
        );
        assert_eq!(
            m.original().unwrap().nameservers,
            ["127.0.0.53".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(m.restore().unwrap(), Restored::Original);
        assert_eq!(std::fs::read_link(&m.path).unwrap(), target);
    }

    #[test]
    fn a_file_someone_else_rewrote_is_left_to_them() {
        let dir = tempfile::tempdir().unwrap();
        let m = managed(dir.path());
        std::fs::write(&m.path, "nameserver 10.0.0.2\n").unwrap();
        m.install(&format!("{MARKER}\nnameserver 1.2.3.4\n"))
            .unwrap();
        std::fs::write(&m.path, "nameserver 10.9.9.9\n").unwrap();
        assert_eq!(m.restore().unwrap(), Restored::LeftTheirs);
        assert_eq!(
            std::fs::read_to_string(&m.path).unwrap(),
            "nameserver 10.9.9.9\n"
        );
        assert!(!m.saved());
    }

    #[test]
    fn resolved_gets_dns_search_and_routing_domains_without_default_route() {
        let commands = resolved_commands(
            "graft-connect",
            "169.254.53.53".parse().unwrap(),
            &["shop.svc.cluster.local".into(), "svc.cluster.local".into()],
            &[
                "cluster.local".into(),
                "shop".into(),
                "svc.cluster.local".into(),
            ],
        );
        let lines: Vec<String> = commands.iter().map(|c| c.join(" ")).collect();
        assert_eq!(
            lines,
            [
                "resolvectl dns graft-connect 169.254.53.53",
                "resolvectl domain graft-connect shop.svc.cluster.local svc.cluster.local \
                 ~cluster.local ~shop",
                "resolvectl default-route graft-connect false",
            ]
        );
    }
}
