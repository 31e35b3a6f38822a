//! Names in rules ([`NamePattern`]) and the names behind addresses
//! ([`ResolvedNames`]), which the front ends fill from their programs' DNS
//! answers so that a `connect()` to an address can be matched by name.
//!
//! [`ResolvedNames`] is bounded: at most [`MAX_ADDRESSES`] addresses with at
//! most [`NAMES_PER_ADDRESS`] names each; the oldest address is forgotten
//! first, so a program resolving names without end (or a hostile resolver
//! answering thousands of addresses) cannot grow it.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The most addresses [`ResolvedNames`] remembers.
pub const MAX_ADDRESSES: usize = 4096;
/// The most names remembered per address (CNAME chains and shared addresses).
pub const NAMES_PER_ADDRESS: usize = 8;
/// The longest name, in bytes (RFC 1035 §2.3.4: 255 octets on the wire).
const MAX_NAME_LEN: usize = 253;

/// A DNS name in a rule: `db.internal` (that name) or `*.svc.cluster.local`
/// (any name under it, not the domain itself). Compared without case and
/// without a trailing dot (RFC 4343).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NamePattern {
    /// Lower case, no trailing dot; for a wildcard, the part after `*.`.
    name: String,
    /// `*.` given.
    wildcard: bool,
}

impl NamePattern {
    /// Whether `name` (any case, trailing dot or not) matches.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name);
        if self.wildcard {
            name.len() > self.name.len() + 1
                && name.as_bytes()[name.len() - self.name.len() - 1] == b'.'
                && name.as_bytes()[name.len() - self.name.len()..]
                    .eq_ignore_ascii_case(self.name.as_bytes())
        } else {
            name.eq_ignore_ascii_case(&self.name)
        }
    }
}

impl std::str::FromStr for NamePattern {
    type Err = String;

    /// Parses `name` or `*.name`: labels of letters, digits, `-` and `_`
    /// (service names such as `_http._tcp`), at most 63 bytes each and 253 in
    /// all (RFC 1035 §2.3.4).
    fn from_str(s: &str) -> Result<Self, String> {
        let (wildcard, rest) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let rest = rest.strip_suffix('.').unwrap_or(rest);
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if rest.is_empty() || rest.len() > MAX_NAME_LEN || !rest.split('.').all(label_ok) {
            return Err(format!(
                "{s:?} is not a name: use letters, digits, `-` and `_` in dot-separated \
                 labels, optionally after `*.` (e.g. db.internal, *.svc.cluster.local)"
            ));
        }
        Ok(NamePattern {
            name: rest.to_ascii_lowercase(),
            wildcard,
        })
    }
}

impl std::fmt::Display for NamePattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.wildcard {
            f.write_str("*.")?;
        }
        f.write_str(&self.name)
    }
}

impl From<NamePattern> for String {
    fn from(p: NamePattern) -> String {
        p.to_string()
    }
}

impl TryFrom<String> for NamePattern {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

/// The names a program's look-ups returned for each address; thread-safe,
/// bounded (see the module docs).
#[derive(Debug, Default)]
pub struct ResolvedNames {
    inner: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    names: HashMap<IpAddr, Vec<Arc<str>>>,
    /// Addresses in the order first recorded, for eviction.
    order: VecDeque<IpAddr>,
}

impl ResolvedNames {
    /// Remembers that `name` resolved to `addrs`. Names are kept in lower case
    /// without a trailing dot; IPv4-mapped addresses as IPv4.
    pub fn record(&self, name: &str, addrs: &[IpAddr]) {
        let name = name.strip_suffix('.').unwrap_or(name);
        if name.is_empty() || name.len() > MAX_NAME_LEN {
            return;
        }
        let name: Arc<str> = name.to_ascii_lowercase().into();
        let mut table = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for ip in addrs {
            let ip = super::unmap(*ip);
            let Table { names, order } = &mut *table;
            let entry = names.entry(ip).or_insert_with(|| {
                order.push_back(ip);
                Vec::new()
            });
            if !entry.contains(&name) {
                if entry.len() == NAMES_PER_ADDRESS {
                    entry.remove(0);
                }
                entry.push(name.clone());
            }
            while table.order.len() > MAX_ADDRESSES {
                if let Some(old) = table.order.pop_front() {
                    table.names.remove(&old);
                }
            }
        }
    }

    /// Whether `hit` is true for one of the names behind `ip`.
    pub fn any_name(&self, ip: IpAddr, mut hit: impl FnMut(&str) -> bool) -> bool {
        let table = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        table
            .names
            .get(&super::unmap(ip))
            .is_some_and(|names| names.iter().any(|n| hit(n)))
    }

    /// The names behind `ip`, most recent last.
    pub fn names(&self, ip: IpAddr) -> Vec<Arc<str>> {
        let table = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        table
            .names
            .get(&super::unmap(ip))
            .cloned()
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_names_and_subdomains() {
        let exact: NamePattern = "DB.internal.".parse().unwrap();
        assert!(exact.matches("db.INTERNAL"));
        assert!(exact.matches("db.internal."));
        assert!(!exact.matches("x.db.internal"));
        let wild: NamePattern = "*.svc.cluster.local".parse().unwrap();
        assert!(wild.matches("web.shop.svc.cluster.local."));
        assert!(wild.matches("A.SVC.cluster.local"));
        assert!(!wild.matches("svc.cluster.local"));
        assert!(!wild.matches("xsvc.cluster.local"));
        assert!(!wild.matches(".svc.cluster.local"));
        for bad in [
            "",
            "*.",
            "*",
            "a b",
            "a..b",
            "*foo",
            "é.com",
            &"a".repeat(64),
        ] {
            assert!(bad.parse::<NamePattern>().is_err(), "{bad}");
        }
    }

    #[test]
    fn names_are_bounded_and_unmapped() {
        let names = ResolvedNames::default();
        names.record("A.example.", &["::ffff:10.0.0.1".parse().unwrap()]);
        assert_eq!(&*names.names("10.0.0.1".parse().unwrap())[0], "a.example");
        for i in 0..NAMES_PER_ADDRESS + 3 {
            names.record(&format!("n{i}.example"), &["10.0.0.2".parse().unwrap()]);
        }
        assert_eq!(
            names.names("10.0.0.2".parse().unwrap()).len(),
            NAMES_PER_ADDRESS
        );
        for i in 0..MAX_ADDRESSES as u32 + 10 {
            names.record(
                "flood.example",
                &[IpAddr::from((0x0b00_0000 + i).to_be_bytes())],
            );
        }
        let table = names.inner.lock().unwrap();
        assert_eq!(table.names.len(), MAX_ADDRESSES);
        assert_eq!(table.order.len(), MAX_ADDRESSES);
        assert!(
            !table
                .names
                .contains_key(&"10.0.0.1".parse::<IpAddr>().unwrap())
        );
    }
}
