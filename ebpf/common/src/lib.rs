//! The datapath ABI: the one definition of every eBPF map key and value, the map names,
//! and the named constants (directions, verdicts, reasons, flags) that the kernel programs
//! and the agent share.
//!
//! Everything here is `#[repr(C)]` with explicit padding so that both sides agree on every
//! byte. Fields whose bytes are matched as a prefix by an LPM trie are stored in network
//! byte order as byte arrays, and their names end in `_be`. With the `user` feature the
//! types implement `aya::Pod` so the agent can read and write them.
#![no_std]

/// Names of the maps in the eBPF object (at most 15 bytes: the kernel's limit).
pub mod map_names {
    /// Host-side interface index -> [`EndpointInfo`](super::EndpointInfo).
    pub const ENDPOINTS: &str = "ENDPOINTS";
    /// LPM trie: IPv4 prefix shorter than /32 -> [`IpcacheValue`](super::IpcacheValue).
    pub const IPCACHE_V4: &str = "IPCACHE_V4";
    /// LPM trie: IPv6 prefix shorter than /128 -> [`IpcacheValue`](super::IpcacheValue).
    pub const IPCACHE_V6: &str = "IPCACHE_V6";
    /// Hash: IPv4 host address (/32) -> [`IpcacheValue`](super::IpcacheValue). Looked up
    /// before `IPCACHE_V4`: a host entry is always the longest prefix, and a hash lookup costs
    /// the same however many entries there are (an LPM trie walks one node per branching).
    pub const IPCACHE_HOST_V4: &str = "IPCACHE_HOST_V4";
    /// Hash: IPv6 host address (/128) -> [`IpcacheValue`](super::IpcacheValue), looked up
    /// before `IPCACHE_V6`.
    pub const IPCACHE_HOST_V6: &str = "IPCACHE_HOST_V6";
    /// Hash: [`PolicyKey`](super::PolicyKey), cut to its prefix length (which the key
    /// carries, see [`PolicyKey::at_prefix`](super::PolicyKey::at_prefix)) ->
    /// [`PolicyValue`](super::PolicyValue).
    pub const POLICY: &str = "POLICY";
    /// Hash: [`PolicyLengthsKey`](super::PolicyLengthsKey) (endpoint, direction, peer
    /// identity) -> u32 bitmap of the prefix lengths POLICY holds entries of for it (bit
    /// `len - 64`, see [`policy_length_bit`](super::policy_length_bit)). The datapath probes
    /// POLICY only at those lengths, longest first, so a lookup costs the same at any size.
    pub const POLICY_LENGTHS: &str = "POLICY_LENGTHS";
    /// LRU hash: [`CtKey`](super::CtKey) -> [`CtValue`](super::CtValue).
    pub const CONNTRACK: &str = "CONNTRACK";
    /// Ring buffer of [`VerdictEvent`](super::VerdictEvent).
    pub const EVENTS: &str = "EVENTS";
    /// Per-CPU array of [`Counter`](super::Counter), indexed by [`counter_index`](super::counter_index).
    pub const COUNTERS: &str = "COUNTERS";
    /// Array of u32 settings, indexed by [`config`](super::config) constants.
    pub const CONFIG: &str = "CONFIG";
    /// LRU hash: [`FragKey`](super::FragKey) -> [`FragValue`](super::FragValue), the ports of
    /// fragmented datagrams, recorded from their first fragment (kernel-internal).
    pub const FRAGMENTS: &str = "FRAGMENTS";
}

/// Names of the programs in the eBPF object.
pub mod program_names {
    /// Attached to the host side's tc ingress: sees what the pod sends (pod egress).
    pub const FROM_POD: &str = "palisade_from_pod";
    /// Attached to the host side's tc egress: sees what the pod receives (pod ingress).
    pub const TO_POD: &str = "palisade_to_pod";
    /// Passes every packet, nothing else: the benchmark's baseline. Never attached.
    pub const EMPTY: &str = "palisade_empty";
}

