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

use crate::error::SetupError;
use crate::netns::Netns;

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
        node.ip(&["addr", "add", &format!("{NODE_ADDR}/32"), "dev", "lo"])?;
        node.ip(&["route", "add", &format!("{GATEWAY}/32"), "dev", "lo"])?;
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
        self.node.ip(&["link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", ns.name()])?;
        let proxy_arp = format!("net/ipv4/conf/{dev}/proxy_arp");
        let rp_filter = format!("net/ipv4/conf/{dev}/rp_filter");
        let proxy_delay = format!("net/ipv4/neigh/{dev}/proxy_delay");
        self.node.sysctls(&[(&proxy_arp, "1"), (&rp_filter, "0"), (&proxy_delay, "0")])?;
        self.node.ip(&["link", "set", dev, "up"])?;
        ns.ip(&["addr", "add", &format!("{addr}/32"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        let gw = GATEWAY.to_string();
        ns.ip(&["route", "add", &gw, "dev", "eth0", "scope", "link"])?;
        ns.ip(&["route", "add", "default", "via", &gw, "dev", "eth0"])?;
        self.node.ip(&["route", "add", &format!("{addr}/32"), "dev", dev, "src", &NODE_ADDR.to_string()])?;
        Ok(())
    }
}
