//! A small Kubernetes API server for tests (never shipped in the agent): it speaks the
//! list/watch HTTP protocol that kube-rs watchers use — lists with a resourceVersion,
//! watches from a resourceVersion with ADDED/MODIFIED/DELETED events, bookmarks every half
//! second, 410 Gone after [`FakeApi::compact`], disconnects and outages on demand — for Pods,
//! Namespaces, `NetworkPolicies`, `CiliumNetworkPolicies`, `CiliumClusterwideNetworkPolicies`
//! and the `policy.networking.k8s.io` tier kinds (`ClusterNetworkPolicies` v1alpha2,
//! `AdminNetworkPolicies` and `BaselineAdminNetworkPolicies` v1alpha1), plus the status
//! subresource of the policy kinds: merge patch, and server-side apply with
//! `status.conditions` merged as the list map keyed by `type` that the tier CRDs declare.
//! A collection can be withdrawn ([`FakeApi::set_served`]: 404, as for a CRD not
//! installed). Objects are plain JSON.
//!
//! [`KubeApiServer::start`] serves it inside a network namespace (the testbed's node, where
//! the agent runs), and [`plan_objects`] turns a scenario into the objects a cluster would
//! hold for it, so the testbed can feed the agent through the API instead of its local one.
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fs::File;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::error::SetupError;
use crate::scenario::Plan;

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
    /// Collections answered with 404 (their CRD "not installed").
    not_served: std::collections::BTreeSet<&'static str>,
}

#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<ApiState>>,
    /// Bumped to wake watches (new events) and to end them (disconnects).
    wake: watch::Sender<(u64, u64)>,
}

/// The collections served: path, apiVersion, kind.
const RESOURCES: &[(&str, &str, &str)] = &[
    ("/api/v1/pods", "v1", "Pod"),
    ("/api/v1/namespaces", "v1", "Namespace"),
    ("/api/v1/nodes", "v1", "Node"),
    ("/apis/networking.k8s.io/v1/networkpolicies", "networking.k8s.io/v1", "NetworkPolicy"),
    ("/apis/cilium.io/v2/ciliumnetworkpolicies", "cilium.io/v2", "CiliumNetworkPolicy"),
    ("/apis/cilium.io/v2/ciliumclusterwidenetworkpolicies", "cilium.io/v2", "CiliumClusterwideNetworkPolicy"),
    (
        "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies",
        "policy.networking.k8s.io/v1alpha2",
        "ClusterNetworkPolicy",
    ),
    (
        "/apis/policy.networking.k8s.io/v1alpha1/adminnetworkpolicies",
        "policy.networking.k8s.io/v1alpha1",
        "AdminNetworkPolicy",
    ),
    (
        "/apis/policy.networking.k8s.io/v1alpha1/baselineadminnetworkpolicies",
        "policy.networking.k8s.io/v1alpha1",
        "BaselineAdminNetworkPolicy",
    ),
];

fn collection_of(kind: &str) -> &'static str {
    RESOURCES.iter().find(|r| r.2 == kind).map_or_else(|| panic!("the fake API server has no {kind}"), |r| r.0)
}

fn key_of(obj: &Value) -> String {
    match obj["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{ns}/{}", obj["metadata"]["name"].as_str().unwrap()),
        None => obj["metadata"]["name"].as_str().unwrap().to_string(),
    }
}

impl Default for FakeApi {
    fn default() -> FakeApi {
        FakeApi::new()
    }
}