/// Default map sizes (entries). The agent may override them at load time.
pub mod map_sizes {
    pub const ENDPOINTS: u32 = 4096;
    pub const IPCACHE_V4: u32 = 262_144;
    pub const IPCACHE_V6: u32 = 262_144;
    pub const IPCACHE_HOST_V4: u32 = 262_144;
    pub const IPCACHE_HOST_V6: u32 = 262_144;
    pub const POLICY: u32 = 262_144;
    pub const POLICY_LENGTHS: u32 = 262_144;
    pub const CONNTRACK: u32 = 262_144;
    /// Bytes; a power of two multiple of the page size.
    pub const EVENTS_BYTES: u32 = 1 << 20;
    pub const FRAGMENTS: u32 = 8192;
}

/// Policy direction, always from the pod's point of view.
pub mod direction {
    /// Traffic the pod receives.
    pub const INGRESS: u8 = 0;
    /// Traffic the pod sends.
    pub const EGRESS: u8 = 1;
}

/// Numeric security identities with a fixed meaning (the same numbers as Cilium).
pub mod identity {
    /// In a policy key: any peer identity.
    pub const ANY: u32 = 0;
    pub const HOST: u32 = 1;
    pub const WORLD: u32 = 2;
    pub const UNMANAGED: u32 = 3;
    pub const HEALTH: u32 = 4;
    pub const INIT: u32 = 5;
    pub const REMOTE_NODE: u32 = 6;
    pub const KUBE_APISERVER: u32 = 7;
    pub const INGRESS: u32 = 8;
    /// What an IPv4 peer without an ipcache entry is.
    pub const WORLD_IPV4: u32 = 9;
    /// What an IPv6 peer without an ipcache entry is.
    pub const WORLD_IPV6: u32 = 10;
    /// First identity allocated for label sets.
    pub const FIRST_CLUSTER: u32 = 256;
    /// Scope bit of node-local identities (CIDR identities).
    pub const LOCAL_SCOPE: u32 = 1 << 24;
}

/// IP protocol numbers the datapath understands. `ANY` (0) in a policy key means every
/// protocol (the entry's prefix then stops before the protocol byte).
pub mod proto {
    pub const ANY: u8 = 0;
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
}

/// Address families in events and conntrack keys.
pub mod family {
    pub const IPV4: u8 = 4;
    pub const IPV6: u8 = 6;
}

/// What happened to a packet.
pub mod verdict {
    pub const ALLOW: u8 = 1;
    pub const DROP: u8 = 2;
    /// Passed, but the audit view would have dropped it (audit mode): the event's `reason`
    /// is the drop the audit view gives, its `cookie` and `match_kind` those of that view.
    pub const AUDIT: u8 = 3;
}

/// Why a packet was allowed or dropped. Values below [`DROP_FIRST`](reason::DROP_FIRST)
/// allow, the others drop. Also the index into the counters (see [`counter_index`]).
pub mod reason {
    /// A policy entry allowed it.
    pub const ALLOWED_BY_POLICY: u8 = 1;
    /// The endpoint is not enforced in this direction (no policy selects it).
    pub const ALLOWED_NOT_ENFORCED: u8 = 2;
    /// Reply (or related) traffic of a connection that policy allowed.
    pub const ALLOWED_REPLY: u8 = 3;
    /// Traffic that is always allowed: ARP, and link-scoped, well-formed ICMPv6 neighbour
    /// and multicast listener discovery.
    pub const ALLOWED_ALWAYS: u8 = 4;
    /// First drop reason.
    pub const DROP_FIRST: u8 = 16;
    /// The endpoint is enforced and no allow matched (default deny).
    pub const DROP_POLICY_DENIED: u8 = 16;
    /// An explicit deny rule matched.
    pub const DROP_POLICY_DENY_RULE: u8 = 17;
    /// The pod sent a packet with a source address that is not its own.
    pub const DROP_SPOOFED_SOURCE: u8 = 18;
    /// Truncated or malformed headers on an enforced endpoint.
    pub const DROP_MALFORMED: u8 = 19;
    /// A non-first fragment whose first fragment was not seen (or was dropped as not the
    /// sender's: spoofed, malformed).
    pub const DROP_FRAGMENT_UNKNOWN: u8 = 20;
    /// The interface the program runs on has no ENDPOINTS record (the table is full, the
    /// record is not written yet, or it was removed): fail closed.
    pub const DROP_NO_ENDPOINT: u8 = 21;
    /// Not ARP, IPv4 or IPv6 at the Ethernet layer, or more than one VLAN tag.
    pub const DROP_L2_UNSUPPORTED: u8 = 22;
    /// An IPv6 extension header chain the datapath does not follow: more headers than it
    /// walks, Hop-by-Hop not first, or a second Fragment header.
    pub const DROP_IPV6_EXT_CHAIN: u8 = 23;
    /// Number of reason slots (the counters array is sized from it).
    pub const SLOTS: u32 = 32;

