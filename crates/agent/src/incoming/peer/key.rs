//! The hub key: a random 256-bit secret that only processes with
//! `CAP_NET_ADMIN` over the target network namespace's owning user namespace can
//! read, kept in an nf_tables table of that namespace.
//!
//! The hub's owner creates the table [`TABLE`] (family `inet`) with
//! `NFT_TABLE_F_OWNER` and the key in its user data (`NFTA_TABLE_USERDATA`,
//! Linux ≥ 5.13). Every nfnetlink request, reads included, needs `CAP_NET_ADMIN`
//! over the user namespace that owns the network namespace (`nfnetlink_rcv`
//! checks `netlink_net_capable`), so a process in the pod without that
//! capability, or with it only in a user namespace of its own (`unshare -Ur`),
//! gets `EPERM` and never sees the key. The table is owned by the netlink socket
//! that created it: the kernel deletes it when that socket closes, i.e. when the
//! owner ends whatever kills it, and the next owner publishes a fresh key.
//! Creating it with `NLM_F_EXCL` is also the election of the hub's owner: the
//! kernel lets exactly one agent create it.
//!
//! The key authenticates both ends of the hub link ([`Key::proof`], HMAC-SHA256
//! over both ends' nonces and the prover's role, RFC 2104) and names the hub's
//! abstract socket ([`Key::hub_name`]), so a process that cannot read the key
//! cannot even know which name to squat.
//!
//! Message layouts: `linux/netlink.h`, `linux/netfilter/nfnetlink.h`,
//! `linux/netfilter/nf_tables.h`.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::time::Duration;

use graft_protocol::secret;
use hmac::{KeyInit, Mac};
use rustix::io::Errno;
use rustix::net::{
    AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType, netlink, recv, send, socket_with,
    sockopt,
};

/// The nf_tables table (family `inet`) that carries the hub key.
pub const TABLE: &str = "graft_hub_v1";

/// The prefix of every hub's abstract socket name; the rest comes from the key.
pub const HUB_NAME_PREFIX: &str = "graft-hub-1-";

/// Length of the key, and of nonces and proofs, in bytes.
pub const LEN: usize = 32;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NFPROTO_INET: u8 = 1;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_TABLE_USERDATA: u16 = 6;
const NFT_TABLE_F_OWNER: u32 = 0x2;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
/// `NF_INET_PRE_ROUTING` (include/uapi/linux/netfilter.h).
const NF_INET_PRE_ROUTING: u32 = 0;
/// `NF_IP_PRI_NAT_DST` (include/uapi/linux/netfilter_ipv4.h): `dstnat`.
const NF_IP_PRI_NAT_DST: i32 = -100;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_CT_DREG: u16 = 1;
const NFTA_CT_KEY: u16 = 2;
const NFT_CT_STATE: u32 = 0;
const NFT_REG32_00: u32 = 8;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// Why the key could not be read or published.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// This process lacks `CAP_NET_ADMIN` over the network namespace.
    #[error(
        "reading the target's hub key in nf_tables was refused (EPERM): the agent needs \
         CAP_NET_ADMIN over the target's network namespace"
    )]
    Permission,
    /// nf_tables (or table user data / owner flags) is not available.
    #[error(
        "the target's kernel offers no nf_tables with owned tables ({0}); sessions on one \
         target share its traffic through a hub keyed in nf_tables (Linux >= 5.13, module \
         nf_tables): load the module on the node, or run one session per target"
    )]
    Unsupported(Errno),
    /// Any other netlink failure.
    #[error("talking to nf_tables about the target's hub key failed: {0}")]
    Netlink(io::Error),
    /// The table exists but holds no valid key.
    #[error("the nf_tables table {TABLE} holds no valid hub key")]
    Malformed,
}

impl From<io::Error> for KeyError {
    fn from(e: io::Error) -> KeyError {
        KeyError::Netlink(e)
    }
}

impl From<Errno> for KeyError {
    fn from(e: Errno) -> KeyError {
        match e {
            Errno::PERM | Errno::ACCESS => KeyError::Permission,
            Errno::PROTONOSUPPORT | Errno::AFNOSUPPORT | Errno::OPNOTSUPP | Errno::INVAL => {
                KeyError::Unsupported(e)
            }
            other => KeyError::Netlink(other.into()),
        }
    }
}

/// Which end of the hub link a proof is made by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The hub's owner.
    Hub,
    /// An agent joining it.
    Peer,
}

