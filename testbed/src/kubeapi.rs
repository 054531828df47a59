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
            let meta = &mut obj["metadata"];
            if meta.get("creationTimestamp").is_none_or(Value::is_null) {
                meta["creationTimestamp"] = json!(k8s_now());
            }
            if meta.get("uid").is_none_or(Value::is_null) {
                meta["uid"] = json!(format!("00000000-0000-4000-8000-{rv:012}"));
            }
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
        let path = uri.path().trim_end_matches('/').to_string();
        let query: BTreeMap<String, String> = uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), percent_decode(v)))
            .collect();
        let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        if method == Method::PATCH && path.ends_with("/status") {
            return self.patch_status(&path, &body, content_type.starts_with("application/apply-patch"));
        }
        if method == Method::GET
            && let Some(doc) = discovery(&path)
        {
            return json_response(StatusCode::OK, &doc);
        }
        let Some(target) = Target::parse(&path) else {
            return status_response(StatusCode::NOT_FOUND, "NotFound", &format!("the server could not find {path}"));
        };
        let (coll, api_version, kind) = target.resource;
        if self.state.lock().unwrap().not_served.contains(coll) {
            return (StatusCode::NOT_FOUND, "404 page not found").into_response();
        }
        let selector = Selector::from_query(&query, target.namespace.as_deref());
        match (method, target.name.as_deref()) {
            (Method::GET, None) => {
                if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) {
                    let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
                    return self.watch(coll, api_version, kind, from, selector);
                }
                let st = self.state.lock().unwrap();
                let items: Vec<Value> = st
                    .collections
                    .get(coll)
                    .map(|c| c.objects.values().filter(|o| selector.matches(o)).cloned().collect())
                    .unwrap_or_default();
                let accept = headers.get("accept").and_then(|v| v.to_str().ok()).unwrap_or("");
                if accept.contains("as=Table") && accept.contains("g=meta.k8s.io") {
                    return json_response(StatusCode::OK, &table(kind, &items, st.rv));
                }
                let list = json!({
                    "apiVersion": api_version, "kind": format!("{kind}List"),
                    "metadata": {"resourceVersion": st.rv.to_string()},
                    "items": items
                });
                json_response(StatusCode::OK, &list)
            }
            (Method::GET, Some(name)) => match self.get(kind, &target.key(name)) {
                Some(obj) => json_response(StatusCode::OK, &obj),
                None => not_found(coll, name),
            },
            (Method::POST, None) => {
                let Ok(mut obj) = serde_json::from_slice::<Value>(&body) else {
                    return status_response(StatusCode::BAD_REQUEST, "BadRequest", "the body is not a JSON object");
                };
                let Some(name) = obj["metadata"]["name"].as_str().map(str::to_string) else {
                    return status_response(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "Invalid",
                        "metadata.name: Required value",
                    );
                };
                if let Some(ns) = &target.namespace {
                    obj["metadata"]["namespace"] = json!(ns);
                }
                obj["apiVersion"] = json!(api_version);
                obj["kind"] = json!(kind);
                if self.get(kind, &target.key(&name)).is_some() {
                    return status_response(
                        StatusCode::CONFLICT,
                        "AlreadyExists",
                        &format!("{} \"{name}\" already exists", plural_of(coll)),
                    );
                }
                self.store(kind, obj, None);
                json_response(StatusCode::CREATED, &self.get(kind, &target.key(&name)).unwrap())
            }
            (Method::PUT, Some(name)) => {
                let Some(old) = self.get(kind, &target.key(name)) else { return not_found(coll, name) };
                let Ok(mut obj) = serde_json::from_slice::<Value>(&body) else {
                    return status_response(StatusCode::BAD_REQUEST, "BadRequest", "the body is not a JSON object");
                };
                obj["metadata"]["name"] = json!(name);
                if let Some(ns) = &target.namespace {
                    obj["metadata"]["namespace"] = json!(ns);
                }
                self.store(kind, obj, Some(&old));
                json_response(StatusCode::OK, &self.get(kind, &target.key(name)).unwrap())
            }
            (Method::PATCH, Some(name)) => {
                let text = String::from_utf8_lossy(&body);
                let Ok(patch) = serde_json::from_str::<Value>(&text)
                    .map_err(|e| e.to_string())
                    .or_else(|_| palisade_policy::yaml::from_str::<Value>(&text).map_err(|e| e.to_string()))
                else {
                    return status_response(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        "the patch is neither JSON nor YAML",
                    );
                };
                let old = self.get(kind, &target.key(name));
                let mut obj = match (&old, content_type.starts_with("application/apply-patch")) {
                    (Some(o), _) => o.clone(),
                    // Server-side apply creates.
                    (None, true) => json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": name}}),
                    (None, false) => return not_found(coll, name),
                };
                if content_type.starts_with("application/json-patch") {
                    return status_response(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "UnsupportedMediaType",
                        "this test API server takes merge, strategic merge and apply patches, not JSON patches",
                    );
                }
                merge(&mut obj, &without_directives(&patch));
                obj["metadata"]["name"] = json!(name);
                if let Some(ns) = &target.namespace {
                    obj["metadata"]["namespace"] = json!(ns);
                }
                self.store(kind, obj, old.as_ref());
                json_response(StatusCode::OK, &self.get(kind, &target.key(name)).unwrap())
            }
            (Method::DELETE, Some(name)) => {
                let key = target.key(name);
                let Some(obj) = self.get(kind, &key) else { return not_found(coll, name) };
                self.delete(kind, &key);
                json_response(StatusCode::OK, &obj)
            }
            _ => status_response(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "not supported here"),
        }
    }

    /// Stores a created or changed object as the API server would: uid and creation time
    /// kept from `old` (or made), generation bumped when the spec changed.
    fn store(&self, kind: &str, mut obj: Value, old: Option<&Value>) {
        let meta = &mut obj["metadata"];
        match old {
            Some(old) => {
                meta["uid"] = old["metadata"]["uid"].clone();
                meta["creationTimestamp"] = old["metadata"]["creationTimestamp"].clone();
                let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
                let changed = obj["spec"] != old["spec"];
                obj["metadata"]["generation"] = json!(if changed { generation + 1 } else { generation });
                if obj.get("status").is_none()
                    && let Some(st) = old.get("status")
                {
                    obj["status"] = st.clone();
                }
            }
            None => meta["generation"] = json!(1),
        }
        debug_assert_eq!(obj["kind"].as_str(), Some(kind));
        self.upsert(obj);
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

    fn watch(
        &self,
        coll: &'static str,
        api_version: &'static str,
        kind: &'static str,
        from: u64,
        selector: Selector,
    ) -> Response {
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
            let selector = selector.clone();
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
                        // (Events the selector leaves out still move `sent` on.)
                        for (rv, ty, obj) in pending {
                            sent = rv;
                            if !selector.matches(&obj) {
                                continue;
                            }
                            out.push_str(&json!({"type": ty, "object": obj}).to_string());
                            out.push('\n');
                        }
                        if !out.is_empty() {
                            return Some((Ok::<_, Infallible>(Bytes::from(out)), (sent, false)));
                        }
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

/// The collection, namespace and name a request path names:
/// `/api/v1[/namespaces/NS]/PLURAL[/NAME]`, `/apis/GROUP/VERSION[/namespaces/NS]/PLURAL[/NAME]`
/// (`/api/v1/namespaces/NAME` is the Namespace itself).
struct Target {
    resource: (&'static str, &'static str, &'static str),
    namespace: Option<String>,
    name: Option<String>,
}

impl Target {
    fn parse(path: &str) -> Option<Target> {
        let (base, rest) = if let Some(rest) = path.strip_prefix("/api/v1/") {
            ("/api/v1".to_string(), rest)
        } else {
            let rest = path.strip_prefix("/apis/")?;
            let mut it = rest.splitn(3, '/');
            let (group, version, rest) = (it.next()?, it.next()?, it.next()?);
            (format!("/apis/{group}/{version}"), rest)
        };
        let segs: Vec<&str> = rest.split('/').collect();
        let (namespace, plural, name) = match segs.as_slice() {
            ["namespaces", ns, plural] => (Some(ns.to_string()), *plural, None),
            ["namespaces", ns, plural, name] => (Some(ns.to_string()), *plural, Some(name.to_string())),
            [plural] => (None, *plural, None),
            [plural, name] => (None, *plural, Some(name.to_string())),
            _ => return None,
        };
        let coll = format!("{base}/{plural}");
        let &resource = RESOURCES.iter().find(|r| r.0 == coll)?;
        if namespace.is_some() && !namespaced(resource.2) {
            return None;
        }
        Some(Target { resource, namespace, name })
    }

    /// The store key of object `name` here.
    fn key(&self, name: &str) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}/{name}"),
            None => name.to_string(),
        }
    }
}