    /// Whether `r` is a drop reason.
    pub const fn is_drop(r: u8) -> bool {
        r >= DROP_FIRST
    }
}

/// How specific the policy entry that decided was.
pub mod match_kind {
    /// No policy entry decided (not enforced, reply, default deny...).
    pub const NONE: u8 = 0;
    /// Both peer identity and port were wildcards.
    pub const ALL: u8 = 1;
    /// Peer identity given, any port.
    pub const L3_ONLY: u8 = 2;
    /// Any peer identity, port (or protocol) given.
    pub const L4_ONLY: u8 = 3;
    /// Peer identity and port (or protocol) given.
    pub const L3_L4: u8 = 4;
}

/// Indices into the CONFIG array.
pub mod config {
    /// Bit flags, see the `FLAG_*` constants.
    pub const FLAGS: u32 = 0;
    /// Policy generation: the map writer increments it after every change of ENDPOINTS,
    /// POLICY, `POLICY_LENGTHS` or the ipcache maps. A conntrack entry remembers, per hook, the
    /// generation at which policy last allowed the flow ([`CtOrig::policy_gen`](super::CtOrig));
    /// while it is current, forward packets of the flow skip the identity and policy lookups.
    /// 0 means "no generation yet": nothing is remembered.
    pub const POLICY_GEN: u32 = 1;
    pub const SLOTS: u32 = 4;
    /// Emit a verdict event for the first packet of every allowed new flow (drops are always
    /// reported).
    pub const FLAG_EMIT_ALLOW_EVENTS: u32 = 1;
}

/// Bits of [`EndpointInfo::flags`].
pub mod endpoint_flags {
    /// Ingress policy is enforced (some policy selects the endpoint for ingress).
    pub const INGRESS_ENFORCED: u32 = 1;
    /// Egress policy is enforced.
    pub const EGRESS_ENFORCED: u32 = 2;
    /// `ipv4` holds the endpoint's IPv4 address.
    pub const HAS_IPV4: u32 = 4;
    /// `ipv6` holds the endpoint's IPv6 address.
    pub const HAS_IPV6: u32 = 8;
    /// Ingress has an audit view ([`policy_view::AUDIT`] entries): a packet the enforced
    /// entries let through is looked up there too, and reported as an audit hit when that
    /// view drops it. Set only where the audit view differs from the enforced one.
    pub const INGRESS_AUDIT: u32 = 16;
    /// As [`INGRESS_AUDIT`], for egress.
    pub const EGRESS_AUDIT: u32 = 32;
}

/// Value of the ENDPOINTS map, keyed by the host-side interface index (u32).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Node-local endpoint id (1..=65535); the first field of every policy key.
    pub endpoint_id: u32,
    /// The endpoint's security identity.
    pub identity: u32,
    /// [`endpoint_flags`] bits.
    pub flags: u32,
    /// IPv4 address, network order.
    pub ipv4: [u8; 4],
    /// IPv6 address, network order.
    pub ipv6: [u8; 16],
}

/// LPM data of the `IPCACHE_V4` map (wrapped in the LPM key with its prefix length), and the
/// key of the `IPCACHE_HOST_V4` map (a /32).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Prefix {
    pub addr: [u8; 4],
}

/// LPM data of the `IPCACHE_V6` map, and the key of the `IPCACHE_HOST_V6` map (a /128).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv6Prefix {
    pub addr: [u8; 16],
}

/// Value of the ipcache maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheValue {
    pub identity: u32,
    /// [`ipcache_flags`] bits.
    pub flags: u32,
}

/// Bits of [`IpcacheValue::flags`].
pub mod ipcache_flags {
    /// The address is a local endpoint's (a pod of this node): a packet from it is genuine
    /// only when it comes from that pod's own interface (or the node itself).
    pub const LOCAL_ENDPOINT: u32 = 1;
}

