//! The nf_tables backend: one table the kernel owns on the agent's behalf and
//! deletes, with every rule in it, the moment the agent's netlink socket closes.
//!
//! A table created with `NFT_TABLE_F_OWNER` (Linux ≥ 5.12, commit 6001a930ce03
//! "netfilter: nftables: introduce table ownership") belongs to the netlink
//! socket that created it: no other socket may change it, and when that socket
//! is released (the agent exits, is killed with `kill -9`, its whole process group
//! or cgroup is killed, the OOM killer takes it) the kernel removes the table.
//! No watchdog, no cleanup command, nothing left behind, whatever kills the agent.
//! [`OwnerTable`] therefore keeps its socket open for the agent's whole life.
//!
//! The table, in `nft` syntax (`GRAFT-0badcafe` stands for the agent's name):
//!
//! ```text
//! table inet GRAFT-0badcafe {            # flags owner
//!     chain prerouting {
//!         type nat hook prerouting priority dstnat - 1; policy accept;
//!         ip saddr 198.19.128.1 accept                     # probe sources
//!         meta nfproto ipv4 tcp dport 8080 redirect to :41234
//!         meta nfproto ipv6 tcp dport 8080 redirect to :41235
//!     }
//! }
//! ```
//!
//! Priority `dstnat - 1` (-101) runs the chain just before iptables' `nat
//! PREROUTING` (-100), so a port is redirected to the agent even when the pod
//! has its own nat rules (a service mesh's init container). Every change
//! rewrites the chain's rules in one nf_tables transaction (flush, then add),
//! so a connection never sees a half-written set. Messages are built with
//! `netlink-packet-netfilter` (their layout: `include/uapi/linux/netfilter/nf_tables.h`)
//! and sent over a `netlink-sys` socket.

use std::collections::BTreeMap;
use std::io;
use std::net::IpAddr;
use std::time::Duration;

use netlink_packet_core::{
    DefaultNla, NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_netfilter::nftables::{
    ChainAttribute, ChainMessage, Cmp, DataAttribute, Expressions, Hook, HookNumber, Immediate,
    InetHookNumber, ListAttribute, Meta, MetaKey, NfTablesMessage, Operator, Payload, Register,
    RuleAttribute, RuleMessage, TableAttribute, TableFlags, TableMessage, Verdict,
    VerdictAttribute,
};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use netlink_sys::{Socket, constants::NETLINK_NETFILTER};

/// The base chain's name inside the agent's table.
pub const CHAIN: &str = "prerouting";

/// The chain's priority: `dstnat - 1`, just before iptables' nat PREROUTING.
const PRIORITY: i32 = -101;

/// How long the kernel may take to answer a transaction.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// `NFNL_SUBSYS_NFTABLES`, the batch's resource id (`nfnetlink.h`).
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// `NFPROTO_IPV4` / `NFPROTO_IPV6`, the values `meta nfproto` loads.
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
/// `NFT_PAYLOAD_NETWORK_HEADER` / `NFT_PAYLOAD_TRANSPORT_HEADER`.
const PAYLOAD_NETWORK: u32 = 1;
const PAYLOAD_TRANSPORT: u32 = 2;
/// `NFTA_REDIR_REG_PROTO_MIN`: the register holding the port to redirect to.
const NFTA_REDIR_REG_PROTO_MIN: u16 = 1;
/// `NF_ACCEPT`, the verdict code of `accept`.
const NF_ACCEPT: u32 = 1;
/// `NFT_REG_1`, as the kernel numbers it in a `redir` attribute.
const NFT_REG_1: u32 = 1;

/// A failed nf_tables transaction.
#[derive(Debug, thiserror::Error)]
#[error("nf_tables could not {what}: {error}{hint}")]
pub struct NftError {
    /// What was attempted.
    what: &'static str,
    /// The kernel's (or the socket's) error.
    error: io::Error,
    /// What the error usually means.
    hint: &'static str,
}

impl NftError {
    fn new(what: &'static str, source: io::Error) -> NftError {
        let hint = match source.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => {
                " (tables owned by the agent need Linux 5.12 or later)"
            }
            Some(libc::EPROTONOSUPPORT) | Some(libc::ENOENT) => {
                " (the kernel has no nf_tables, or not its nat support: modules nf_tables, nft_chain_nat, nft_redir)"
            }
            Some(libc::EPERM) => {
                " (the agent needs CAP_NET_ADMIN in the target's network namespace)"
            }
            _ => "",
        };
        NftError {
            what,
            error: source,
            hint,
        }
    }
}