/// What a list or watch is narrowed to: a namespace (from the path), `fieldSelector`
/// `metadata.name=`/`metadata.namespace=` and `labelSelector` equalities (`k=v`, `k!=v`,
/// `k`), as kubectl sends them.
#[derive(Clone, Default)]
struct Selector {
    namespace: Option<String>,
    fields: Vec<(String, String)>,
    labels: Vec<(String, Option<String>, bool)>,
}

impl Selector {
    fn from_query(query: &BTreeMap<String, String>, namespace: Option<&str>) -> Selector {
        let mut sel = Selector { namespace: namespace.map(str::to_string), ..Selector::default() };
        for term in query.get("fieldSelector").map_or("", String::as_str).split(',').filter(|t| !t.is_empty()) {
            if let Some((k, v)) = term.split_once('=') {
                sel.fields.push((k.trim_end_matches('=').to_string(), v.to_string()));
            }
        }
        for term in query.get("labelSelector").map_or("", String::as_str).split(',').filter(|t| !t.is_empty()) {
            if let Some((k, v)) = term.split_once("!=") {
                sel.labels.push((k.to_string(), Some(v.to_string()), false));
            } else if let Some((k, v)) = term.split_once('=') {
                sel.labels.push((k.to_string(), Some(v.trim_start_matches('=').to_string()), true));
            } else if let Some(k) = term.strip_prefix('!') {
                sel.labels.push((k.to_string(), None, false));
            } else {
                sel.labels.push((term.to_string(), None, true));
            }
        }
        sel
    }