/// Which resolution a POLICY entry belongs to (the `view` byte of [`PolicyKey`] and
/// [`PolicyLengthsKey`]).
pub mod policy_view {
    /// What is enforced.
    pub const ENFORCED: u8 = 0;
    /// What the enforced and the audited policies together would enforce (audit mode):
    /// looked up only on directions with [`super::endpoint_flags::INGRESS_AUDIT`] or
    /// [`super::endpoint_flags::EGRESS_AUDIT`], never deciding a packet's fate.
    pub const AUDIT: u8 = 1;
}

/// Key of the POLICY map. An entry matches a packet on a bit prefix of these fields, in this
/// order: endpoint, direction, view ([`policy_view`]), peer identity ([`POLICY_PREFIX_FIXED`] bits,
/// always matched), then protocol (8 bits) and destination port (16 bits). An entry for any
/// protocol stops after the identity; one for any port stops after the protocol; a port
/// range is a few entries whose prefix ends inside the port. In the map the key is cut to
/// its prefix (bits below it zero) and carries the prefix length in `prefix_len`
/// ([`PolicyKey::at_prefix`]), so a hash lookup per prefix length finds the longest match.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub endpoint_id_be: [u8; 2],
    pub direction: u8,
    /// [`policy_view`]: the enforced entries or the audit view's.
    pub view: u8,
    /// Peer identity; [`identity::ANY`] for "any peer".
    pub identity_be: [u8; 4],
    /// IP protocol ([`proto`]); zero when the prefix ends before it.
    pub protocol: u8,
    /// Destination port (TCP/UDP/SCTP) or ICMP type (in the high byte's place: see
    /// [`PolicyKey::new`]).
    pub dport_be: [u8; 2],
    /// The entry's prefix length in the POLICY map (64..=88); zero in a key not yet cut.
    pub prefix_len: u8,
}

/// Prefix bits of endpoint + direction + view + identity.
pub const POLICY_PREFIX_FIXED: u32 = 64;
/// Prefix bits up to and including the protocol.
pub const POLICY_PREFIX_PROTO: u32 = 72;
/// Prefix bits of a fully specified key.
pub const POLICY_PREFIX_FULL: u32 = 88;

impl PolicyKey {
    /// A key for a packet or an entry. For ICMP and ICMPv6 pass the type as `dport`.
    pub const fn new(endpoint_id: u16, direction: u8, identity: u32, protocol: u8, dport: u16) -> Self {
        PolicyKey {
            endpoint_id_be: endpoint_id.to_be_bytes(),
            direction,
            view: policy_view::ENFORCED,
            identity_be: identity.to_be_bytes(),
            protocol,
            dport_be: dport.to_be_bytes(),
            prefix_len: 0,
        }
    }

    /// The key as POLICY stores an entry of prefix length `prefix_len` (64..=88): the bits
    /// below the prefix cleared, the length recorded.
    #[allow(clippy::inline_always, reason = "called by the eBPF programs per packet: inlined, not a BPF-to-BPF call")]
    #[inline(always)]
    #[must_use]
    pub const fn at_prefix(&self, prefix_len: u32) -> PolicyKey {
        let mut k = *self;
        if prefix_len <= POLICY_PREFIX_FIXED {
            k.protocol = 0;
            k.dport_be = [0, 0];
        } else if prefix_len <= POLICY_PREFIX_PROTO {
            k.protocol &= ((0xff_u32 << (POLICY_PREFIX_PROTO - prefix_len)) & 0xff) as u8;
            k.dport_be = [0, 0];
        } else {
            let len = if prefix_len > POLICY_PREFIX_FULL { POLICY_PREFIX_FULL } else { prefix_len };
            let mask = ((0xffff_u32 << (POLICY_PREFIX_FULL - len)) & 0xffff) as u16;
            k.dport_be = (u16::from_be_bytes(k.dport_be) & mask).to_be_bytes();
        }
        k.prefix_len = prefix_len as u8;
        k
    }

    /// The same key in view `view` ([`policy_view`]).
    #[allow(clippy::inline_always, reason = "called by the eBPF programs per packet: inlined, not a BPF-to-BPF call")]
    #[inline(always)]
    #[must_use]
    pub const fn in_view(&self, view: u8) -> PolicyKey {
        let mut k = *self;
        k.view = view;
        k
    }

