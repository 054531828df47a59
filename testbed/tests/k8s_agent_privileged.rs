//! The real `palisade-agent --kubernetes` against the testbed's small API server
//! ([`palisade_testbed::kubeapi`]) that speaks the list/watch protocol (resourceVersions,
//! bookmarks, 410 Gone, disconnects, outages).
//! Root: the agent loads its datapath and runs in a throwaway network namespace (with a
//! veth pair and a host route standing for a pod), where the fake API server also listens
//! on 127.0.0.1. Everything is removed by RAII guards.
mod common;

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{agent_binary, eventually};
use palisade_api::Client;
use palisade_testbed::kubeapi::KubeApiServer;
use palisade_testbed::netns::{Netns, Via};
use serde_json::{Value, json};

struct Agent {
    child: Child,
    bpffs: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.bpffs);
    }
}

// ---------------------------------------------------------------- fixtures

#[allow(clippy::needless_pass_by_value, reason = "called with json! literals")]
fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

#[allow(clippy::needless_pass_by_value, reason = "called with json! literals")]
fn pod(ns: &str, name: &str, node: &str, ip: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 80}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

fn cnp(ns: &str, name: &str, port: &str) -> Value {
    json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"endpointSelector": {"matchLabels": {"app": "web"}},
                 "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "api"}}],
                              "toPorts": [{"ports": [{"port": port, "protocol": "TCP"}]}]}]}})
}