/// The agent's owner table and the netlink socket that owns it.
///
/// The agent's death closes the socket, and the kernel deletes the table with
/// every rule in it. Dropping it parks the socket until [`close_parked`]: on an
/// orderly exit the agent first resets its connections (whose reset packets
/// still need the table's NAT mapping, or the client never sees them) and then
/// removes the rules.
#[derive(Debug)]
pub struct OwnerTable {
    socket: Option<Socket>,
    name: String,
    seq: u32,
    excluded: Vec<IpAddr>,
    /// Redirected port → the agent's listener ports (IPv4, IPv6).
    redirects: BTreeMap<u16, (u16, Option<u16>)>,
}

impl OwnerTable {
    /// Creates the table `name` owned by a new netlink socket of the calling
    /// thread's network namespace, with its base chain and the rules that let
    /// connections from `excluded` sources through untouched.
    ///
    /// # Errors
    ///
    /// [`NftError`] when the socket cannot be opened or the kernel refuses the
    /// table (no nf_tables, a kernel older than 5.12, no `CAP_NET_ADMIN`).
    pub fn create(name: &str, excluded: &[IpAddr]) -> Result<OwnerTable, NftError> {
        let open = |e| NftError::new("open a netlink socket", e);
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(open)?;
        socket.bind_auto().map_err(open)?;
        // Acks without a copy of the request.
        let _ = socket.set_cap_ack(true);
        nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(ANSWER_TIMEOUT.as_secs() as i64, 0),
        )
        .map_err(|e| open(e.into()))?;
        let mut table = OwnerTable {
            socket: Some(socket),
            name: name.to_owned(),
            seq: 0,
            excluded: excluded.to_vec(),
            redirects: BTreeMap::new(),
        };
        let mut batch = vec![table.new_table(), table.new_chain()];
        batch.extend(table.rules());
        table
            .transact(batch)
            .map_err(|e| NftError::new("create the agent's table", e))?;
        Ok(table)
    }

    /// Redirects TCP connections to `port` to the agent's listener `to_v4` (IPv4)
    /// and `to_v6` (IPv6, when the agent has an IPv6 listener).
    ///
    /// # Errors
    ///
    /// [`NftError`] when the kernel refuses the rules; nothing changed then.
    pub fn redirect(&mut self, port: u16, to_v4: u16, to_v6: Option<u16>) -> Result<(), NftError> {
        let before = self.redirects.insert(port, (to_v4, to_v6));
        let result = self.sync();
        if result.is_err() {
            match before {
                Some(b) => self.redirects.insert(port, b),
                None => self.redirects.remove(&port),
            };
        }
        result.map_err(|e| NftError::new("add the redirect rules", e))
    }

    /// Stops redirecting `port`.
    ///
    /// # Errors
    ///
    /// [`NftError`] when the kernel refuses the change.
    pub fn release(&mut self, port: u16) -> Result<(), NftError> {
        if self.redirects.remove(&port).is_none() {
            return Ok(());
        }
        self.sync()
            .map_err(|e| NftError::new("remove the redirect rules", e))
    }

    /// Rewrites the chain: flush, then every rule, in one transaction.
    fn sync(&mut self) -> io::Result<()> {
        let mut batch = vec![self.message(
            NfTablesMessage::DeleteRule(RuleMessage {
                attributes: vec![
                    RuleAttribute::Table(self.name.clone()),
                    RuleAttribute::Chain(CHAIN.to_owned()),
                ],
            }),
            0,
        )];
        batch.extend(self.rules());
        self.transact(batch)
    }

    fn new_table(&self) -> NetlinkMessage<NetfilterMessage> {
        self.message(
            NfTablesMessage::NewTable(TableMessage {
                attributes: vec![
                    TableAttribute::Name(self.name.clone()),
                    TableAttribute::Flags(TableFlags::Owner),
                ],
            }),
            NLM_F_CREATE,
        )
    }

    fn new_chain(&self) -> NetlinkMessage<NetfilterMessage> {
        self.message(
            NfTablesMessage::NewChain(ChainMessage {
                attributes: vec![
                    ChainAttribute::Table(self.name.clone()),
                    ChainAttribute::Name(CHAIN.to_owned()),
                    ChainAttribute::Hook(vec![
                        Hook::Number(HookNumber::Inet(InetHookNumber::PreRouting)),
                        Hook::Priority(PRIORITY as u32),
                    ]),
                    ChainAttribute::Policy(NF_ACCEPT),
                    ChainAttribute::Type("nat".to_owned()),
                ],
            }),
            NLM_F_CREATE,
        )
    }

    /// The chain's rules: the excluded sources first, then the redirects.
    fn rules(&self) -> Vec<NetlinkMessage<NetfilterMessage>> {
        let excluded = self.excluded.iter().map(|addr| accept_from(*addr));
        let redirects = self.redirects.iter().flat_map(|(port, (v4, v6))| {
            let mut rules = vec![redirect(NFPROTO_IPV4, *port, *v4)];
            if let Some(v6) = v6 {
                rules.push(redirect(NFPROTO_IPV6, *port, *v6));
            }
            rules
        });
        excluded
            .chain(redirects)
            .map(|expressions| {
                self.message(
                    NfTablesMessage::NewRule(RuleMessage {
                        attributes: vec![
                            RuleAttribute::Table(self.name.clone()),
                            RuleAttribute::Chain(CHAIN.to_owned()),
                            RuleAttribute::Expressions(
                                expressions.into_iter().map(ListAttribute::from).collect(),
                            ),
                        ],
                    }),
                    NLM_F_CREATE | netlink_packet_core::NLM_F_APPEND,
                )
            })
            .collect()
    }

    fn message(&self, inner: NfTablesMessage, flags: u16) -> NetlinkMessage<NetfilterMessage> {
        let mut message = NetlinkMessage::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0),
            inner,
        ));
        message.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        message
    }

    /// Sends `commands` as one nf_tables batch and waits for every command's
    /// answer; the first error is returned (the kernel then applied none).
    fn transact(&mut self, commands: Vec<NetlinkMessage<NetfilterMessage>>) -> io::Result<()> {
        let control = |inner: ControlMessage| {
            let mut m = NetlinkMessage::from(NetfilterMessage::new(
                NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES),
                inner,
            ));
            m.header.flags = NLM_F_REQUEST;
            m
        };
        let mut all = Vec::with_capacity(commands.len() + 2);
        all.push(control(ControlMessage::BatchBegin));
        all.extend(commands);
        all.push(control(ControlMessage::BatchEnd));
        let first = self.seq.wrapping_add(1);
        let mut wire = Vec::new();
        for message in &mut all {
            self.seq = self.seq.wrapping_add(1);
            message.header.sequence_number = self.seq;
            message.finalize();
            let start = wire.len();
            wire.resize(start + message.buffer_len(), 0);
            message.serialize(&mut wire[start..]);
        }
        let socket = self
            .socket
            .as_ref()
            .expect("the socket is only taken on drop");
        socket.send(&wire, 0)?;
        // Answers are expected for the commands, not for BEGIN and END.
        let expected: Vec<u32> = (first.wrapping_add(1)..self.seq).collect();
        let mut answered = 0usize;
        let mut error: Option<io::Error> = None;
        let mut buf = vec![0u8; 64 * 1024];
        while answered < expected.len() {
            let n = socket.recv(&mut &mut buf[..], 0)?;
            let mut offset = 0;
            while offset < n {
                let message = NetlinkMessage::<NetfilterMessage>::deserialize(&buf[offset..n])
                    .map_err(|e| {
                        io::Error::new(io::ErrorKind::InvalidData, format!("netlink: {e}"))
                    })?;
                let len = message.header.length as usize;
                if len == 0 {
                    break;
                }
                offset += (len + 3) & !3;
                if !expected.contains(&message.header.sequence_number) {
                    continue; // a late answer to an earlier transaction
                }
                if let NetlinkPayload::Error(e) = &message.payload {
                    answered += 1;
                    if e.code.is_some() && error.is_none() {
                        error = Some(e.to_io());
                    }
                }
            }
        }
        error.map_or(Ok(()), Err)
    }
}