    fn matches(&self, obj: &Value) -> bool {
        let meta = &obj["metadata"];
        if let Some(ns) = &self.namespace
            && meta["namespace"].as_str() != Some(ns)
        {
            return false;
        }
        let fields_ok = self.fields.iter().all(|(k, v)| match k.as_str() {
            "metadata.name" => meta["name"].as_str() == Some(v),
            "metadata.namespace" => meta["namespace"].as_str() == Some(v),
            _ => true,
        });
        let labels_ok = self.labels.iter().all(|(k, v, eq)| {
            let have = meta["labels"][k].as_str();
            match v {
                Some(v) => (have == Some(v.as_str())) == *eq,
                None => have.is_some() == *eq,
            }
        });
        fields_ok && labels_ok
    }
}

/// Whether objects of `kind` live in a namespace.
fn namespaced(kind: &str) -> bool {
    matches!(kind, "Pod" | "NetworkPolicy" | "CiliumNetworkPolicy")
}

fn plural_of(coll: &str) -> &str {
    coll.rsplit('/').next().unwrap_or(coll)
}

fn short_names(kind: &str) -> &'static [&'static str] {
    match kind {
        "Pod" => &["po"],
        "Namespace" => &["ns"],
        "Node" => &["no"],
        "NetworkPolicy" => &["netpol"],
        "CiliumNetworkPolicy" => &["cnp", "ciliumnp"],
        "CiliumClusterwideNetworkPolicy" => &["ccnp"],
        "AdminNetworkPolicy" => &["anp"],
        "BaselineAdminNetworkPolicy" => &["banp"],
        _ => &[],
    }
}

