//! The CNI plugin's logic (CNI spec 1.0). The plugin binary hands its environment and
//! stdin to [`main`], which answers the exit code and the JSON to print.
//!
//! ADD: delegate IPAM, create the veth pair (`lxc<hash>` on the host, `CNI_IFNAME` in the
//! pod), give the pod its addresses and a default route via a link-local gateway
//! (169.254.1.1 answered by proxy ARP on the host side; `fe80::1` for IPv6), add host routes
//! to the pod addresses via the host-side veth, then register the endpoint with the agent
//! (`PUT /v1/endpoints/{namespace}/{name}`). DEL undoes it and is idempotent. CHECK
//! verifies the interfaces and addresses still exist.
//!
//! The network configuration is done over netlink ([`netlink`]); the pod's side from a
//! thread that entered the pod's network namespace (`setns`) and opened its own netlink
//! socket there, so the plugin process itself never changes namespace. Only the IPAM
//! plugin is run as a program, as the CNI spec says.
pub mod netlink;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::process::Command;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use palisade_api::types::EndpointSpec;
use palisade_api::{Client, ClientError};

pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// The plugin's network configuration (stdin).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    /// The agent's API socket.
    #[serde(default = "default_socket")]
    pub agent_socket: String,
    /// Fail ADD when the agent cannot be told (default: the pod starts; in Kubernetes mode
    /// the agent finds it by its route).
    #[serde(default)]
    pub require_agent: bool,
    #[serde(default)]
    pub ipam: Option<Value>,
    #[serde(default)]
    pub prev_result: Option<Value>,
}

fn default_socket() -> String {
    "/run/palisade/agent.sock".into()
}

/// A CNI error (printed as JSON on stdout, exit code 1).
#[derive(Debug, Serialize, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

fn err(code: u32, msg: &str, details: impl std::fmt::Display) -> CniError {
    CniError { code, msg: msg.into(), details: details.to_string() }
}

/// The CNI environment of one call.
#[derive(Clone, Debug)]
pub struct CniArgs {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub path: String,
    /// `K8S_POD_NAMESPACE`, `K8S_POD_NAME`... from `CNI_ARGS`.
    pub args: BTreeMap<String, String>,
}

impl CniArgs {
    pub fn from_env(env: &BTreeMap<String, String>) -> Result<CniArgs, CniError> {
        let get = |k: &str| env.get(k).cloned().unwrap_or_default();
        let args = get("CNI_ARGS")
            .split(';')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let a = CniArgs {
            command: get("CNI_COMMAND"),
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            path: get("CNI_PATH"),
            args,
        };
        if a.command.is_empty() {
            return Err(err(4, "CNI_COMMAND is not set", "this binary is a CNI plugin, run by the container runtime"));
        }
        Ok(a)
    }

    /// (namespace, name) of the pod.
    pub fn pod(&self) -> (String, String) {
        let ns = self.args.get("K8S_POD_NAMESPACE").cloned().unwrap_or_else(|| "default".into());
        let name = self.args.get("K8S_POD_NAME").cloned().unwrap_or_else(|| self.container_id.clone());
        (ns, name)
    }
}

/// Host-side interface name of a container: `lxc` + 11 hex digits of a hash of its id.
pub fn host_ifname(container_id: &str) -> String {
    // FNV-1a, stable across versions (a restarted plugin must find the same name).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("lxc{:011x}", h & 0xfff_ffff_ffff)
}