    /// The `POLICY_LENGTHS` key of this key's (endpoint, direction, view, identity).
    #[allow(clippy::inline_always, reason = "called by the eBPF programs per packet: inlined, not a BPF-to-BPF call")]
    #[inline(always)]
    pub const fn lengths_key(&self) -> PolicyLengthsKey {
        PolicyLengthsKey {
            endpoint_id_be: self.endpoint_id_be,
            direction: self.direction,
            view: self.view,
            identity_be: self.identity_be,
        }
    }
    pub const fn endpoint_id(&self) -> u16 {
        u16::from_be_bytes(self.endpoint_id_be)
    }
    pub const fn identity(&self) -> u32 {
        u32::from_be_bytes(self.identity_be)
    }
    pub const fn dport(&self) -> u16 {
        u16::from_be_bytes(self.dport_be)
    }
}

/// Key of the `POLICY_LENGTHS` map: the fixed part of a [`PolicyKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyLengthsKey {
    pub endpoint_id_be: [u8; 2],
    pub direction: u8,
    /// [`policy_view`], as in [`PolicyKey`].
    pub view: u8,
    pub identity_be: [u8; 4],
}

impl PolicyLengthsKey {
    pub const fn new(endpoint_id: u16, direction: u8, identity: u32) -> Self {
        PolicyLengthsKey {
            endpoint_id_be: endpoint_id.to_be_bytes(),
            direction,
            view: policy_view::ENFORCED,
            identity_be: identity.to_be_bytes(),
        }
    }

    /// The same key in view `view` ([`policy_view`]).
    #[allow(clippy::inline_always, reason = "called by the eBPF programs per packet: inlined, not a BPF-to-BPF call")]
    #[inline(always)]
    #[must_use]
    pub const fn in_view(&self, view: u8) -> PolicyLengthsKey {
        let mut k = *self;
        k.view = view;
        k
    }
    pub const fn endpoint_id(&self) -> u16 {
        u16::from_be_bytes(self.endpoint_id_be)
    }
    pub const fn identity(&self) -> u32 {
        u32::from_be_bytes(self.identity_be)
    }
}

/// The `POLICY_LENGTHS` bit of prefix length `prefix_len` (64..=88).
pub const fn policy_length_bit(prefix_len: u32) -> u32 {
    1 << ((prefix_len - POLICY_PREFIX_FIXED) & 31)
}

/// Number of prefix lengths a policy entry can have (64..=88).
pub const POLICY_LENGTHS_COUNT: u32 = POLICY_PREFIX_FULL - POLICY_PREFIX_FIXED + 1;

/// Bits of [`PolicyValue::flags`].
pub mod policy_flags {
    /// The entry denies (a deny beats every allow; see the resolver).
    pub const DENY: u32 = 1;
}

/// Value of the POLICY map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    /// [`policy_flags`] bits.
    pub flags: u32,
    /// Names the rules that produced the entry; the agent maps it back to policies.
    pub cookie: u32,
    /// The entry's prefix length, so the datapath can tell how specific the match was.
    pub prefix_len: u32,
}

/// Key of the CONNTRACK map: a flow's two ends in a fixed order, so that both directions
/// of the flow find the same entry with one lookup. `saddr`/`sport_be` is the lower end:
/// the end whose address is lower as bytes, or, at equal addresses, whose port is lower
/// (see [`CtKey::normalised`]). Which end sent the flow's first packet is in the value
/// ([`CtValue::orig`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    /// The lower end's address (IPv4 in the first 4 bytes).
    pub saddr: [u8; 16],
    /// The higher end's address.
    pub daddr: [u8; 16],
    /// The lower end's port (ICMP echo: the identifier), network order.
    pub sport_be: [u8; 2],
    /// The higher end's port (ICMP echo: the identifier), network order.
    pub dport_be: [u8; 2],
    pub protocol: u8,
    pub family: u8,
    pub pad: [u8; 2],
}

/// The orientations of a packet's tuple relative to its [`CtKey`]: index into
/// [`CtValue::orig`].
pub mod ct_dir {
    /// The packet goes from the key's lower end (`saddr`) to its higher end.
    pub const LOW_TO_HIGH: usize = 0;
    /// The packet goes from the higher end to the lower end.
    pub const HIGH_TO_LOW: usize = 1;
}