/// A hub key.
#[derive(Clone)]
pub struct Key([u8; LEN]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

impl Key {
    /// A fresh random key.
    ///
    /// # Errors
    ///
    /// The system's random source failed.
    pub fn generate() -> io::Result<Key> {
        secret::random_bytes().map(Key)
    }

    /// A key from its bytes.
    #[cfg(test)]
    pub fn from_bytes(bytes: [u8; LEN]) -> Key {
        Key(bytes)
    }

    fn mac(&self) -> HmacSha256 {
        <HmacSha256 as KeyInit>::new_from_slice(&self.0).expect("HMAC accepts keys of any length")
    }

    /// The abstract socket name of the hub keyed by this key.
    pub fn hub_name(&self) -> String {
        let mut mac = self.mac();
        mac.update(b"graft hub v1 socket name");
        let tag = mac.finalize().into_bytes();
        format!("{HUB_NAME_PREFIX}{}", secret::hex(&tag[..16]))
    }

    fn transcript(&self, role: Role, hub_nonce: &[u8; LEN], peer_nonce: &[u8; LEN]) -> HmacSha256 {
        let mut mac = self.mac();
        mac.update(match role {
            Role::Hub => b"graft hub v1 proof by the hub ",
            Role::Peer => b"graft hub v1 proof by a peer ",
        });
        mac.update(hub_nonce);
        mac.update(peer_nonce);
        mac
    }

    /// The proof that `role` knows the key, for this pair of nonces.
    pub fn proof(&self, role: Role, hub_nonce: &[u8; LEN], peer_nonce: &[u8; LEN]) -> [u8; LEN] {
        self.transcript(role, hub_nonce, peer_nonce)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Whether `given` is `role`'s proof for these nonces (constant time).
    pub fn verify(
        &self,
        role: Role,
        hub_nonce: &[u8; LEN],
        peer_nonce: &[u8; LEN],
        given: &[u8],
    ) -> bool {
        self.transcript(role, hub_nonce, peer_nonce)
            .verify_slice(given)
            .is_ok()
    }
}

/// A fresh random nonce.
///
/// # Errors
///
/// The system's random source failed.
pub fn nonce() -> io::Result<[u8; LEN]> {
    secret::random_bytes()
}

/// The key published in the target's nf_tables, held for as long as this value
/// lives: dropping it closes the owning netlink socket and the kernel deletes the
/// table.
#[derive(Debug)]
pub struct Published {
    /// The key.
    pub key: Key,
    _owner: OwnedFd,
}

/// Publishes a fresh key, unless another agent already has (`Ok(None)`: read
/// its key, or try again when there is none any more).
///
/// # Errors
///
/// [`KeyError`]: no privilege, no nf_tables, netlink failures.
pub fn publish() -> Result<Option<Published>, KeyError> {
    let key = Key::generate()?;
    let socket = open()?;
    let mut buf = Vec::with_capacity(256);
    put_batch_marker(&mut buf, NFNL_MSG_BATCH_BEGIN, 1);
    let start = begin_message(
        &mut buf,
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        2,
        NFPROTO_INET,
        0,
    );
    put_attr(&mut buf, NFTA_TABLE_NAME, &name_z());
    put_attr(&mut buf, NFTA_TABLE_FLAGS, &NFT_TABLE_F_OWNER.to_be_bytes());
    put_attr(&mut buf, NFTA_TABLE_USERDATA, &key.0);
    end_message(&mut buf, start);
    put_batch_marker(&mut buf, NFNL_MSG_BATCH_END, 3);
    send(&socket, &buf, SendFlags::empty())?;
    match wait_ack(&socket, 2, |_, _| {}) {
        Ok(()) => Ok(Some(Published {
            key,
            _owner: socket,
        })),
        Err(Errno::EXIST) => Ok(None),
        // A table owned by another agent's socket (alive, or dead and not yet
        // reaped by the kernel) answers creation with EPERM (`nft_table_lookup`),
        // the same code as no privilege at all: a read, which needs the same
        // privilege but no ownership, tells which. The caller tries again.
        Err(Errno::PERM) => read().map(|_| None),
        Err(e) => Err(e.into()),
    }
}

/// Keeps connection tracking on in the target's network namespace while it
/// lives: an nf_tables table owned by this agent (deleted by the kernel with it)
/// with a `nat` chain at `prerouting` whose one rule loads the
/// connection state.
///
/// Redirected connections depend on conntrack and on NAT to translate their
/// packets, and the kernel turns conntrack off in a network namespace
/// (`nf_ct_netns_put`) as soon as the last rule that uses it goes, and its NAT
/// hooks off as soon as the last `nat` chain goes (`nf_nat_unregister_fn`, which
/// stops translating established connections too): when the hub's owner ended
/// and its `REDIRECT` rules were removed, connections it had handed to other
/// agents were reset, the NAT case whenever a packet crossed before the next
/// owner's rules came. Every agent on the hub holds one of these, so connections
/// handed over whole keep flowing whoever owns the hub. The chain sees only the
/// first packet of each connection and lets it pass (its policy is accept).
#[derive(Debug)]
pub struct ConntrackHold {
    _owner: OwnedFd,
}

/// Creates this agent's [`ConntrackHold`].
///
/// # Errors
///
/// [`KeyError`]: no privilege, no nf_tables, netlink failures.
pub fn hold_conntrack() -> Result<ConntrackHold, KeyError> {
    let suffix = secret::random_hex(4)?;
    let mut table = format!("graft_ct_{suffix}").into_bytes();
    table.push(0);
    let chain = b"keep\0".to_vec();
    let socket = open()?;
    let create = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    let mut buf = Vec::with_capacity(512);
    put_batch_marker(&mut buf, NFNL_MSG_BATCH_BEGIN, 1);
    let start = begin_message(
        &mut buf,
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE,
        create,
        2,
        NFPROTO_INET,
        0,
    );
    put_attr(&mut buf, NFTA_TABLE_NAME, &table);
    put_attr(&mut buf, NFTA_TABLE_FLAGS, &NFT_TABLE_F_OWNER.to_be_bytes());
    end_message(&mut buf, start);
    let start = begin_message(
        &mut buf,
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWCHAIN,
        create,
        3,
        NFPROTO_INET,
        0,
    );
    put_attr(&mut buf, NFTA_CHAIN_TABLE, &table);
    put_attr(&mut buf, NFTA_CHAIN_NAME, &chain);
    let mut hook = Vec::new();
    put_attr(
        &mut hook,
        NFTA_HOOK_HOOKNUM,
        &NF_INET_PRE_ROUTING.to_be_bytes(),
    );
    put_attr(
        &mut hook,
        NFTA_HOOK_PRIORITY,
        &NF_IP_PRI_NAT_DST.to_be_bytes(),
    );
    put_attr(&mut buf, NFTA_CHAIN_HOOK | NLA_F_NESTED, &hook);
    put_attr(&mut buf, NFTA_CHAIN_TYPE, b"nat\0");
    end_message(&mut buf, start);
    let start = begin_message(
        &mut buf,
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
        4,
        NFPROTO_INET,
        0,
    );
    put_attr(&mut buf, NFTA_RULE_TABLE, &table);
    put_attr(&mut buf, NFTA_RULE_CHAIN, &chain);
    // expressions: [ ct load state => reg 8 ]
    let mut ct = Vec::new();
    put_attr(&mut ct, NFTA_CT_DREG, &NFT_REG32_00.to_be_bytes());
    put_attr(&mut ct, NFTA_CT_KEY, &NFT_CT_STATE.to_be_bytes());
    let mut expr = Vec::new();
    put_attr(&mut expr, NFTA_EXPR_NAME, b"ct\0");
    put_attr(&mut expr, NFTA_EXPR_DATA | NLA_F_NESTED, &ct);
    let mut list = Vec::new();
    put_attr(&mut list, NFTA_LIST_ELEM | NLA_F_NESTED, &expr);
    put_attr(&mut buf, NFTA_RULE_EXPRESSIONS | NLA_F_NESTED, &list);
    end_message(&mut buf, start);
    put_batch_marker(&mut buf, NFNL_MSG_BATCH_END, 5);
    send(&socket, &buf, SendFlags::empty())?;
    wait_ack(&socket, 4, |_, _| {})?;
    Ok(ConntrackHold { _owner: socket })
}

/// Reads the key of the current hub, `None` when no hub exists.
///
/// # Errors
///
/// [`KeyError`]: no privilege, no nf_tables, netlink failures, a table without a key.
pub fn read() -> Result<Option<Key>, KeyError> {
    let socket = open()?;
    let mut buf = Vec::with_capacity(64);
    let start = begin_message(
        &mut buf,
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE,
        NLM_F_REQUEST | NLM_F_ACK,
        1,
        NFPROTO_INET,
        0,
    );
    put_attr(&mut buf, NFTA_TABLE_NAME, &name_z());
    end_message(&mut buf, start);
    send(&socket, &buf, SendFlags::empty())?;
    let mut found: Option<Vec<u8>> = None;
    let result = wait_ack(&socket, 1, |kind, payload| {
        if kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE && payload.len() >= 4 {
            for (attr, value) in attrs(&payload[4..]) {
                if attr == NFTA_TABLE_USERDATA {
                    found = Some(value.to_vec());
                }
            }
        }
    });
    match result {
        Ok(()) => {}
        Err(Errno::NOENT) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let bytes: [u8; LEN] = found
        .and_then(|v| v.try_into().ok())
        .ok_or(KeyError::Malformed)?;
    Ok(Some(Key(bytes)))
}

fn name_z() -> Vec<u8> {
    let mut name = TABLE.as_bytes().to_vec();
    name.push(0);
    name
}

fn open() -> Result<OwnedFd, KeyError> {
    let socket = socket_with(
        AddressFamily::NETLINK,
        SocketType::RAW,
        SocketFlags::CLOEXEC,
        Some(netlink::NETFILTER),
    )?;
    rustix::net::bind(&socket, &netlink::SocketAddrNetlink::new(0, 0))?;
    // The kernel answers nfnetlink requests while handling the send; the timeout
    // only guards against a reply that never comes.
    sockopt::set_socket_timeout(
        &socket,
        sockopt::Timeout::Recv,
        Some(Duration::from_secs(2)),
    )?;
    Ok(socket)
}

/// Appends a netlink header (length patched by [`end_message`]) and an
/// `nfgenmsg`; returns where the message starts.
fn begin_message(
    buf: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.push(family);
    buf.push(0); // NFNETLINK_V0
    buf.extend_from_slice(&res_id.to_be_bytes());
    start
}

fn end_message(buf: &mut [u8], start: usize) {
    let len = (buf.len() - start) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

fn put_batch_marker(buf: &mut Vec<u8>, kind: u16, seq: u32) {
    let start = begin_message(buf, kind, NLM_F_REQUEST, seq, 0, NFNL_SUBSYS_NFTABLES);
    end_message(buf, start);
}

fn put_attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = (4 + value.len()) as u16;
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

/// The attributes of a message body: (type, value).
fn attrs(mut body: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if body.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([body[0], body[1]]) as usize;
        let kind = u16::from_ne_bytes([body[2], body[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > body.len() {
            return None;
        }
        let value = &body[4..len];
        body = &body[len.next_multiple_of(4).min(body.len())..];
        Some((kind, value))
    })
}

/// Reads answers until the acknowledgement (or error) of message `seq`; every
/// other message goes to `each` as (type, payload).
fn wait_ack(socket: &OwnedFd, seq: u32, mut each: impl FnMut(u16, &[u8])) -> Result<(), Errno> {
    let mut storage = vec![MaybeUninit::<u8>::uninit(); 65536];
    loop {
        let (filled, _) = recv(socket, &mut storage[..], RecvFlags::empty())?;
        let mut data: &[u8] = filled.0;
        while data.len() >= 16 {
            let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
            let kind = u16::from_ne_bytes([data[4], data[5]]);
            let msg_seq = u32::from_ne_bytes([data[8], data[9], data[10], data[11]]);
            if len < 16 || len > data.len() {
                return Err(Errno::PROTO);
            }
            let payload = &data[16..len];
            match kind {
                NLMSG_ERROR => {
                    let code = payload
                        .get(..4)
                        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                        .ok_or(Errno::PROTO)?;
                    if code != 0 {
                        return Err(Errno::from_raw_os_error(-code));
                    }
                    if msg_seq == seq {
                        return Ok(());
                    }
                }
                NLMSG_DONE => {}
                _ => each(kind, payload),
            }
            data = &data[len.next_multiple_of(4).min(data.len())..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_are_bound_to_role_nonces_and_key() {
        let key = Key::from_bytes([7; LEN]);
        let other = Key::from_bytes([8; LEN]);
        let (h, p) = ([1; LEN], [2; LEN]);
        let hub = key.proof(Role::Hub, &h, &p);
        assert!(key.verify(Role::Hub, &h, &p, &hub));
        // A peer's proof is no hub proof (no reflection), other nonces or another
        // key do not verify, and a truncated proof is refused.
        assert!(!key.verify(Role::Peer, &h, &p, &hub));
        assert!(!key.verify(Role::Hub, &p, &h, &hub));
        assert!(!other.verify(Role::Hub, &h, &p, &hub));
        assert!(!key.verify(Role::Hub, &h, &p, &hub[..16]));
    }

    #[test]
    fn hub_names_depend_on_the_key_only() {
        let a = Key::from_bytes([1; LEN]);
        let b = Key::from_bytes([2; LEN]);
        assert_eq!(a.hub_name(), Key::from_bytes([1; LEN]).hub_name());
        assert_ne!(a.hub_name(), b.hub_name());
        assert!(a.hub_name().starts_with(HUB_NAME_PREFIX));
        assert_eq!(a.hub_name().len(), HUB_NAME_PREFIX.len() + 32);
    }

    #[test]
    fn attributes_are_padded_and_parsed_back() {
        let mut buf = Vec::new();
        put_attr(&mut buf, NFTA_TABLE_NAME, &name_z());
        put_attr(&mut buf, NFTA_TABLE_USERDATA, &[9; LEN]);
        assert_eq!(buf.len() % 4, 0);
        let parsed: Vec<_> = attrs(&buf).collect();
        assert_eq!(parsed[0], (NFTA_TABLE_NAME, &name_z()[..]));
        assert_eq!(parsed[1], (NFTA_TABLE_USERDATA, &[9u8; LEN][..]));
    }
}
