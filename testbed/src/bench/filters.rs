//! The filters compared, all enforcing the same policy on the node's `tbs` (the server's
//! host-side interface): "the server accepts, from each of N peers, one port; everything
//! else is dropped". The client is the last peer and is allowed TCP and UDP port 5201.
//!
//! - [`Mode::Baseline`] — no filter at all.
//! - [`Mode::Palisade`] — palisade's tc programs (the same object the agent loads, through
//!   the agent's own loader) attached to `tbs`, with ENDPOINTS, the ipcache and POLICY filled
//!   as the map writer fills them for such a policy: one ipcache host entry and one policy
//!   entry per peer. Loaded directly rather than through the agent so the maps hold exactly
//!   this rule set and nothing of the control plane runs during the measurement.
//! - [`Mode::Iptables`] / [`Mode::IptablesNft`] — the node's rules as a kube-style iptables
//!   agent writes them: established/related accepted first, then one
//!   ACCEPT rule per (peer, protocol, port) with the client's last (the worst case), then
//!   DROP, in a chain of its own that FORWARD jumps to for `tbs`; loaded with
//!   `iptables-restore` (legacy `x_tables`, and the `nf_tables` backend).
//! - [`Mode::Nftables`] — one nftables chain: established/related accepted, then a lookup of
//!   (source address . protocol . port) in a set, then drop.
//!
//! Firewall commands only ever run inside the node namespace (`ip netns exec`), never in the
//! root namespace; deleting the namespace removes their rules.
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use palisade_agent::datapath::{Datapath, DatapathConfig, MapSet};
use palisade_common::{
    EndpointInfo, IpcacheValue, Ipv4Prefix, POLICY_PREFIX_FULL, PolicyKey, PolicyValue, direction, endpoint_flags,
    policy_length_bit, proto,
};

use super::net::{BenchNet, SERVER_DEV, peer_addr};
use crate::cleanup;

/// The port the client is allowed on (TCP and UDP).
pub const PORT: u16 = 5201;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    Baseline,
    Palisade,
    /// palisade's programs attached with the same maps, but no policy selects the server:
    /// it is an endpoint with neither direction enforced, so every packet is parsed, looked
    /// up and passes. What the tcx hooks and the programs cost without a policy decision (a
    /// diagnostic beside the real palisade). The server cannot simply be left out of
    /// ENDPOINTS: an attached interface without an entry drops everything (`no-endpoint`,
    /// the datapath fails closed).
    PalisadeHook,
    Iptables,
    IptablesNft,
    Nftables,
}

impl Mode {
    pub const ALL: [Mode; 6] =
        [Mode::Baseline, Mode::Palisade, Mode::PalisadeHook, Mode::Iptables, Mode::IptablesNft, Mode::Nftables];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Baseline => "baseline",
            Mode::Palisade => "palisade",
            Mode::PalisadeHook => "palisade_hook",
            Mode::Iptables => "iptables",
            Mode::IptablesNft => "iptables_nft",
            Mode::Nftables => "nftables",
        }
    }
}

/// One allowed (peer, protocol, port).
#[derive(Clone, Copy, Debug)]
pub struct Allow {
    pub peer: Ipv4Addr,
    pub protocol: u8,
    pub port: u16,
}

/// The client of a rule set of `n` peers: the last one.
pub fn client_addr(n: usize) -> Ipv4Addr {
    peer_addr(n - 1)
}

/// The rule set of `n` peers: peers 0..n-1 one port each (TCP and UDP alternately, ports
/// 10000 upwards), then the client's TCP and UDP port 5201, last.
pub fn rules(n: usize) -> Vec<Allow> {
    let mut v: Vec<Allow> = (0..n - 1)
        .map(|i| Allow {
            peer: peer_addr(i),
            protocol: if i % 2 == 0 { proto::TCP } else { proto::UDP },
            port: 10_000 + (i % 50_000) as u16,
        })
        .collect();
    v.push(Allow { peer: client_addr(n), protocol: proto::TCP, port: PORT });
    v.push(Allow { peer: client_addr(n), protocol: proto::UDP, port: PORT });
    v
}

fn proto_name(p: u8) -> &'static str {
    if p == proto::TCP { "tcp" } else { "udp" }
}

/// A filter in place; removed when dropped (with the namespace at the latest).
pub enum Installed {
    None,
    Palisade(Box<PalisadeFilter>),
    Firewall,
}