impl CtKey {
    /// The key of a packet's tuple (source, destination, ports in host order), and the
    /// packet's orientation in it ([`ct_dir`]). A tuple whose two ends are equal (same
    /// address and port) is [`ct_dir::LOW_TO_HIGH`] both ways.
    #[allow(clippy::inline_always, reason = "called by the eBPF programs per packet: inlined, not a BPF-to-BPF call")]
    #[inline(always)]
    #[must_use]
    pub fn normalised(
        saddr: &[u8; 16],
        daddr: &[u8; 16],
        sport: u16,
        dport: u16,
        protocol: u8,
        family: u8,
    ) -> (CtKey, usize) {
        let mut key = CtKey::default();
        let o = key.set_normalised(saddr, daddr, sport, dport, protocol, family);
        (key, o)
    }

    /// [`CtKey::normalised`] written into `self` (the eBPF programs keep the key in map
    /// memory, off their 512-byte stack); returns the orientation.
    #[allow(clippy::inline_always, reason = "called by the eBPF programs per packet: inlined, not a BPF-to-BPF call")]
    #[inline(always)]
    pub fn set_normalised(
        &mut self,
        saddr: &[u8; 16],
        daddr: &[u8; 16],
        sport: u16,
        dport: u16,
        protocol: u8,
        family: u8,
    ) -> usize {
        let swap = match addr_order(saddr, daddr) {
            core::cmp::Ordering::Less => false,
            core::cmp::Ordering::Greater => true,
            core::cmp::Ordering::Equal => sport > dport,
        };
        let (lo, hi, lo_port, hi_port) = if swap { (daddr, saddr, dport, sport) } else { (saddr, daddr, sport, dport) };
        self.saddr = *lo;
        self.daddr = *hi;
        self.sport_be = lo_port.to_be_bytes();
        self.dport_be = hi_port.to_be_bytes();
        self.protocol = protocol;
        self.family = family;
        self.pad = [0; 2];
        if swap { ct_dir::HIGH_TO_LOW } else { ct_dir::LOW_TO_HIGH }
    }

    /// Whether both ends are the same (address and port): the tuple is its own reverse.
    #[allow(clippy::inline_always, reason = "called by the eBPF programs per packet: inlined, not a BPF-to-BPF call")]
    #[inline(always)]
    #[must_use]
    pub fn symmetric(&self) -> bool {
        self.saddr == self.daddr && self.sport_be == self.dport_be
    }
}

/// The order of two addresses in a [`CtKey`]: lexicographic on the bytes, compared as two
/// big-endian 64-bit words (the same order, in two comparisons instead of sixteen).
#[allow(clippy::inline_always, reason = "called by the eBPF programs per packet: inlined, not a BPF-to-BPF call")]
#[inline(always)]
fn addr_order(a: &[u8; 16], b: &[u8; 16]) -> core::cmp::Ordering {
    let hi = |x: &[u8; 16]| u64::from_be_bytes([x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7]]);
    let lo = |x: &[u8; 16]| u64::from_be_bytes([x[8], x[9], x[10], x[11], x[12], x[13], x[14], x[15]]);
    match hi(a).cmp(&hi(b)) {
        core::cmp::Ordering::Equal => lo(a).cmp(&lo(b)),
        o => o,
    }
}

/// Bits of [`CtOrig::flags`].
pub mod ct_flags {
    /// The source pod's egress allowed the flow (or was not enforced).
    pub const EGRESS_OK: u32 = 1;
    /// The destination pod's ingress allowed the flow (or was not enforced).
    pub const INGRESS_OK: u32 = 2;
    /// A reply was seen.
    pub const SEEN_REPLY: u32 = 4;
    /// TCP: FIN seen in the forward direction.
    pub const TCP_FIN_FWD: u32 = 8;
    /// TCP: FIN seen in the reply direction.
    pub const TCP_FIN_REV: u32 = 16;
    /// TCP: RST seen.
    pub const TCP_RST: u32 = 32;
}