/// The discovery documents kubectl reads before anything else: `/version`, `/api`,
/// `/apis`, and each group version's resource list (the unaggregated forms, which every
/// client falls back to).
fn discovery(path: &str) -> Option<Value> {
    let group_versions = || {
        let mut out: Vec<(&str, &str)> = Vec::new();
        for r in RESOURCES.iter().filter(|r| r.1.contains('/')) {
            let (g, v) = r.1.split_once('/').expect("a group version");
            if !out.contains(&(g, v)) {
                out.push((g, v));
            }
        }
        out
    };
    match path {
        "/version" => Some(json!({"major": "1", "minor": "32", "gitVersion": "v1.32.0-palisade-testbed",
            "platform": "linux/amd64"})),
        "/openapi/v3" => {
            let mut paths = serde_json::Map::new();
            for gv in
                std::iter::once("v1".to_string()).chain(group_versions().into_iter().map(|(g, v)| format!("{g}/{v}")))
            {
                let at = if gv == "v1" { "api/v1".to_string() } else { format!("apis/{gv}") };
                paths.insert(at.clone(), json!({"serverRelativeURL": format!("/openapi/v3/{at}?hash=testbed")}));
            }
            Some(json!({"paths": paths}))
        }
        _ if path.starts_with("/openapi/v3/") => openapi_group_version(path.strip_prefix("/openapi/v3/")?),
        "/api" => Some(json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]})),
        "/apis" => {
            let mut groups: Vec<Value> = Vec::new();
            for (g, v) in group_versions() {
                let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
                match groups.iter_mut().find(|x| x["name"] == g) {
                    Some(x) => x["versions"].as_array_mut().expect("versions").push(gv),
                    None => groups.push(json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})),
                }
            }
            Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
        }
        _ => {
            let gv = if path == "/api/v1" { "v1".to_string() } else { path.strip_prefix("/apis/")?.to_string() };
            if gv.matches('/').count() > 1 {
                return None;
            }
            let mut resources = Vec::new();
            for &(coll, api_version, kind) in RESOURCES.iter().filter(|r| r.1 == gv) {
                let plural = plural_of(coll);
                resources.push(
                    json!({"name": plural, "singularName": kind.to_lowercase(), "namespaced": namespaced(kind),
                    "kind": kind, "shortNames": short_names(kind),
                    "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}),
                );
                if api_version.contains('/') && kind != "NetworkPolicy" {
                    resources.push(json!({"name": format!("{plural}/status"), "singularName": "",
                        "namespaced": namespaced(kind), "kind": kind, "verbs": ["get", "patch", "update"]}));
                }
            }
            (!resources.is_empty()).then(
                || json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
            )
        }
    }
}

/// The `OpenAPI` v3 document of group version `at` (`api/v1`, `apis/GROUP/VERSION`): each
/// kind's object path with a PATCH that takes `fieldValidation`, which is what kubectl
/// looks for before it leaves validation to the server (this server keeps what it is
/// given; the agent validates policies and reports in their status). No schemas: kubectl
/// then patches built-in kinds with its own types and the others with merge patches.
fn openapi_group_version(at: &str) -> Option<Value> {
    let gv = if at == "api/v1" { "v1" } else { at.strip_prefix("apis/")? };
    let mut paths = serde_json::Map::new();
    for &(coll, _, kind) in RESOURCES.iter().filter(|r| r.1 == gv) {
        let (group, version) = gv.split_once('/').unwrap_or(("", gv));
        let base = coll.rsplit_once('/').map_or(coll, |(b, _)| b);
        let plural = plural_of(coll);
        let object = if namespaced(kind) {
            format!("{base}/namespaces/{{namespace}}/{plural}/{{name}}")
        } else {
            format!("{base}/{plural}/{{name}}")
        };
        let gvk = json!({"group": group, "version": version, "kind": kind});
        let param =
            json!({"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}});
        paths.insert(
            object,
            json!({"patch": {"x-kubernetes-group-version-kind": gvk, "parameters": [param],
                "responses": {"200": {"description": "OK"}}}}),
        );
    }
    (!paths.is_empty()).then(|| {
        json!({"openapi": "3.0.0", "info": {"title": "palisade testbed", "version": gv}, "paths": paths,
            "components": {"schemas": {}}})
    })
}

/// A list as the `Table` kubectl asks for (`kubectl get`): the columns a real API server
/// gives these kinds (`-o wide` adds those of priority 1).
fn table(kind: &str, items: &[Value], rv: u64) -> Value {
    let col = |name: &str, priority: u8| json!({"name": name, "type": "string", "format": "", "description": "", "priority": priority});
    let mut columns = vec![col("Name", 0)];
    match kind {
        "Pod" => columns.extend([
            col("Ready", 0),
            col("Status", 0),
            col("Restarts", 0),
            col("Age", 0),
            col("IP", 1),
            col("Node", 1),
        ]),
        "Node" => {
            columns.extend([
                col("Status", 0),
                col("Roles", 0),
                col("Age", 0),
                col("Version", 0),
                col("Internal-IP", 1),
            ]);
        }
        "Namespace" => columns.extend([col("Status", 0), col("Age", 0)]),
        _ => columns.push(col("Age", 0)),
    }
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            let name = o["metadata"]["name"].clone();
            let age = age(o["metadata"]["creationTimestamp"].as_str().unwrap_or(""));
            let cells = match kind {
                "Pod" => {
                    json!([name, "1/1", o["status"]["phase"], "0", age, o["status"]["podIP"], o["spec"]["nodeName"]])
                }
                "Node" => {
                    let ip = o["status"]["addresses"].as_array().and_then(|a| a.first()).map(|a| a["address"].clone());
                    json!([name, "Ready", "<none>", age, "v1.32.0-palisade-testbed", ip])
                }
                "Namespace" => json!([name, "Active", age]),
                _ => json!([name, age]),
            };
            let meta =
                json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]});
            json!({"cells": cells, "object": meta})
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv.to_string()},
        "columnDefinitions": columns, "rows": rows})
}