/// Runs the plugin; answers (exit code, stdout).
pub fn main(env: &BTreeMap<String, String>, stdin: &[u8]) -> (u8, String) {
    let result = (|| {
        let args = CniArgs::from_env(env)?;
        if args.command == "VERSION" {
            return Ok(json!({ "cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS }));
        }
        let conf: NetConf =
            serde_json::from_slice(stdin).map_err(|e| err(6, "the network configuration is not valid JSON", e))?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(err(
                1,
                "incompatible CNI version",
                format!("{} (supported: {SUPPORTED_VERSIONS:?})", conf.cni_version),
            ));
        }
        match args.command.as_str() {
            "ADD" => add(&args, &conf, stdin),
            "DEL" => del(&args, &conf, stdin).map(|()| Value::Null),
            "CHECK" => check(&args, &conf).map(|()| Value::Null),
            other => Err(err(4, "unknown CNI_COMMAND", other)),
        }
    })();
    match result {
        Ok(Value::Null) => (0, String::new()),
        Ok(v) => (0, v.to_string()),
        Err(e) => {
            let mut v = serde_json::to_value(&e).unwrap_or_default();
            v["cniVersion"] = json!("1.0.0");
            (1, v.to_string())
        }
    }
}

impl From<netlink::NetlinkError> for CniError {
    fn from(e: netlink::NetlinkError) -> CniError {
        err(11, "network configuration failed", e)
    }
}

/// Runs `f` in a thread that entered the network namespace at `path`.
fn in_netns<T: Send + 'static>(
    path: &str,
    f: impl FnOnce() -> Result<T, CniError> + Send + 'static,
) -> Result<T, CniError> {
    let file = std::fs::File::open(path)
        .map_err(|e| err(11, "cannot open the pod's network namespace", format!("{path}: {e}")))?;
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| err(11, "cannot enter the pod's network namespace", e))?;
        f()
    })
    .join()
    .map_err(|_| err(11, "network namespace worker panicked", ""))?
}

/// Runs the IPAM plugin named in the configuration with the same stdin.
fn ipam(args: &CniArgs, conf: &NetConf, stdin: &[u8], command: &str) -> Result<Value, CniError> {
    let Some(kind) = conf.ipam.as_ref().and_then(|i| i.get("type")).and_then(Value::as_str) else {
        return Err(err(
            7,
            "ipam.type is missing",
            "name an IPAM plugin, e.g. \"ipam\": {\"type\": \"host-local\", ...}",
        ));
    };
    let bin = args
        .path
        .split(':')
        .map(|d| std::path::Path::new(d).join(kind))
        .find(|p| p.is_file())
        .ok_or_else(|| err(7, "IPAM plugin not found", format!("{kind} in CNI_PATH {}", args.path)))?;
    let mut child = Command::new(&bin)
        .env("CNI_COMMAND", command)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .map_err(|e| err(7, "cannot run the IPAM plugin", format!("{}: {e}", bin.display())))?;
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(stdin);
    }
    let out = child.wait_with_output().map_err(|e| err(7, "IPAM plugin failed", e))?;
    let v: Value = if out.stdout.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(&out.stdout).map_err(|e| err(7, "IPAM plugin answered no JSON", e))?
    };
    if !out.status.success() {
        return Err(err(7, "IPAM plugin failed", v));
    }
    Ok(v)
}

/// The prefix length of an IPAM address (`fd09::5/64` -> 64).
fn prefix_len(cidr: &str) -> Result<u8, CniError> {
    cidr.split_once('/')
        .and_then(|(_, l)| l.parse().ok())
        .ok_or_else(|| err(7, "IPAM gave an address without a valid prefix length", cidr))
}

fn run_agent<T>(f: impl std::future::Future<Output = Result<T, ClientError>>) -> Result<T, ClientError> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime").block_on(f)
}