/// Owner sockets of dropped tables, closed by [`close_parked`].
static PARKED: std::sync::Mutex<Vec<Socket>> = std::sync::Mutex::new(Vec::new());

impl Drop for OwnerTable {
    fn drop(&mut self) {
        if let (Some(socket), Ok(mut parked)) = (self.socket.take(), PARKED.lock()) {
            parked.push(socket);
        }
    }
}

/// Closes the sockets of dropped owner tables: the kernel deletes their tables.
/// The agent calls it on its way out, once its connections are reset.
pub fn close_parked() {
    if let Ok(mut parked) = PARKED.lock() {
        parked.clear();
    }
}

/// `meta nfproto FAMILY`.
fn match_family(family: u8) -> [Expressions; 2] {
    [
        Expressions::Meta(vec![
            Meta::Key(MetaKey::Nfproto),
            Meta::DestinationRegister(Register::Reg1),
        ]),
        equal(vec![family]),
    ]
}

/// `cmp eq reg 1 VALUE`.
fn equal(value: Vec<u8>) -> Expressions {
    Expressions::Cmp(vec![
        Cmp::SourceRegister(Register::Reg1),
        Cmp::Op(Operator::Equal),
        Cmp::Data(DataAttribute::Value(value)),
    ])
}

/// `payload load LEN bytes at BASE + OFFSET => reg 1`.
fn load(base: u32, offset: u32, len: u32) -> Expressions {
    Expressions::Payload(vec![
        Payload::DestinationRegister(Register::Reg1),
        Payload::Base(base),
        Payload::Offset(offset),
        Payload::Len(len),
    ])
}