/// `kubectl`'s short age (`42s`, `7m`, `3h`, `2d`) of a timestamp this server wrote.
fn age(created: &str) -> String {
    let parse = || -> Option<u64> {
        let (date, time) = created.strip_suffix('Z')?.split_once('T')?;
        let d: Vec<i64> = date.split('-').map(|x| x.parse().ok()).collect::<Option<_>>()?;
        let t: Vec<u64> = time.split(':').map(|x| x.parse().ok()).collect::<Option<_>>()?;
        let (y, m, day) = (*d.first()?, *d.get(1)?, *d.get(2)?);
        // Days from 1970-01-01 (proleptic Gregorian), after Howard Hinnant's algorithm.
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
        Some(days * 86_400 + t.first()? * 3600 + t.get(1)? * 60 + t.get(2)?)
    };
    let Some(then) = parse() else { return "<unknown>".into() };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let s = now.saturating_sub(then);
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn json_response(code: StatusCode, doc: &Value) -> Response {
    (code, [("content-type", "application/json")], doc.to_string()).into_response()
}

/// A `Status` failure, as clients decode errors.
fn status_response(code: StatusCode, reason: &str, message: &str) -> Response {
    json_response(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

fn not_found(coll: &str, name: &str) -> Response {
    let plural = plural_of(coll);
    json_response(
        StatusCode::NOT_FOUND,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("{plural} \"{name}\" not found"), "reason": "NotFound",
            "details": {"name": name, "kind": plural}, "code": 404}),
    )
}

/// A strategic merge patch read as a merge patch: its `$` directives dropped (the policy
/// kinds' lists have no merge keys: a list in the patch replaces the list).
fn without_directives(patch: &Value) -> Value {
    match patch {
        Value::Object(m) => Value::Object(
            m.iter().filter(|(k, _)| !k.starts_with('$')).map(|(k, v)| (k.clone(), without_directives(v))).collect(),
        ),
        other => other.clone(),
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Now as a Kubernetes timestamp (RFC 3339, seconds).
fn k8s_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    palisade_api::flow::rfc3339(secs * 1_000_000_000).replace(".000000000Z", "Z")
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

    async fn call(api: &FakeApi, method: Method, uri: &str, ct: &str, body: &str) -> (StatusCode, Value) {
        let mut headers = HeaderMap::new();
        if !ct.is_empty() {
            headers.insert("content-type", ct.parse().unwrap());
        }
        let r = api.clone().handle(method, uri.parse().unwrap(), headers, Bytes::from(body.to_string())).await;
        let code = r.status();
        let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        (code, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    #[tokio::test]
    async fn objects_are_created_read_patched_and_deleted_as_kubectl_does() {
        let api = FakeApi::new();
        let coll = "/apis/cilium.io/v2/namespaces/shop/ciliumnetworkpolicies";
        let obj = r#"{"apiVersion":"cilium.io/v2","kind":"CiliumNetworkPolicy","metadata":{"name":"web"},"spec":{"endpointSelector":{},"ingress":[{"fromEndpoints":[{}]}]}}"#;
        let (code, body) = call(&api, Method::GET, &format!("{coll}/web"), "", "").await;
        assert_eq!((code, body["reason"].as_str()), (StatusCode::NOT_FOUND, Some("NotFound")));
        let (code, created) =
            call(&api, Method::POST, &format!("{coll}?fieldValidation=Strict"), "application/json", obj).await;
        assert_eq!(code, StatusCode::CREATED);
        assert_eq!(created["metadata"]["namespace"], "shop", "the namespace comes from the path");
        assert_eq!(created["metadata"]["generation"], 1);
        let uid = created["metadata"]["uid"].clone();
        let (code, body) = call(&api, Method::POST, coll, "application/json", obj).await;
        assert_eq!((code, body["reason"].as_str()), (StatusCode::CONFLICT, Some("AlreadyExists")));
        // A merge patch replaces the list; a strategic one loses its directives.
        let patch = r#"{"spec":{"ingress":[]},"$setElementOrder/x":[1],"metadata":{"labels":{"a":"b"}}}"#;
        let (code, patched) =
            call(&api, Method::PATCH, &format!("{coll}/web"), "application/strategic-merge-patch+json", patch).await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(patched["spec"]["ingress"], json!([]));
        assert!(patched.get("$setElementOrder/x").is_none());
        assert_eq!((patched["metadata"]["generation"].clone(), patched["metadata"]["uid"].clone()), (json!(2), uid));
        // Lists narrow by namespace, field and label selectors.
        api.upsert(json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "web", "namespace": "other"}, "spec": {}}));
        let names = async |uri: &str| -> Vec<String> {
            let (_, list) = call(&api, Method::GET, uri, "", "").await;
            list["items"].as_array().unwrap().iter().map(key_of).collect()
        };
        assert_eq!(names("/apis/cilium.io/v2/ciliumnetworkpolicies").await, ["other/web", "shop/web"]);
        assert_eq!(names(coll).await, ["shop/web"]);
        assert_eq!(names(&format!("{coll}?labelSelector=a%3Db")).await, ["shop/web"]);
        assert!(names(&format!("{coll}?labelSelector=a%3Dc")).await.is_empty());
        assert!(names("/apis/cilium.io/v2/ciliumnetworkpolicies?fieldSelector=metadata.name%3Dx").await.is_empty());
        // Delete, then it is gone; a cluster-scoped kind has no namespaced path.
        let (code, _) = call(&api, Method::DELETE, &format!("{coll}/web"), "", "").await;
        assert_eq!(code, StatusCode::OK);
        assert!(api.get("CiliumNetworkPolicy", "shop/web").is_none());
        let (code, _) =
            call(&api, Method::GET, "/apis/cilium.io/v2/namespaces/shop/ciliumclusterwidenetworkpolicies", "", "")
                .await;
        assert_eq!(code, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn discovery_and_openapi_name_every_kind() {
        let api = FakeApi::new();
        let (_, groups) = call(&api, Method::GET, "/apis", "", "").await;
        let names: Vec<&str> =
            groups["groups"].as_array().unwrap().iter().map(|g| g["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["networking.k8s.io", "cilium.io", "policy.networking.k8s.io"]);
        let (_, v1) = call(&api, Method::GET, "/api/v1", "", "").await;
        let kinds: Vec<&str> =
            v1["resources"].as_array().unwrap().iter().map(|r| r["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["Pod", "Namespace", "Node"]);
        let (_, cilium) = call(&api, Method::GET, "/apis/cilium.io/v2", "", "").await;
        let cnp = &cilium["resources"][0];
        assert_eq!((cnp["name"].as_str(), cnp["namespaced"].as_bool()), (Some("ciliumnetworkpolicies"), Some(true)));
        assert_eq!(cnp["shortNames"][0], "cnp");
        let (_, root) = call(&api, Method::GET, "/openapi/v3", "", "").await;
        let url = root["paths"]["apis/policy.networking.k8s.io/v1alpha2"]["serverRelativeURL"].as_str().unwrap();
        let (_, doc) = call(&api, Method::GET, url, "", "").await;
        let op = &doc["paths"]["/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies/{name}"]["patch"];
        assert_eq!(op["x-kubernetes-group-version-kind"]["kind"], "ClusterNetworkPolicy");
        assert_eq!(op["parameters"][0]["name"], "fieldValidation");
    }
}
