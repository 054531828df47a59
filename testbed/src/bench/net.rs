//! The benchmark's network: three namespaces of this run, nothing in the root namespace.
//!
//! ```text
//!   client netns pt<pid>-b<k>c          node netns pt<pid>-b<k>n          server netns pt<pid>-b<k>s
//!   eth0 10.201.x.y/32 <-- veth --> tbc    (forwards, filters)    tbs <-- veth --> eth0 10.202.0.1/32
//!   default via 169.254.1.1             proxy_arp, /32 routes              default via 169.254.1.1
//! ```
//!
//! The node has no route out: traffic can only go between the client and the server. The
//! filters under test all sit on the node's `tbs` (the server's host-side interface), where
//! a CNI's pod interface would be: palisade's tc programs on it, the firewalls' rules
//! matching `-o tbs` in the node's forward path.
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

use crate::error::SetupError;
use crate::netns::{Netns, Via};

/// The server's host-side interface in the node namespace: where every filter sits.
pub const SERVER_DEV: &str = "tbs";
/// The client's host-side interface.
pub const CLIENT_DEV: &str = "tbc";
pub const SERVER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 1);
const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// The `i`-th peer a rule set names (0-based): 10.201.0.1 onwards.
pub fn peer_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 201, 0, 1)) + i as u32)
}

/// Client, node and server namespaces. Dropped client and server first (with them the veth
/// pairs), then the node.
#[derive(Debug)]
pub struct BenchNet {
    pub client: Netns,
    pub server: Netns,
    pub node: Netns,
    pub client_addr: Ipv4Addr,
    pub server_addr: Ipv4Addr,
}

const IPV6_OFF: [(&str, &str); 2] =
    [("net/ipv6/conf/all/disable_ipv6", "1"), ("net/ipv6/conf/default/disable_ipv6", "1")];

impl BenchNet {
    /// Builds the three namespaces `<prefix>c`, `<prefix>n`, `<prefix>s` (prefix
    /// `pt<pid>-b<k>`, so that `palisade-testbed cleanup` recognises leftovers).
    pub fn build(prefix: &str, client_addr: Ipv4Addr) -> Result<BenchNet, SetupError> {
        let node = Netns::create(&format!("{prefix}n"))?;
        node.sysctls(&IPV6_OFF)?;
        node.sysctls(&[
            ("net/ipv4/ip_forward", "1"),
            ("net/ipv4/conf/all/rp_filter", "0"),
            ("net/ipv4/conf/default/rp_filter", "0"),
        ])?;
        node.netlink(|nl| {
            let lo = nl.existing_link("lo")?;
            nl.add_address(&lo, "lo", NODE_ADDR.into(), 32, false)?;
            nl.add_route(&lo, "lo", GATEWAY.into(), 32, Via::Link)
        })?;
        let client = Netns::create(&format!("{prefix}c"))?;
        let server = Netns::create(&format!("{prefix}s"))?;
        let net = BenchNet { client, server, node, client_addr, server_addr: SERVER_ADDR };
        net.wire(&net.client, CLIENT_DEV, client_addr)?;
        net.wire(&net.server, SERVER_DEV, SERVER_ADDR)?;
        Ok(net)
    }

    fn wire(&self, ns: &Netns, dev: &str, addr: Ipv4Addr) -> Result<(), SetupError> {
        ns.sysctls(&IPV6_OFF)?;
        // Both ends made directly in their namespaces, never in the root namespace.
        let peer_ns = ns.open()?;
        let name = dev.to_string();
        self.node.netlink(move |nl| nl.add_veth_with_peer_in(&name, "eth0", peer_ns.as_raw_fd()))?;
        let proxy_arp = format!("net/ipv4/conf/{dev}/proxy_arp");
        let rp_filter = format!("net/ipv4/conf/{dev}/rp_filter");
        let proxy_delay = format!("net/ipv4/neigh/{dev}/proxy_delay");
        self.node.sysctls(&[(&proxy_arp, "1"), (&rp_filter, "0"), (&proxy_delay, "0")])?;
        let name = dev.to_string();
        self.node.netlink(move |nl| nl.set_up(&nl.existing_link(&name)?, &name))?;
        ns.netlink(move |nl| {
            let eth0 = nl.existing_link("eth0")?;
            nl.add_address(&eth0, "eth0", addr.into(), 32, false)?;
            nl.set_up(&eth0, "eth0")?;
            nl.add_route(&eth0, "eth0", GATEWAY.into(), 32, Via::Link)?;
            nl.add_route(&eth0, "eth0", Ipv4Addr::UNSPECIFIED.into(), 0, Via::Gateway(GATEWAY.into()))
        })?;
        let name = dev.to_string();
        self.node.netlink(move |nl| {
            nl.add_route(&nl.existing_link(&name)?, &name, addr.into(), 32, Via::LinkFrom(NODE_ADDR.into()))
        })?;
        Ok(())
    }
}
