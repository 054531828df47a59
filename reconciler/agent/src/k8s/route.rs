//! Finding a pod's host-side interface from the route to its address, for clusters that
//! keep their own CNI plugin (each pod gets a host route via its veth: Calico's `cali*`,
//! Cilium's `lxc*`, palisade-cni's `lxc*`). Reads `/proc/net/route` and
//! `/proc/net/ipv6_route` of the agent's network namespace; the parsing is pure.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One route: destination prefix and outgoing interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dst: IpAddr,
    pub len: u8,
    pub interface: String,
}

/// Parses `/proc/net/route` (IPv4; addresses in host byte order as hex of the
/// little-endian word).
pub fn parse_ipv4_routes(text: &str) -> Vec<Route> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let (Ok(dst), Ok(mask)) = (u32::from_str_radix(f[1], 16), u32::from_str_radix(f[7], 16)) else { continue };
        let dst = Ipv4Addr::from(u32::from_be(dst));
        let len = mask.count_ones() as u8;
        out.push(Route { dst: IpAddr::V4(dst), len, interface: f[0].to_string() });
    }
    out
}

/// Parses `/proc/net/ipv6_route`.
pub fn parse_ipv6_routes(text: &str) -> Vec<Route> {
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 {
            continue;
        }
        let (Ok(dst), Ok(len)) = (u128::from_str_radix(f[0], 16), u8::from_str_radix(f[1], 16)) else { continue };
        if f[9] == "lo" {
            continue;
        }
        out.push(Route { dst: IpAddr::V6(Ipv6Addr::from(dst)), len, interface: f[9].to_string() });
    }
    out
}

fn contains(r: &Route, ip: IpAddr) -> bool {
    crate::actors::identity::mask(ip, r.len) == r.dst && r.dst.is_ipv4() == ip.is_ipv4()
}

/// The interface of the longest matching route that is not a default route (a pod behind
/// the default route is not on this node).
pub fn interface_for(routes: &[Route], ip: IpAddr) -> Option<String> {
    routes
        .iter()
        .filter(|r| r.len > 0 && r.dst.is_ipv4() == ip.is_ipv4() && contains(r, ip))
        .max_by_key(|r| r.len)
        .map(|r| r.interface.clone())
}

/// The routing table of the agent's network namespace.
pub fn read_routes() -> Vec<Route> {
    let mut out = std::fs::read_to_string("/proc/net/route").map(|t| parse_ipv4_routes(&t)).unwrap_or_default();
    out.extend(std::fs::read_to_string("/proc/net/ipv6_route").map(|t| parse_ipv6_routes(&t)).unwrap_or_default());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4: &str = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
lxc1a2b\t0500010A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n";
    const V6: &str = "fd000000000000000000000000000005 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001   lxc1a2b\n\
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     eth0\n";

    #[test]
    fn finds_the_interface_of_the_host_route() {
        let mut routes = parse_ipv4_routes(V4);
        assert_eq!(routes[2], Route { dst: "10.1.0.5".parse().unwrap(), len: 32, interface: "lxc1a2b".into() });
        assert_eq!(routes[1].dst, "192.168.0.0".parse::<IpAddr>().unwrap());
        routes.extend(parse_ipv6_routes(V6));
        assert_eq!(interface_for(&routes, "10.1.0.5".parse().unwrap()).as_deref(), Some("lxc1a2b"));
        assert_eq!(interface_for(&routes, "fd00::5".parse().unwrap()).as_deref(), Some("lxc1a2b"));
        // Behind the default route: another node's pod.
        assert_eq!(interface_for(&routes, "10.2.0.5".parse().unwrap()), None);
        assert_eq!(interface_for(&routes, "192.168.0.9".parse().unwrap()).as_deref(), Some("eth0"));
    }
}