fn add(args: &CniArgs, conf: &NetConf, stdin: &[u8]) -> Result<Value, CniError> {
    if args.netns.is_empty() || args.ifname.is_empty() {
        return Err(err(4, "CNI_NETNS and CNI_IFNAME are required for ADD", ""));
    }
    let ipam_result = ipam(args, conf, stdin, "ADD")?;
    let mut addrs: Vec<(IpAddr, String)> = Vec::new();
    for entry in ipam_result.get("ips").and_then(Value::as_array).into_iter().flatten() {
        let Some(cidr) = entry.get("address").and_then(Value::as_str) else { continue };
        let ip: IpAddr = cidr
            .split('/')
            .next()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| err(7, "IPAM gave an invalid address", cidr))?;
        addrs.push((ip, cidr.to_string()));
    }
    if addrs.is_empty() {
        return Err(err(7, "IPAM gave no address", ipam_result));
    }
    let host = host_ifname(&args.container_id);
    let tmp = format!("tmp{}", &host[3..]);
    // Host side (the plugin's namespace): the pair, the peer moved into the pod.
    let nl = netlink::Netlink::open()?;
    if let Some(stale) = nl.link(&host)? {
        nl.delete_link(&stale, &host)?;
    }
    nl.add_veth(&host, &tmp)?;
    let setup = (|| {
        let pod_ns = std::fs::File::open(&args.netns)
            .map_err(|e| err(11, "cannot open the pod's network namespace", format!("{}: {e}", args.netns)))?;
        nl.move_to_netns(&nl.existing_link(&tmp)?, &tmp, pod_ns.as_raw_fd())?;
        // The pod's gateway 169.254.1.1 is answered by proxy ARP, which the kernel only
        // does on a forwarding interface.
        let _ = std::fs::write(format!("/proc/sys/net/ipv4/conf/{host}/forwarding"), "1");
        let _ = std::fs::write(format!("/proc/sys/net/ipv4/conf/{host}/proxy_arp"), "1");
        // Answer the pod's first ARP at once, not after a random delay of up to 0.8 s.
        let _ = std::fs::write(format!("/proc/sys/net/ipv4/neigh/{host}/proxy_delay"), "0");
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{host}/accept_dad"), "0");
        let host_link = nl.existing_link(&host)?;
        nl.set_up(&host_link, &host)?;
        if addrs.iter().any(|(a, _)| a.is_ipv6()) {
            nl.add_address(&host_link, &host, GATEWAY_V6.into(), 64, true)?;
        }
        for (a, _) in &addrs {
            let len = if a.is_ipv4() { 32 } else { 128 };
            nl.add_route(&host_link, &host, *a, len, netlink::Via::Link)?;
        }
        // Pod side.
        let (ifname, tmp2, list) = (args.ifname.clone(), tmp.clone(), addrs.clone());
        in_netns(&args.netns, move || {
            let nl = netlink::Netlink::open()?;
            nl.rename(&nl.existing_link(&tmp2)?, &tmp2, &ifname)?;
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{ifname}/accept_dad"), "0");
            let pod_link = nl.existing_link(&ifname)?;
            for (a, cidr) in &list {
                // IPv4 as a /32: everything goes through the gateway on the host side.
                let len = if a.is_ipv4() { 32 } else { prefix_len(cidr)? };
                nl.add_address(&pod_link, &ifname, *a, len, a.is_ipv6())?;
            }
            nl.set_up(&nl.existing_link("lo")?, "lo")?;
            nl.set_up(&pod_link, &ifname)?;
            if list.iter().any(|(a, _)| a.is_ipv4()) {
                nl.add_route(&pod_link, &ifname, GATEWAY_V4.into(), 32, netlink::Via::Link)?;
                let default = Ipv4Addr::UNSPECIFIED.into();
                nl.add_route(&pod_link, &ifname, default, 0, netlink::Via::Gateway(GATEWAY_V4.into()))?;
            }
            if list.iter().any(|(a, _)| a.is_ipv6()) {
                let default = Ipv6Addr::UNSPECIFIED.into();
                nl.add_route(&pod_link, &ifname, default, 0, netlink::Via::Gateway(GATEWAY_V6.into()))?;
            }
            Ok(nl.existing_link(&ifname)?.mac)
        })
    })();
    let undo = |nl: &netlink::Netlink| {
        if let Ok(Some(link)) = nl.link(&host) {
            let _ = nl.delete_link(&link, &host);
        }
        let _ = ipam(args, conf, stdin, "DEL");
    };
    let pod_mac = match setup {
        Ok(m) => m,
        Err(e) => {
            undo(&nl);
            return Err(e);
        }
    };
    let (namespace, name) = args.pod();
    let spec = EndpointSpec {
        labels: BTreeMap::new(),
        service_account: "default".into(),
        ipv4: addrs.iter().find_map(|(a, _)| match a {
            IpAddr::V4(v) => Some(*v),
            IpAddr::V6(_) => None,
        }),
        ipv6: addrs.iter().find_map(|(a, _)| match a {
            IpAddr::V6(v) => Some(*v),
            IpAddr::V4(_) => None,
        }),
        interface: host.clone(),
        ports: Vec::new(),
    };
    let client = Client::new(&conf.agent_socket);
    if let Err(e) = run_agent(client.put_endpoint(&namespace, &name, &spec)) {
        eprintln!("palisade-cni: endpoint {namespace}/{name} not registered with the agent: {e}");
        if conf.require_agent {
            undo(&nl);
            return Err(err(11, "the palisade agent did not take the endpoint", e));
        }
    }
    let ips: Vec<Value> = addrs
        .iter()
        .map(|(a, cidr)| {
            let gw: IpAddr = if a.is_ipv4() { GATEWAY_V4.into() } else { GATEWAY_V6.into() };
            json!({ "address": cidr, "gateway": gw.to_string(), "interface": 1 })
        })
        .collect();
    let mut routes = Vec::new();
    if addrs.iter().any(|(a, _)| a.is_ipv4()) {
        routes.push(json!({ "dst": "0.0.0.0/0", "gw": GATEWAY_V4.to_string() }));
    }
    if addrs.iter().any(|(a, _)| a.is_ipv6()) {
        routes.push(json!({ "dst": "::/0", "gw": GATEWAY_V6.to_string() }));
    }
    Ok(json!({
        "cniVersion": conf.cni_version,
        "interfaces": [
            { "name": host, "mac": nl.link(&host)?.map(|l| l.mac).unwrap_or_default() },
            { "name": args.ifname, "mac": pod_mac, "sandbox": args.netns }
        ],
        "ips": ips,
        "routes": routes,
        "dns": ipam_result.get("dns").cloned().unwrap_or(json!({}))
    }))
}

