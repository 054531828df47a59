//! The real `palisade-agent --kubernetes` against a small in-process API server that speaks
//! the list/watch protocol (resourceVersions, bookmarks, 410 Gone, disconnects, outages).
//! Root: the agent loads its datapath and runs in a throwaway network namespace (with a
//! veth pair and a host route standing for a pod), where the fake API server also listens
//! on 127.0.0.1. Everything is removed by RAII guards.
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use palisade_agent::api::client::Client;
use serde_json::{Value, json};
use tokio::sync::watch;

// ---------------------------------------------------------------- throwaway namespace

struct Netns {
    name: String,
}

impl Netns {
    fn new(name: &str) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", name]).stderr(Stdio::null()).status();
        run(&["ip", "netns", "add", name]);
        let ns = Netns { name: name.into() };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }
    fn ip(&self, args: &[&str]) {
        let mut all = vec!["ip", "-n", &self.name];
        all.extend_from_slice(args);
        run(&all);
    }
    fn file(&self) -> std::fs::File {
        std::fs::File::open(format!("/var/run/netns/{}", self.name)).unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn run(args: &[&str]) {
    let st = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(st.success(), "{args:?}");
}

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

// ---------------------------------------------------------------- fake API server

/// One resource collection.
#[derive(Default)]
struct Collection {
    objects: BTreeMap<String, Value>,
    /// (resourceVersion, type, object) of every change.
    events: Vec<(u64, &'static str, Value)>,
}

#[derive(Default)]
struct ApiState {
    rv: u64,
    collections: BTreeMap<&'static str, Collection>,
    /// Watches from a resourceVersion below this get 410 Gone (compaction).
    gone_below: u64,
    /// Every request fails with 503 and open watches end.
    down: bool,
}

#[derive(Clone)]
struct FakeApi {
    state: Arc<Mutex<ApiState>>,
    /// Bumped to wake watches (new events) and to end them (disconnects).
    wake: watch::Sender<(u64, u64)>,
}

const RESOURCES: &[(&str, &str, &str)] = &[
    ("/api/v1/pods", "v1", "Pod"),
    ("/api/v1/namespaces", "v1", "Namespace"),
    ("/apis/networking.k8s.io/v1/networkpolicies", "networking.k8s.io/v1", "NetworkPolicy"),
    ("/apis/cilium.io/v2/ciliumnetworkpolicies", "cilium.io/v2", "CiliumNetworkPolicy"),
    ("/apis/cilium.io/v2/ciliumclusterwidenetworkpolicies", "cilium.io/v2", "CiliumClusterwideNetworkPolicy"),
];

fn collection_of(kind: &str) -> &'static str {
    RESOURCES.iter().find(|r| r.2 == kind).map(|r| r.0).unwrap()
}

fn key_of(obj: &Value) -> String {
    match obj["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{ns}/{}", obj["metadata"]["name"].as_str().unwrap()),
        None => obj["metadata"]["name"].as_str().unwrap().to_string(),
    }
}

impl FakeApi {
    fn new() -> FakeApi {
        let (wake, _) = watch::channel((0, 0));
        FakeApi { state: Arc::default(), wake }
    }

    fn poke(&self, disconnect: bool) {
        self.wake.send_modify(|(n, d)| {
            *n += 1;
            if disconnect {
                *d += 1;
            }
        });
    }

    fn upsert(&self, mut obj: Value) {
        let kind = obj["kind"].as_str().unwrap().to_string();
        {
            let mut st = self.state.lock().unwrap();
            st.rv += 1;
            let rv = st.rv;
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            let c = st.collections.entry(collection_of(&kind)).or_default();
            let ty = if c.objects.insert(key_of(&obj), obj.clone()).is_some() { "MODIFIED" } else { "ADDED" };
            c.events.push((rv, ty, obj));
        }
        self.poke(false);
    }

    fn delete(&self, kind: &str, key: &str) {
        {
            let mut st = self.state.lock().unwrap();
            st.rv += 1;
            let rv = st.rv;
            let c = st.collections.entry(collection_of(kind)).or_default();
            let mut obj = c.objects.remove(key).expect("object to delete");
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            c.events.push((rv, "DELETED", obj));
        }
        self.poke(false);
    }

    fn get(&self, kind: &str, key: &str) -> Option<Value> {
        self.state.lock().unwrap().collections.get(collection_of(kind))?.objects.get(key).cloned()
    }

    /// Drops every open watch (the agent must resume from its resourceVersion).
    fn disconnect(&self) {
        self.poke(true);
    }

    /// Forgets history: resuming watches get 410 Gone and must relist.
    fn compact(&self) {
        let mut st = self.state.lock().unwrap();
        st.gone_below = st.rv + 1;
    }

    fn set_down(&self, down: bool) {
        self.state.lock().unwrap().down = down;
        self.poke(true);
    }