impl FakeApi {
    pub fn new() -> FakeApi {
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

    pub fn upsert(&self, mut obj: Value) {
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

    pub fn delete(&self, kind: &str, key: &str) {
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

    pub fn get(&self, kind: &str, key: &str) -> Option<Value> {
        self.state.lock().unwrap().collections.get(collection_of(kind))?.objects.get(key).cloned()
    }

    /// Drops every open watch (the agent must resume from its resourceVersion).
    pub fn disconnect(&self) {
        self.poke(true);
    }

    /// Forgets history: resuming watches get 410 Gone and must relist.
    pub fn compact(&self) {
        let mut st = self.state.lock().unwrap();
        st.gone_below = st.rv + 1;
    }

    /// Serves kind `kind`'s collection or answers 404 for it, as when its CRD is deleted
    /// (which deletes its objects: they are dropped here without watch events, so a
    /// watcher learns it from the 404 alone; recreate them after serving it again). Open
    /// watches end either way.
    pub fn set_served(&self, kind: &str, served: bool) {
        {
            let mut st = self.state.lock().unwrap();
            if served {
                st.not_served.remove(collection_of(kind));
            } else {
                st.not_served.insert(collection_of(kind));
                if let Some(c) = st.collections.get_mut(collection_of(kind)) {
                    c.objects.clear();
                }
            }
        }
        self.poke(true);
    }

    pub fn set_down(&self, down: bool) {
        self.state.lock().unwrap().down = down;
        self.poke(true);
    }

    #[allow(clippy::unused_async, reason = "the shape of the HTTP server's handler")]
    pub async fn handle(self, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
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
            let apply = headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/apply-patch"));
            return self.patch_status(&path, &body, apply);
        }
        let Some(&(coll, api_version, kind)) = RESOURCES.iter().find(|r| r.0 == path) else {
            return (StatusCode::NOT_FOUND, format!("no route {path}")).into_response();
        };
        if self.state.lock().unwrap().not_served.contains(coll) {
            return (StatusCode::NOT_FOUND, "404 page not found").into_response();
        }
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

    fn patch_status(&self, path: &str, body: &[u8], apply: bool) -> Response {
        // /apis/GROUP/VERSION/[namespaces/NS/]PLURAL/NAME/status
        let Some((kind, key)) = status_target(path) else {
            return (StatusCode::NOT_FOUND, "no such status").into_response();
        };
        let Some(mut obj) = self.get(kind, &key) else { return (StatusCode::NOT_FOUND, "gone").into_response() };
        let patch: Value = serde_json::from_slice(body).unwrap();
        if apply {
            // Server-side apply of the status: only `status` counts, and `conditions` is a
            // list map keyed by `type` (each applier keeps the entries of the others).
            let Some(status) = patch.get("status") else {
                return (StatusCode::UNPROCESSABLE_ENTITY, "an apply patch of the status without status")
                    .into_response();
            };
            let mut status = status.clone();
            if let Some(new) = status.get_mut("conditions").and_then(Value::as_array_mut).map(std::mem::take) {
                let mut list = obj["status"]["conditions"].as_array().cloned().unwrap_or_default();
                for c in new {
                    match list.iter_mut().find(|o| o["type"] == c["type"]) {
                        Some(o) => *o = c,
                        None => list.push(c),
                    }
                }
                status["conditions"] = Value::Array(list);
            }
            merge(&mut obj, &json!({ "status": status }));
        } else {
            merge(&mut obj, &patch);
        }
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
                        () = tokio::time::sleep(Duration::from_millis(500)) => {
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

/// The kind and key of a status subresource path, for the policy kinds that have one.
fn status_target(path: &str) -> Option<(&'static str, String)> {
    let rest = path.strip_suffix("/status")?;
    let (coll, name) = rest.rsplit_once('/')?;
    // Namespaced: /apis/G/V/namespaces/NS/PLURAL -> collection /apis/G/V/PLURAL.
    let (coll, ns) = match coll.split_once("/namespaces/") {
        Some((base, tail)) => {
            let (ns, plural) = tail.split_once('/')?;
            (format!("{base}/{plural}"), Some(ns))
        }
        None => (coll.to_string(), None),
    };
    // NetworkPolicy has no status subresource (its KEP was withdrawn), nor the core kinds.
    let &(_, _, kind) =
        RESOURCES.iter().find(|r| r.0 == coll && r.0.starts_with("/apis/") && r.2 != "NetworkPolicy")?;
    Some((kind, ns.map_or_else(|| name.to_string(), |ns| format!("{ns}/{name}"))))
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

fn loopback_listener() -> std::io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// The fake API server serving on 127.0.0.1 inside a network namespace; stops on drop.
pub struct KubeApiServer {
    pub api: FakeApi,
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl KubeApiServer {
    /// Starts serving a new [`FakeApi`] inside the namespace `netns` (its loopback must be
    /// up), on the current tokio runtime.
    pub fn start(netns: File) -> Result<KubeApiServer, SetupError> {
        KubeApiServer::serve(netns, FakeApi::new())
    }

    /// Serves `api` inside the namespace `netns`: one cluster's API server, reached from
    /// each node's namespace on its own loopback (several listeners, one state).
    pub fn serve(netns: File, api: FakeApi) -> Result<KubeApiServer, SetupError> {
        let listener = crate::netns::run_in(netns, loopback_listener)?
            .map_err(SetupError::io("listening for the fake API server"))?;
        KubeApiServer::serve_on(listener, api)
    }

    /// Serves `api` on 127.0.0.1 of the calling thread's namespace (`up --kubernetes`:
    /// for kubectl on this machine; loopback only, never an outside address).
    pub fn serve_here(api: FakeApi) -> Result<KubeApiServer, SetupError> {
        let listener = loopback_listener().map_err(SetupError::io("listening for the fake API server on 127.0.0.1"))?;
        KubeApiServer::serve_on(listener, api)
    }

    fn serve_on(listener: std::net::TcpListener, api: FakeApi) -> Result<KubeApiServer, SetupError> {
        let port = listener.local_addr().map_err(SetupError::io("reading the API server's address"))?.port();
        let listener =
            tokio::net::TcpListener::from_std(listener).map_err(SetupError::io("registering the API server socket"))?;
        let router = axum::Router::new().fallback({
            let api = api.clone();
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                api.clone().handle(method, uri, headers, body)
            }
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(KubeApiServer { api, port, task })
    }

    /// A kubeconfig pointing at this server (plain HTTP, a dummy token).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: testbed\n  cluster: {{server: \"http://127.0.0.1:{}\"}}\nusers:\n- name: testbed\n  user: {{token: testbed}}\ncontexts:\n- name: testbed\n  context: {{cluster: testbed, user: testbed}}\ncurrent-context: testbed\n",
            self.port
        )
    }
}

impl Drop for KubeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A Namespace object.
pub fn namespace_object(name: &str, labels: &BTreeMap<String, String>) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

/// The Pod object of scenario pod `index` of `plan`, running on node `node`.
pub fn pod_object(plan: &Plan, index: usize, node: &str) -> Value {
    let pod = &plan.pods[index];
    let ips: Vec<String> = pod.ipv4.map(|a| a.to_string()).into_iter().chain(pod.ipv6.map(|a| a.to_string())).collect();
    let ports: Vec<Value> = pod
        .ports
        .iter()
        .map(|p| {
            let mut v = json!({"containerPort": p.port, "protocol": p.protocol.to_string()});
            if let Some(n) = &p.name {
                v["name"] = json!(n);
            }
            v
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": pod.namespace, "labels": pod.labels},
        "spec": {"nodeName": node, "serviceAccountName": pod.service_account, "hostNetwork": pod.host_network,
                 "containers": [{"name": "main", "ports": ports}]},
        "status": {"phase": "Running", "podIP": ips.first(),
                   "podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>()}})
}

/// A Node object named `name` with its labels and internal addresses.
pub fn node_object(name: &str, labels: &BTreeMap<String, String>, addresses: &[std::net::IpAddr]) -> Value {
    let addresses: Vec<Value> =
        addresses.iter().map(|a| json!({"type": "InternalIP", "address": a.to_string()})).collect();
    let mut labels = labels.clone();
    labels.entry("kubernetes.io/hostname".into()).or_insert_with(|| name.to_string());
    labels.entry("kubernetes.io/os".into()).or_insert_with(|| "linux".to_string());
    json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "status": {"addresses": addresses, "conditions": [{"type": "Ready", "status": "True"}]}})
}

/// Everything a cluster would hold for `plan`: its nodes (named by `node_name` from their
/// index), namespaces, pods (each on its own node) and the policies the scenario expects to
/// be enforced (as the manifests are, in JSON).
pub fn plan_objects(plan: &Plan, node_name: impl Fn(usize) -> String) -> Vec<Value> {
    let mut out: Vec<Value> = plan
        .nodes
        .iter()
        .map(|n| {
            let addresses: Vec<std::net::IpAddr> =
                n.ipv4.map(std::net::IpAddr::V4).into_iter().chain(n.ipv6.map(std::net::IpAddr::V6)).collect();
            node_object(&node_name(n.index), &n.labels, &addresses)
        })
        .collect();
    out.extend(plan.namespaces.iter().map(|(n, labels)| namespace_object(n, labels)));
    out.extend((0..plan.pods.len()).map(|i| pod_object(plan, i, &node_name(plan.pods[i].node))));
    for p in plan.policies.iter().filter(|p| !p.expect_rejected) {
        out.push(serde_json::to_value(&p.manifest).unwrap_or(Value::Null));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(node: &str, status: &str) -> Bytes {
        Bytes::from(
            json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
                "metadata": {"name": "guard"},
                "status": {"conditions": [{"type": format!("Ready-On-Node-{node}"), "status": status,
                    "reason": "Enforced", "message": "", "lastTransitionTime": "2026-12-02T12:00:00Z"}]}})
            .to_string(),
        )
    }

    #[tokio::test]
    async fn server_side_apply_of_the_status_merges_conditions_by_type() {
        let api = FakeApi::new();
        api.upsert(json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": "guard"}, "spec": {"tier": "Admin", "priority": 1}}));
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "application/apply-patch+yaml".parse().unwrap());
        let uri: Uri =
            "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies/guard/status?fieldManager=x&force=true"
                .parse()
                .unwrap();
        for (node, status) in [("a", "True"), ("b", "False"), ("a", "False")] {
            let r = api.clone().handle(Method::PATCH, uri.clone(), headers.clone(), apply(node, status)).await;
            assert_eq!(r.status(), StatusCode::OK);
        }
        let obj = api.get("ClusterNetworkPolicy", "guard").unwrap();
        let conditions = obj["status"]["conditions"].as_array().unwrap();
        let summary: Vec<(&str, &str)> =
            conditions.iter().map(|c| (c["type"].as_str().unwrap(), c["status"].as_str().unwrap())).collect();
        assert_eq!(summary, [("Ready-On-Node-a", "False"), ("Ready-On-Node-b", "False")]);
        assert_eq!(obj["spec"]["priority"], json!(1), "the spec is untouched");
        // A NetworkPolicy has no status subresource; a CNP's status path is namespaced.
        assert!(status_target("/apis/networking.k8s.io/v1/namespaces/s/networkpolicies/x/status").is_none());
        assert_eq!(
            status_target("/apis/cilium.io/v2/namespaces/shop/ciliumnetworkpolicies/web/status"),
            Some(("CiliumNetworkPolicy", "shop/web".to_string()))
        );
        // Not served: 404 for lists.
        api.set_served("ClusterNetworkPolicy", false);
        let list: Uri = "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies".parse().unwrap();
        let r = api.clone().handle(Method::GET, list, HeaderMap::new(), Bytes::new()).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
    }
}