fn del(args: &CniArgs, conf: &NetConf, stdin: &[u8]) -> Result<(), CniError> {
    let (namespace, name) = args.pod();
    let client = Client::new(&conf.agent_socket);
    match run_agent(client.delete_endpoint(&namespace, &name)) {
        Ok(_) | Err(ClientError::Status { status: 404, .. }) => {}
        Err(e) => eprintln!("palisade-cni: endpoint {namespace}/{name} not removed from the agent: {e}"),
    }
    let host = host_ifname(&args.container_id);
    // Deleting one end removes the pair and the host routes; gone already is fine.
    let nl = netlink::Netlink::open()?;
    if let Some(link) = nl.link(&host)? {
        nl.delete_link(&link, &host)?;
    }
    if conf.ipam.is_some() {
        ipam(args, conf, stdin, "DEL")?;
    }
    Ok(())
}

fn check(args: &CniArgs, conf: &NetConf) -> Result<(), CniError> {
    let host = host_ifname(&args.container_id);
    let link = netlink::Netlink::open()?.link(&host)?.ok_or_else(|| err(11, "host-side interface missing", &host))?;
    if !link.up {
        return Err(err(11, "host-side interface is down", host));
    }
    let want: Vec<IpAddr> = conf
        .prev_result
        .as_ref()
        .and_then(|r| r.get("ips"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|i| i.get("address").and_then(Value::as_str))
        .filter_map(|c| c.split('/').next().and_then(|a| a.parse().ok()))
        .collect();
    let ifname = args.ifname.clone();
    let have = in_netns(&args.netns, move || {
        let nl = netlink::Netlink::open()?;
        let link = nl.link(&ifname)?.ok_or_else(|| err(11, "pod interface missing", &ifname))?;
        Ok(nl.addresses(&link, &ifname)?)
    })?;
    for a in want {
        if !have.contains(&a) {
            return Err(err(11, "pod address missing", format!("{a} on {}", args.ifname)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_stable_and_short() {
        let n = host_ifname("0123456789abcdef");
        assert_eq!(n, host_ifname("0123456789abcdef"));
        assert_ne!(n, host_ifname("0123456789abcdee"));
        assert!(n.len() <= 15 && n.starts_with("lxc"), "{n}");
    }

    #[test]
    fn version_and_errors_are_cni_json() {
        let env = BTreeMap::from([("CNI_COMMAND".to_string(), "VERSION".to_string())]);
        let (code, out) = main(&env, b"");
        assert_eq!(code, 0);
        assert!(out.contains("\"1.0.0\""), "{out}");
        let env = BTreeMap::from([("CNI_COMMAND".to_string(), "ADD".to_string())]);
        let (code, out) = main(&env, b"{\"cniVersion\": \"9.9.9\"}");
        assert_eq!(code, 1);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["code"], 1);
        let (code, _) = main(&BTreeMap::new(), b"");
        assert_eq!(code, 1);
    }

    #[test]
    fn pod_identity_comes_from_cni_args() {
        let env = BTreeMap::from([
            ("CNI_COMMAND".to_string(), "ADD".to_string()),
            ("CNI_CONTAINERID".to_string(), "abc".to_string()),
            ("CNI_ARGS".to_string(), "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1".to_string()),
        ]);
        let a = CniArgs::from_env(&env).unwrap();
        assert_eq!(a.pod(), ("shop".to_string(), "web-1".to_string()));
    }
}