/// Installs `mode` with the rule set `allows` on `net`. Also returns how long putting the
/// rules in place took: the map writes for palisade (after its programs are loaded and
/// attached, which the agent does once at start), the whole `iptables-restore` or `nft -f`
/// for the others.
pub fn install(mode: Mode, net: &BenchNet, allows: &[Allow], tag: &str) -> Result<(Installed, Duration), String> {
    let t = Instant::now();
    match mode {
        Mode::Baseline => Ok((Installed::None, t.elapsed())),
        Mode::Palisade => {
            PalisadeFilter::install(net, allows, tag, true).map(|(f, d)| (Installed::Palisade(Box::new(f)), d))
        }
        Mode::PalisadeHook => {
            PalisadeFilter::install(net, allows, tag, false).map(|(f, d)| (Installed::Palisade(Box::new(f)), d))
        }
        Mode::Iptables => iptables(net, allows, "iptables-legacy-restore").map(|()| (Installed::Firewall, t.elapsed())),
        Mode::IptablesNft => iptables(net, allows, "iptables-nft-restore").map(|()| (Installed::Firewall, t.elapsed())),
        Mode::Nftables => nftables(net, allows).map(|()| (Installed::Firewall, t.elapsed())),
    }
}

/// palisade's programs on `tbs`, loaded in a private pin directory
/// (`/sys/fs/bpf/palisade-testbed-<pid>-<tag>`, removed when dropped).
pub struct PalisadeFilter {
    pub maps: Option<MapSet>,
    pub datapath: Option<Datapath>,
    pub pin_dir: PathBuf,
    _guard: cleanup::Guard,
}

impl Drop for PalisadeFilter {
    fn drop(&mut self) {
        self.maps.take();
        self.datapath.take();
    }
}

/// Endpoint id and identity of the server; peers get identities from `PEER_IDENTITY_BASE`.
const SERVER_ENDPOINT: u16 = 1;
const SERVER_IDENTITY: u32 = 1000;
const PEER_IDENTITY_BASE: u32 = 100_000;

impl PalisadeFilter {
    /// `enforced`: whether the server's ingress is enforced (false: the programs are in the
    /// path but pass every packet, as for a pod no policy selects).
    fn install(
        net: &BenchNet,
        allows: &[Allow],
        tag: &str,
        enforced: bool,
    ) -> Result<(PalisadeFilter, Duration), String> {
        let pin_dir = PathBuf::from(crate::agent::BPFFS).join(format!("palisade-testbed-{}-{tag}", std::process::id()));
        if pin_dir.exists() {
            return Err(format!("{} exists", pin_dir.display()));
        }
        let guard = {
            let p = pin_dir.clone();
            // Removing the pins detaches the tcx links; the node namespace goes anyway.
            cleanup::register(format!("bpffs directory {}", p.display()), move || {
                let _ = std::fs::remove_dir_all(&p);
            })
            .map_err(|e| e.to_string())?
        };
        let cfg = DatapathConfig { pin_dir: pin_dir.clone() };
        let (dp, ifindex) = net
            .node
            .run(move || {
                let mut dp = Datapath::load(&cfg).map_err(|e| format!("loading the datapath: {e}"))?;
                let ifindex = dp.attach(SERVER_DEV).map_err(|e| format!("attaching to {SERVER_DEV}: {e}"))?;
                Ok::<_, String>((dp, ifindex))
            })
            .map_err(|e| e.to_string())??;
        let mut f = PalisadeFilter { maps: None, datapath: Some(dp), pin_dir, _guard: guard };
        let mut maps = f.datapath.as_mut().expect("just set").take_maps().map_err(|e| e.to_string())?;
        let t = Instant::now();
        fill(&mut maps, ifindex, net.server_addr, allows, enforced)?;
        let took = t.elapsed();
        f.maps = Some(maps);
        Ok((f, took))
    }
}

/// What the map writer writes for the rule set: the server as an endpoint enforcing ingress,
/// every peer's address in the ipcache with its own identity, one policy entry per allow.
fn fill(maps: &mut MapSet, ifindex: u32, server: Ipv4Addr, allows: &[Allow], enforced: bool) -> Result<(), String> {
    let e = |what: &str, err: &dyn std::fmt::Display| format!("writing {what}: {err}");
    let mut identities: std::collections::HashMap<Ipv4Addr, u32> = std::collections::HashMap::new();
    maps.ipcache_host_v4
        .insert(Ipv4Prefix { addr: server.octets() }, IpcacheValue { identity: SERVER_IDENTITY, flags: 0 }, 0)
        .map_err(|x| e("the ipcache", &x))?;
    for a in allows {
        let next = PEER_IDENTITY_BASE + identities.len() as u32;
        let id = *identities.entry(a.peer).or_insert(next);
        if id == next {
            maps.ipcache_host_v4
                .insert(Ipv4Prefix { addr: a.peer.octets() }, IpcacheValue { identity: id, flags: 0 }, 0)
                .map_err(|x| e("the ipcache", &x))?;
        }
        // As the map writer writes an entry: the entry, then its prefix length (every entry
        // here is a full key, so the length bitmap is the same for all).
        let key = PolicyKey::new(SERVER_ENDPOINT, direction::INGRESS, id, a.protocol, a.port);
        let value = PolicyValue { flags: 0, cookie: 1, prefix_len: POLICY_PREFIX_FULL };
        maps.policy.insert(key.at_prefix(POLICY_PREFIX_FULL), value, 0).map_err(|x| e("the policy", &x))?;
        maps.policy_lengths
            .insert(key.lengths_key(), policy_length_bit(POLICY_PREFIX_FULL), 0)
            .map_err(|x| e("the policy lengths", &x))?;
    }
    let ep = EndpointInfo {
        endpoint_id: SERVER_ENDPOINT.into(),
        identity: SERVER_IDENTITY,
        flags: if enforced { endpoint_flags::INGRESS_ENFORCED } else { 0 } | endpoint_flags::HAS_IPV4,
        ipv4: server.octets(),
        ipv6: [0; 16],
    };
    // The endpoint last, as the map writer does: enforcement starts with its policy in place.
    maps.endpoints.insert(ifindex, ep, 0).map_err(|x| e("the endpoint", &x))?;
    maps.bump_policy_generation().map_err(|x| e("the policy generation", &x))?;
    Ok(())
}

