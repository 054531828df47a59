//! The palisade-cni binary on its own (root): ADD, CHECK, DEL and DEL again in a throwaway
//! "node" namespace with a "pod" namespace, a stub IPAM plugin, and a stub agent on a unix
//! socket that records the registrations. A ping from the node to the pod proves the
//! plumbing (veth, addresses, routes, proxy ARP). Namespaces are removed by RAII guards.
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{Method, Uri};
use serde_json::{Value, json};

struct Netns(String);

impl Netns {
    fn new(name: &str) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", name]).stderr(Stdio::null()).status();
        assert!(Command::new("ip").args(["netns", "add", name]).status().unwrap().success());
        Netns(name.into())
    }
    fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip").args(["-n", &self.0]).args(args).output().unwrap();
        assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs the plugin inside `node` with the given command; answers (exit ok, stdout).
fn cni(node: &Netns, command: &str, env: &[(&str, &str)], conf: &Value) -> (bool, Value) {
    // The stub agent answers on the runtime's other worker meanwhile.
    tokio::task::block_in_place(|| cni_blocking(node, command, env, conf))
}

fn cni_blocking(node: &Netns, command: &str, env: &[(&str, &str)], conf: &Value) -> (bool, Value) {
    let file = std::fs::File::open(node.path()).unwrap();
    let raw = file.as_raw_fd();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_palisade-cni"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CNI_COMMAND", command)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // SAFETY: only setns between fork and exec; `file` outlives the spawn.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(raw, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    child.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v = if text.trim().is_empty() { Value::Null } else { serde_json::from_str(text.trim()).unwrap() };
    (out.status.success(), v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cni_add_check_del_in_a_throwaway_namespace_privileged() {
    palisade_privileged::require_root!();
    let tag = std::process::id();
    let node = Netns::new(&format!("pcni{tag}-node"));
    let pod = Netns::new(&format!("pcni{tag}-pod"));
    node.ip(&["link", "set", "lo", "up"]);
    // The node's own address and a default route (proxy ARP answers for routed targets).
    node.ip(&["link", "add", "uplink0", "type", "veth", "peer", "name", "uplink1"]);
    node.ip(&["link", "set", "uplink0", "up"]);
    node.ip(&["link", "set", "uplink1", "up"]);
    node.ip(&["addr", "add", "10.9.255.1/32", "dev", "uplink0"]);
    node.ip(&["route", "add", "default", "dev", "uplink0"]);

    let dir = tempfile::tempdir().unwrap();
    let ipam = dir.path().join("stub-ipam");
    std::fs::write(
        &ipam,
        "#!/bin/sh\ncat >/dev/null\nif [ \"$CNI_COMMAND\" = ADD ]; then echo '{\"cniVersion\":\"1.0.0\",\"ips\":[{\"address\":\"10.9.0.5/24\"},{\"address\":\"fd09::5/64\"}]}'; fi\n",
    )
    .unwrap();
    std::fs::set_permissions(&ipam, std::fs::Permissions::from_mode(0o755)).unwrap();

    // Stub agent: records every request.
    let socket = dir.path().join("agent.sock");
    let seen: Arc<Mutex<Vec<(String, String, Value)>>> = Arc::default();
    let router = axum::Router::new().fallback({
        let seen = seen.clone();
        move |m: Method, u: Uri, body: Bytes| {
            let seen = seen.clone();
            async move {
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                seen.lock().unwrap().push((m.to_string(), u.path().to_string(), v));
                axum::Json(json!({
                    "id": 1, "namespace": "shop", "name": "web-1", "identity": 256, "securityLabels": [],
                    "ipv4": null, "ipv6": null, "interface": "x", "ifindex": 1, "ingressEnforced": false,
                    "egressEnforced": false, "realizedRevision": 0, "policyEntries": 0, "revision": 1
                }))
            }
        }
    });
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });

    let conf = json!({"cniVersion": "1.0.0", "name": "palisade", "type": "palisade-cni",
        "agentSocket": socket.to_str().unwrap(), "ipam": {"type": "stub-ipam"}});
    let cni_path = dir.path().to_str().unwrap().to_string();
    let netns_path = pod.path();
    let env = [
        ("CNI_CONTAINERID", "c0ffee"),
        ("CNI_NETNS", netns_path.as_str()),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", cni_path.as_str()),
        ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1"),
    ];
    let host = palisade_cni::host_ifname("c0ffee");

    let (ok, result) = cni(&node, "ADD", &env, &conf);
    assert!(ok, "ADD failed: {result}");
    assert_eq!(result["ips"][0]["address"], "10.9.0.5/24");
    assert_eq!(result["interfaces"][0]["name"], host.as_str());
    assert_eq!(result["interfaces"][1]["sandbox"], netns_path.as_str());
    // Host side: the veth and the host routes.
    assert!(node.ip(&["route", "show", "10.9.0.5/32"]).contains(&host));
    assert!(node.ip(&["-6", "route", "show", "fd09::5/128"]).contains(&host));
    // Pod side: addresses and the default route via the link-local gateway.
    let addrs = pod.ip(&["addr", "show", "dev", "eth0"]);
    assert!(addrs.contains("10.9.0.5/32") && addrs.contains("fd09::5/64"), "{addrs}");
    assert!(pod.ip(&["route", "show", "default"]).contains("169.254.1.1"));
    // Traffic flows node -> pod and back: a TCP connection from the node to the pod.
    let in_ns = |path: String| {
        move || nix::sched::setns(std::fs::File::open(path).unwrap(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap()
    };
    let enter_pod = in_ns(pod.path());
    let listener = std::thread::spawn(move || {
        enter_pod();
        std::net::TcpListener::bind("10.9.0.5:7000").unwrap()
    })
    .join()
    .unwrap();
    let server = std::thread::spawn(move || {
        let (mut c, peer) = listener.accept().unwrap();
        c.write_all(b"pong").unwrap();
        peer
    });
    let enter_node = in_ns(node.path());
    let reply = std::thread::spawn(move || {
        enter_node();
        let mut c =
            std::net::TcpStream::connect_timeout(&"10.9.0.5:7000".parse().unwrap(), std::time::Duration::from_secs(3))
                .expect("node -> pod connection");
        let mut buf = String::new();
        std::io::Read::read_to_string(&mut c, &mut buf).unwrap();
        buf
    })
    .join()
    .unwrap();
    assert_eq!(reply, "pong");
    assert_eq!(server.join().unwrap().ip().to_string(), "10.9.255.1");
    // The agent was told.
    {
        let seen = seen.lock().unwrap();
        let put = seen.iter().find(|(m, p, _)| m == "PUT" && p == "/v1/endpoints/shop/web-1").expect("registration");
        assert_eq!(put.2["interface"], host.as_str());
        assert_eq!(put.2["ipv4"], "10.9.0.5");
        assert_eq!(put.2["ipv6"], "fd09::5");
    }

    let mut conf_check = conf.clone();
    conf_check["prevResult"] = result.clone();
    let (ok, out) = cni(&node, "CHECK", &env, &conf_check);
    assert!(ok, "CHECK failed: {out}");

    let (ok, out) = cni(&node, "DEL", &env, &conf);
    assert!(ok, "DEL failed: {out}");
    assert!(!node.ip(&["link", "show"]).contains(&host), "host veth removed");
    assert!(seen.lock().unwrap().iter().any(|(m, p, _)| m == "DELETE" && p == "/v1/endpoints/shop/web-1"));
    // DEL is idempotent; CHECK now fails.
    let (ok, out) = cni(&node, "DEL", &env, &conf);
    assert!(ok, "second DEL failed: {out}");
    let (ok, _) = cni(&node, "CHECK", &env, &conf_check);
    assert!(!ok);
}