/// The state of a flow opened in one orientation of its [`CtKey`] (its first packet went
/// that way). Absent while `last_seen_ns` is 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtOrig {
    /// `CLOCK_MONOTONIC` nanoseconds of the last packet (`bpf_ktime_get_coarse_ns()`: tick
    /// resolution, which is plenty for timeouts in seconds and much cheaper); 0: no flow
    /// was opened in this orientation.
    pub last_seen_ns: u64,
    /// [`ct_flags`] bits.
    pub flags: u32,
    /// Cookie of the policy entry that allowed the flow.
    pub cookie: u32,
    /// Per hook ([`direction`] index): the [`config::POLICY_GEN`] at which policy last allowed
    /// a forward packet of the flow there; 0 when it did not.
    pub policy_gen: [u32; 2],
}

/// Value of the CONNTRACK map: the flows of one key, by the orientation their first packet
/// had ([`ct_dir`]). Nearly always only one is present; both are when each end opened a
/// flow (TCP simultaneous open, UDP where both ends send first). One lookup finds the
/// forward state and the reply state of a packet alike.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    pub orig: [CtOrig; 2],
}

/// One packet verdict, sent to user space through the EVENTS ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerdictEvent {
    /// `bpf_ktime_get_ns()` (`CLOCK_MONOTONIC`).
    pub ts_ns: u64,
    pub endpoint_id: u32,
    pub ifindex: u32,
    pub peer_identity: u32,
    /// Cookie of the deciding policy entry (0: none decided).
    pub cookie: u32,
    /// Addresses, network order; IPv4 in the first 4 bytes.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Ports in host order (ICMP: type in `dport`, code in `sport`).
    pub sport: u16,
    pub dport: u16,
    pub family: u8,
    pub protocol: u8,
    pub direction: u8,
    pub verdict: u8,
    pub reason: u8,
    pub match_kind: u8,
    pub tcp_flags: u8,
    pub pad: u8,
    pub pkt_len: u32,
}

/// Key of the FRAGMENTS map: one fragmented datagram.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    /// Addresses, network order; IPv4 in the first 4 bytes.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// IPv4: the 16-bit identification in the last two bytes; IPv6: the fragment header's
    /// 32-bit identification. Network order.
    pub id_be: [u8; 4],
    pub protocol: u8,
    pub family: u8,
    pub pad: [u8; 2],
}

/// Value of the FRAGMENTS map: what the first fragment's headers said, and its verdict.
/// Written only for first fragments judged by policy (never for one dropped as spoofed or
/// malformed); a denied one never replaces an entry that is there.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragValue {
    /// Ports, host order (ICMP: code in `sport`, type in `dport`).
    pub sport: u16,
    pub dport: u16,
    /// ICMP echo identifier, host order; zero otherwise.
    pub icmp_id: u16,
    /// The datagram's L4 protocol (IPv6 later fragments do not say it).
    pub protocol: u8,
    /// 0: the first fragment passed; else the reason policy dropped it for.
    pub denied: u8,
}

/// Packets and bytes for one (reason, direction).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Slots in the COUNTERS array.
pub const COUNTER_SLOTS: u32 = reason::SLOTS * 2;