    async fn handle(self, method: Method, uri: Uri, body: Bytes) -> Response {
        if self.state.lock().unwrap().down {
            return (StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
        }
        let path = uri.path().to_string();
        let query: BTreeMap<String, String> = uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if method == Method::PATCH && path.ends_with("/status") {
            return self.patch_status(&path, &body);
        }
        let Some(&(coll, api_version, kind)) = RESOURCES.iter().find(|r| r.0 == path) else {
            return (StatusCode::NOT_FOUND, format!("no route {path}")).into_response();
        };
        if query.get("watch").map(String::as_str) == Some("true") || query.get("watch").map(String::as_str) == Some("1")
        {
            let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
            return self.watch(coll, api_version, kind, from);
        }
        let st = self.state.lock().unwrap();
        let items: Vec<Value> =
            st.collections.get(coll).map(|c| c.objects.values().cloned().collect()).unwrap_or_default();
        let list = json!({
            "apiVersion": api_version, "kind": format!("{kind}List"),
            "metadata": {"resourceVersion": st.rv.to_string()},
            "items": items
        });
        (StatusCode::OK, [("content-type", "application/json")], list.to_string()).into_response()
    }

    fn patch_status(&self, path: &str, body: &[u8]) -> Response {
        // /apis/cilium.io/v2/[namespaces/NS/]PLURAL/NAME/status
        let parts: Vec<&str> = path.trim_start_matches("/apis/cilium.io/v2/").split('/').collect();
        let (kind, key) = match parts.as_slice() {
            ["namespaces", ns, "ciliumnetworkpolicies", name, "status"] => {
                ("CiliumNetworkPolicy", format!("{ns}/{name}"))
            }
            ["ciliumclusterwidenetworkpolicies", name, "status"] => {
                ("CiliumClusterwideNetworkPolicy", name.to_string())
            }
            _ => return (StatusCode::NOT_FOUND, "no such status").into_response(),
        };
        let Some(mut obj) = self.get(kind, &key) else { return (StatusCode::NOT_FOUND, "gone").into_response() };
        let patch: Value = serde_json::from_slice(body).unwrap();
        merge(&mut obj, &patch);
        self.upsert(obj.clone());
        (StatusCode::OK, [("content-type", "application/json")], self.get(kind, &key).unwrap().to_string())
            .into_response()
    }

    fn watch(&self, coll: &'static str, api_version: &'static str, kind: &'static str, from: u64) -> Response {
        let gone = self.state.lock().unwrap().gone_below > from;
        if gone {
            let ev = json!({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": format!("too old resource version: {from}"), "reason": "Expired", "code": 410}});
            return Response::new(Body::from(format!("{ev}\n")));
        }
        let api = self.clone();
        let rx = self.wake.subscribe();
        let start_disconnects = rx.borrow().1;
        let stream = futures_util::stream::unfold((from, false), move |(mut sent, done)| {
            let api = api.clone();
            let mut rx = rx.clone();
            async move {
                if done {
                    return None;
                }
                loop {
                    let pending: Vec<(u64, &'static str, Value)> = {
                        let st = api.state.lock().unwrap();
                        if st.down {
                            return None;
                        }
                        st.collections
                            .get(coll)
                            .map(|c| c.events.iter().filter(|e| e.0 > sent).cloned().collect())
                            .unwrap_or_default()
                    };
                    if rx.borrow().1 != start_disconnects {
                        return None;
                    }
                    if !pending.is_empty() {
                        let mut out = String::new();
                        for (rv, ty, obj) in pending {
                            sent = rv;
                            out.push_str(&json!({"type": ty, "object": obj}).to_string());
                            out.push('\n');
                        }
                        return Some((Ok::<_, Infallible>(Bytes::from(out)), (sent, false)));
                    }
                    tokio::select! {
                        _ = rx.changed() => {}
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {
                            // A bookmark with the current resourceVersion.
                            let rv = api.state.lock().unwrap().rv;
                            sent = sent.max(rv);
                            let bm = json!({"type": "BOOKMARK", "object": {
                                "apiVersion": api_version, "kind": kind,
                                "metadata": {"resourceVersion": rv.to_string()}}});
                            return Some((Ok(Bytes::from(format!("{bm}\n"))), (sent, false)));
                        }
                    }
                }
            }
        });
        Response::new(Body::from_stream(stream))
    }
}

fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

// ---------------------------------------------------------------- fixtures

fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

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

async fn eventually<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------- the test

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_follows_the_api_through_relists_disconnects_and_outages_privileged() {
    if !nix::unistd::Uid::effective().is_root() || !std::path::Path::new("/sys/fs/bpf").exists() {
        eprintln!("skipped: needs root and bpffs");
        return;
    }
    let tag = format!("pk8s{}", std::process::id());
    let ns = Netns::new(&tag);
    // A "pod" interface on this node: the host side of a veth, with the host route a CNI
    // plugin would add.
    ns.ip(&["link", "add", "lxck8s0", "type", "veth", "peer", "name", "podk8s0"]);
    ns.ip(&["link", "set", "lxck8s0", "up"]);
    ns.ip(&["link", "set", "podk8s0", "up"]);
    ns.ip(&["route", "add", "10.7.0.5/32", "dev", "lxck8s0"]);

    // The fake API server listens on 127.0.0.1 inside the throwaway namespace.
    let nsfile = ns.file();
    let listener = std::thread::spawn(move || {
        nix::sched::setns(&nsfile, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        l
    })
    .join()
    .unwrap();
    let port = listener.local_addr().unwrap().port();
    let api = FakeApi::new();
    let router = axum::Router::new().fallback({
        let api = api.clone();
        move |method: Method, uri: Uri, body: Bytes| api.clone().handle(method, uri, body)
    });
    tokio::spawn(async move {
        let l = tokio::net::TcpListener::from_std(listener).unwrap();
        axum::serve(l, router).await.unwrap();
    });

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
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_palisade-agent"));
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
    let fd = ns.file();
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