/// `GET path` on the agent's health listener (its default, 127.0.0.1:9962, inside the
/// throwaway namespace); `None` while nothing listens.
fn http_get(ns: &Netns, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let nsfile = ns.open().unwrap();
    let path = path.to_string();
    std::thread::spawn(move || {
        nix::sched::setns(&nsfile, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
        let mut s = std::net::TcpStream::connect("127.0.0.1:9962").ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: palisade\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        Some((head.split(' ').nth(1)?.parse().ok()?, body.to_string()))
    })
    .join()
    .ok()?
}

// ---------------------------------------------------------------- the test

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_follows_the_api_through_relists_disconnects_and_outages_privileged() {
    palisade_privileged::require_root!();
    if !palisade_privileged::has_bpffs() {
        return;
    }
    let tag = format!("pk8s{}", std::process::id());
    let ns = Netns::create(&tag).expect("a throwaway network namespace");
    // A "pod" interface on this node: the host side of a veth, with the host route a CNI
    // plugin would add.
    ns.netlink(|nl| {
        nl.add_veth("lxck8s0", "podk8s0")?;
        for dev in ["lxck8s0", "podk8s0"] {
            nl.set_up(&nl.existing_link(dev)?, dev)?;
        }
        nl.add_route(&nl.existing_link("lxck8s0")?, "lxck8s0", [10, 7, 0, 5].into(), 32, Via::Link)
    })
    .expect("the pod's veth and host route");

    // The fake API server listens on 127.0.0.1 inside the throwaway namespace.
    let server = KubeApiServer::start(ns.open().unwrap()).unwrap();
    let api = server.api.clone();
    let port = server.port;

    api.upsert(namespace("shop", json!({"team": "a"})));
    api.upsert(pod("shop", "web-1", "node-a", "10.7.0.5", json!({"app": "web"})));
    api.upsert(pod("shop", "api-1", "node-b", "10.8.0.9", json!({"app": "api"})));
    api.upsert(cnp("shop", "web", "80"));
    api.upsert(json!({"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
        "metadata": {"name": "bad"},
        "spec": {"endpointSelector": {}, "egress": [{"toPorts": [{"ports": [{"port": "99999"}]}]}]}}));
    api.upsert(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "deny-all", "namespace": "shop"},
        "spec": {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"]}}));

    // The API server is away when the agent starts: the agent must not be ready before it
    // has listed everything once.
    api.set_down(true);
    // Two of the tier kinds' CRDs are not installed (404): they count as listed and empty.
    api.set_served("AdminNetworkPolicy", false);
    api.set_served("BaselineAdminNetworkPolicy", false);

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://127.0.0.1:{port}\"}}\nusers:\n- name: u\n  user: {{token: t}}\ncontexts:\n- name: c\n  context: {{cluster: fake, user: u}}\ncurrent-context: c\n"
        ),
    )
    .unwrap();
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/palisade-{tag}"));
    let socket = dir.path().join("agent.sock");
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let mut cmd = Command::new(agent_binary());
    cmd.arg("--bpffs")
        .arg(&bpffs)
        .arg("--policy-dir")
        .arg(dir.path().join("policies"))
        .arg("--api-socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--kubernetes", "--node-name", "node-a", "--kube-resync-secs", "1", "--fault-injection"])
        .env("KUBECONFIG", &kubeconfig)
        .env("PALISADE_LOG", "info,palisade_agent::k8s=debug")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let fd = ns.open().unwrap();
    let raw = fd.as_raw_fd();
    // SAFETY: only setns, async-signal-safe, between fork and exec; `fd` outlives spawn.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(raw, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let _agent = Agent { child: cmd.spawn().unwrap(), bpffs };
    let log_path = dir.path().join("agent.log");
    let client = Client::new(&socket);
    let dump_log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    // 0. Alive but not ready while the Kubernetes source has not synced; ready after.
    eventually("the agent's API", async || client.status().await.ok()).await;
    let (code, body) = eventually("the health listener", async || http_get(&ns, "/healthz")).await;
    assert_eq!(code, 200, "{body}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (code, body) = http_get(&ns, "/readyz").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("waiting for the first sync of: kubernetes"), "{body}");
    let (_, metrics) = http_get(&ns, "/metrics").unwrap();
    assert!(metrics.contains("\npalisade_ready 0\n"), "{metrics}");
    api.set_down(false);
    let body = eventually("ready after the first sync", async || {
        let (code, body) = http_get(&ns, "/readyz")?;
        (code == 200).then_some(body)
    })
    .await;
    assert!(body.contains("first full sync: revision"), "{body}");
    let log = dump_log();
    assert!(
        log.contains("the API server does not serve this kind") && log.contains("AdminNetworkPolicy"),
        "the missing tier CRDs are reported: {log}"
    );

    // 1. Local pod -> endpoint on the routed interface; remote pod -> identity.
    let web = eventually("local endpoint shop/web-1", async || {
        client.endpoints().await.ok()?.into_iter().find(|e| e.name == "web-1")
    })
    .await;
    assert_eq!(web.interface, "lxck8s0", "{}", dump_log());
    assert!(web.security_labels.iter().any(|l| l.contains("namespace.labels.team=a")), "{:?}", web.security_labels);
    eventually("identity of the remote pod api-1", async || {
        client.identities().await.ok()?.into_iter().find(|i| i.labels.iter().any(|l| l == "k8s:app=api"))
    })
    .await;
    // 2. Policies from the API are enforced; the invalid one is reported with its field path.
    let policies = eventually("three policies from the API", async || {
        let p = client.policies().await.ok()?;
        (p.len() == 3).then_some(p)
    })
    .await;
    let find = |kind: &str| policies.iter().find(|p| p.kind == kind).unwrap().clone();
    assert!(find("CiliumNetworkPolicy").enforced);
    assert_eq!(find("CiliumNetworkPolicy").source, "kube:CiliumNetworkPolicy/shop/web");
    assert!(find("NetworkPolicy").enforced);
    let bad = find("CiliumClusterwideNetworkPolicy");
    assert!(!bad.enforced);
    assert!(bad.error.as_deref().unwrap().contains("spec.egress[0].toPorts[0].ports[0].port"), "{bad:?}");
    // ... and the status says so, per node.
    eventually("status of the CNP written back", async || {
        let o = api.get("CiliumNetworkPolicy", "shop/web")?;
        (o["status"]["nodes"]["node-a"]["ok"] == json!(true)).then_some(())
    })
    .await;
    let bad_obj = eventually("status of the CCNP written back", async || {
        let o = api.get("CiliumClusterwideNetworkPolicy", "bad")?;
        (o["status"]["nodes"]["node-a"]["ok"] == json!(false)).then_some(o)
    })
    .await;
    assert!(bad_obj["status"]["nodes"]["node-a"]["error"].as_str().unwrap().contains("toPorts"), "{bad_obj}");
    let st = client.wait_current(Duration::from_secs(20)).await.unwrap();
    assert_eq!(st.revision, st.realized_revision);
    let web = client.endpoints().await.unwrap().into_iter().find(|e| e.name == "web-1").unwrap();
    assert!(web.ingress_enforced, "the CNP selects web-1: {web:?}");

    // 2b. Faults: the policy watch and the identity cache lose what the API handed in when
    //     they restart; the Kubernetes source hands it in again before anything is applied.
    for actor in ["policy_watch", "identity_cache"] {
        let ack = client.debug_panic(actor).await.unwrap_or_else(|e| panic!("{actor}: {e}\n{}", dump_log()));
        client.wait_revision(ack.revision, Duration::from_secs(20)).await.unwrap();
        let p = client.policies().await.unwrap();
        assert_eq!(p.len(), 3, "{actor}: the policies from the API are back: {p:?}");
        assert!(
            client.identities().await.unwrap().iter().any(|i| i.labels.iter().any(|l| l == "k8s:app=api")),
            "{actor}: the remote pod's identity is back"
        );
        let web = client.endpoints().await.unwrap().into_iter().find(|e| e.name == "web-1").unwrap();
        assert!(web.ingress_enforced && web.realized_revision >= ack.revision, "{actor}: {web:?}");
    }

    // 3. A watch disconnect: the agent resumes and sees what happened meanwhile.
    api.disconnect();
    api.upsert(pod("shop", "api-2", "node-b", "10.8.0.10", json!({"app": "api", "v": "2"})));
    eventually("identity of api-2 after a reconnect", async || {
        client.identities().await.ok()?.into_iter().find(|i| i.labels.iter().any(|l| l == "k8s:v=2"))
    })
    .await;

    // 4. An outage: nothing changes while the API server is away, even though pods are
    //    deleted meanwhile; afterwards the agent relists (410 Gone) and catches up.
    let before = client.status().await.unwrap();
    api.set_down(true);
    api.delete("Pod", "shop/web-1");
    api.delete("Pod", "shop/api-2");
    api.compact();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = client.status().await.unwrap();
    assert_eq!(during.endpoints, before.endpoints, "endpoints stay while the API is away");
    assert!(client.endpoints().await.unwrap().iter().any(|e| e.name == "web-1"));
    assert!(client.identities().await.unwrap().iter().any(|i| i.labels.iter().any(|l| l == "k8s:v=2")));
    assert_eq!(client.policies().await.unwrap().iter().filter(|p| p.enforced).count(), 2);
    api.set_down(false);
    eventually("web-1 removed after the relist", async || {
        let eps = client.endpoints().await.ok()?;
        (!eps.iter().any(|e| e.name == "web-1")).then_some(())
    })
    .await;
    eventually("api-2's identity released after the relist", async || {
        let ids = client.identities().await.ok()?;
        (!ids.iter().any(|i| i.labels.iter().any(|l| l == "k8s:v=2"))).then_some(())
    })
    .await;

    // 5. Policy change and deletion through the API.
    api.delete("CiliumClusterwideNetworkPolicy", "bad");
    api.upsert(cnp("shop", "web", "8080"));
    eventually("the CCNP gone", async || {
        let p = client.policies().await.ok()?;
        (p.len() == 2 && p.iter().all(|p| p.enforced)).then_some(())
    })
    .await;
    let st = client.wait_current(Duration::from_secs(20)).await.unwrap();
    assert!(st.revision > before.revision);
    let log = dump_log();
    assert!(log.contains("watch failed"), "the outage was noticed: {log}");
}