/// Runs `cmd args` inside the node namespace with `input` on stdin.
fn in_node(net: &BenchNet, cmd: &str, args: &[&str], input: &str) -> Result<(), String> {
    // `ip netns exec` fails (and runs nothing) when the namespace does not exist: the
    // command can never fall back to the root namespace.
    let mut child = Command::new("ip")
        .args(["netns", "exec", net.node.name(), cmd])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running {cmd}: {e}"))?;
    child.stdin.take().expect("piped").write_all(input.as_bytes()).map_err(|e| format!("writing to {cmd}: {e}"))?;
    let out = child.wait_with_output().map_err(|e| format!("waiting for {cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{cmd} in {}: {} {}", net.node.name(), out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// The rules for `allows`, in iptables-restore format: the FORWARD chain sends what goes
/// out of `tbs` to a chain of its own (as Calico and kube-router give every pod interface
/// its chains), so traffic to other interfaces, such as the server's replies, passes one
/// rule; that chain accepts established and related flows, then the allowed (peer, protocol,
/// port) one rule each, then drops.
pub fn iptables_rules(allows: &[Allow]) -> String {
    let chain = "PAL-TO-TBS";
    let mut s =
        format!("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:{chain} - [0:0]\n");
    let _ = writeln!(s, "-A FORWARD -o {SERVER_DEV} -j {chain}");
    let _ = writeln!(s, "-A {chain} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT");
    for a in allows {
        let p = proto_name(a.protocol);
        let _ = writeln!(s, "-A {chain} -s {}/32 -p {p} -m {p} --dport {} -j ACCEPT", a.peer, a.port);
    }
    let _ = writeln!(s, "-A {chain} -j DROP\nCOMMIT");
    s
}

fn iptables(net: &BenchNet, allows: &[Allow], restore: &str) -> Result<(), String> {
    in_node(net, restore, &[], &iptables_rules(allows))
}

/// The table for `allows`, in nft's format.
pub fn nftables_rules(allows: &[Allow]) -> String {
    let mut s = String::from(
        "table inet pbench {\n  set allowed {\n    type ipv4_addr . inet_proto . inet_service\n    elements = {\n",
    );
    for (i, a) in allows.iter().enumerate() {
        let sep = if i + 1 == allows.len() { "" } else { "," };
        let _ = writeln!(s, "      {} . {} . {}{sep}", a.peer, proto_name(a.protocol), a.port);
    }
    let _ = write!(
        s,
        "    }}\n  }}\n  chain forward {{\n    type filter hook forward priority filter; policy accept;\n    \
         oifname \"{SERVER_DEV}\" ct state established,related accept\n    \
         oifname \"{SERVER_DEV}\" ip saddr . meta l4proto . th dport @allowed accept\n    \
         oifname \"{SERVER_DEV}\" drop\n  }}\n}}\n"
    );
    s
}

fn nftables(net: &BenchNet, allows: &[Allow]) -> Result<(), String> {
    in_node(net, "nft", &["-f", "-"], &nftables_rules(allows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_is_allowed_last_and_every_peer_once() {
        let r = rules(10);
        assert_eq!(r.len(), 11);
        assert_eq!(r[9].peer, client_addr(10));
        assert_eq!(r[10].peer, client_addr(10));
        assert_eq!((r[9].protocol, r[10].protocol), (proto::TCP, proto::UDP));
        let ipt = iptables_rules(&r);
        assert_eq!(ipt.lines().filter(|l| l.contains("-j ACCEPT")).count(), 12);
        assert_eq!(ipt.lines().filter(|l| l.starts_with("-A FORWARD")).count(), 1);
        assert!(ipt.lines().rev().nth(1).unwrap().ends_with("-j DROP"));
        let nft = nftables_rules(&r);
        // 11 elements of 3 fields, plus the set type and the lookup.
        assert_eq!(nft.matches(" . ").count(), 11 * 2 + 2 + 2);
    }
}