/// Index into the COUNTERS array.
pub const fn counter_index(reason: u8, direction: u8) -> u32 {
    (reason as u32 % reason::SLOTS) * 2 + (direction as u32 & 1)
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is `#[repr(C)]`, `Copy`, made only of integers and byte arrays,
    // with no implicit padding (checked by the size assertions below).
    unsafe impl aya::Pod for super::EndpointInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Ipv4Prefix {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Ipv6Prefix {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::IpcacheValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PolicyKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PolicyLengthsKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PolicyValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CtKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CtValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CtOrig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::VerdictEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Counter {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FragKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FragValue {}
}

// No implicit padding anywhere: the sizes are the sums of the fields.
const _: () = assert!(core::mem::size_of::<EndpointInfo>() == 32);
const _: () = assert!(core::mem::size_of::<Ipv4Prefix>() == 4);
const _: () = assert!(core::mem::size_of::<Ipv6Prefix>() == 16);
const _: () = assert!(core::mem::size_of::<IpcacheValue>() == 8);
const _: () = assert!(core::mem::size_of::<PolicyKey>() == 12);
const _: () = assert!(core::mem::size_of::<PolicyLengthsKey>() == 8);
const _: () = assert!(core::mem::size_of::<PolicyValue>() == 12);
const _: () = assert!(core::mem::size_of::<CtKey>() == 40);
const _: () = assert!(core::mem::size_of::<CtOrig>() == 24);
const _: () = assert!(core::mem::size_of::<CtValue>() == 48);
const _: () = assert!(core::mem::size_of::<VerdictEvent>() == 72);
const _: () = assert!(core::mem::size_of::<Counter>() == 16);
const _: () = assert!(core::mem::size_of::<FragKey>() == 40);
const _: () = assert!(core::mem::size_of::<FragValue>() == 8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_key_bytes_are_big_endian_prefix_order() {
        let k = PolicyKey::new(0x0102, direction::EGRESS, 0x0a0b_0c0d, proto::TCP, 8080);
        assert_eq!(k.endpoint_id_be, [1, 2]);
        assert_eq!(k.identity_be, [0x0a, 0x0b, 0x0c, 0x0d]);
        assert_eq!(k.dport(), 8080);
        assert_eq!(k.identity(), 0x0a0b_0c0d);
        assert_eq!(k.endpoint_id(), 0x0102);
    }

    #[test]
    fn policy_key_at_prefix_cuts_and_records_the_length() {
        let k = PolicyKey::new(3, direction::INGRESS, 300, proto::TCP, 8081);
        assert_eq!(k.at_prefix(POLICY_PREFIX_FULL).dport(), 8081);
        assert_eq!(k.at_prefix(POLICY_PREFIX_FULL).prefix_len, 88);
        assert_eq!(k.at_prefix(87).dport(), 8080);
        assert_eq!(k.at_prefix(73).dport(), 0);
        assert_eq!(PolicyKey::new(3, direction::INGRESS, 300, proto::TCP, 0xffff).at_prefix(73).dport(), 0x8000);
        let p = k.at_prefix(POLICY_PREFIX_PROTO);
        assert_eq!((p.protocol, p.dport(), p.prefix_len), (proto::TCP, 0, 72));
        let f = k.at_prefix(POLICY_PREFIX_FIXED);
        assert_eq!((f.protocol, f.dport(), f.identity(), f.prefix_len), (0, 0, 300, 64));
        assert_eq!(k.lengths_key(), PolicyLengthsKey::new(3, direction::INGRESS, 300));
        assert_eq!(policy_length_bit(64), 1);
        assert_eq!(policy_length_bit(88), 1 << 24);
    }

    #[test]
    fn ct_key_is_the_same_both_ways() {
        let a = [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let b = [10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let (k, o) = CtKey::normalised(&b, &a, 80, 40000, proto::TCP, family::IPV4);
        let (r, ro) = CtKey::normalised(&a, &b, 40000, 80, proto::TCP, family::IPV4);
        assert_eq!(k, r);
        assert_eq!((o, ro), (ct_dir::HIGH_TO_LOW, ct_dir::LOW_TO_HIGH));
        assert_eq!((k.saddr, k.sport_be), (a, 40000u16.to_be_bytes()));
        // Equal addresses: the port decides.
        let (k, o) = CtKey::normalised(&a, &a, 9, 7, proto::UDP, family::IPV4);
        assert_eq!((k.sport_be, k.dport_be, o), (7u16.to_be_bytes(), 9u16.to_be_bytes(), ct_dir::HIGH_TO_LOW));
        assert!(!k.symmetric());
        let (k, o) = CtKey::normalised(&a, &a, 7, 7, proto::UDP, family::IPV4);
        assert!(k.symmetric());
        assert_eq!(o, ct_dir::LOW_TO_HIGH);
        // The order is the bytes' order, across the 64-bit halves.
        let mut c = a;
        c[15] = 1;
        let mut d = a;
        d[7] = 1;
        assert_eq!(CtKey::normalised(&d, &c, 1, 1, 6, 6).1, ct_dir::HIGH_TO_LOW);
    }

    #[test]
    fn counter_indices_are_distinct() {
        assert_ne!(counter_index(reason::DROP_POLICY_DENIED, 0), counter_index(reason::DROP_POLICY_DENIED, 1));
        assert!(counter_index(reason::DROP_FRAGMENT_UNKNOWN, 1) < COUNTER_SLOTS);
    }
}