/// `ip saddr ADDR accept` / `ip6 saddr ADDR accept`.
fn accept_from(addr: IpAddr) -> Vec<Expressions> {
    let (family, offset, bytes) = match addr {
        IpAddr::V4(a) => (NFPROTO_IPV4, 12, a.octets().to_vec()),
        IpAddr::V6(a) => (NFPROTO_IPV6, 8, a.octets().to_vec()),
    };
    let mut exprs = match_family(family).to_vec();
    exprs.push(load(PAYLOAD_NETWORK, offset, bytes.len() as u32));
    exprs.push(equal(bytes));
    exprs.push(Expressions::Immediate(vec![
        Immediate::DestinationRegister(Register::Verdict),
        Immediate::Data(DataAttribute::Verdict(vec![VerdictAttribute::Code(
            Verdict::Other(NF_ACCEPT),
        )])),
    ]));
    exprs
}

/// `meta nfproto FAMILY meta l4proto tcp tcp dport PORT redirect to :TO`.
fn redirect(family: u8, port: u16, to: u16) -> Vec<Expressions> {
    let mut exprs = match_family(family).to_vec();
    exprs.push(Expressions::Meta(vec![
        Meta::Key(MetaKey::L4Proto),
        Meta::DestinationRegister(Register::Reg1),
    ]));
    exprs.push(equal(vec![libc::IPPROTO_TCP as u8]));
    exprs.push(load(PAYLOAD_TRANSPORT, 2, 2));
    exprs.push(equal(port.to_be_bytes().to_vec()));
    exprs.push(Expressions::Immediate(vec![
        Immediate::DestinationRegister(Register::Reg1),
        Immediate::Data(DataAttribute::Value(to.to_be_bytes().to_vec())),
    ]));
    exprs.push(Expressions::Other {
        expression_type: "redir".to_owned(),
        attributes: vec![DefaultNla::new(
            NFTA_REDIR_REG_PROTO_MIN,
            NFT_REG_1.to_be_bytes().to_vec(),
        )],
    });
    exprs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_rule_has_the_expressions_nft_writes() {
        let rule = redirect(NFPROTO_IPV4, 8080, 41234);
        let names: Vec<&str> = rule
            .iter()
            .map(|e| match e {
                Expressions::Meta(_) => "meta",
                Expressions::Cmp(_) => "cmp",
                Expressions::Payload(_) => "payload",
                Expressions::Immediate(_) => "immediate",
                Expressions::Other {
                    expression_type, ..
                } => expression_type.as_str(),
                _ => "?",
            })
            .collect();
        assert_eq!(
            names,
            [
                "meta",
                "cmp",
                "meta",
                "cmp",
                "payload",
                "cmp",
                "immediate",
                "redir"
            ]
        );
    }

    #[test]
    fn errors_say_what_the_kernel_lacks() {
        let old = NftError::new(
            "create the agent's table",
            io::Error::from_raw_os_error(libc::EOPNOTSUPP),
        );
        assert!(old.to_string().contains("Linux 5.12"), "{old}");
        let perm = NftError::new("x", io::Error::from_raw_os_error(libc::EPERM));
        assert!(perm.to_string().contains("CAP_NET_ADMIN"), "{perm}");
    }
}
