//! The Kubernetes source: eight watchers (CNP, CCNP, NetworkPolicy, the three tier kinds
//! ClusterNetworkPolicy, AdminNetworkPolicy and BaselineAdminNetworkPolicy, Namespace, Pod)
//! feed mirrors; after every burst of events, and every `resync` interval, one reconcile pass
//! compares the desired state derived from the mirrors with what was handed to the
//! actors and sends only the differences. Watchers retry with backoff forever; while the
//! API server is unreachable the mirrors keep their content, so nothing changes in what
//! is enforced. A tier kind the API server does not serve (404: its CRD is not installed)
//! counts as listed and empty, so a cluster without the network-policy-api CRDs still
//! becomes ready; its watcher keeps retrying and picks the kind up once it is installed.
use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::{FutureExt, Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};

use super::crd::{NodePolicyStatus, TierPolicyStatus};
use super::mirror::{Mirror, plan};
use super::route;
use super::sync::{
    CCNP_KIND, CNP_KIND, RemoteSpec, TIER_KINDS, TierMirrors, current_node_status, desired_endpoints,
    desired_namespaces, desired_policies, node_status, status_differs, tier_api_version, tier_condition,
};
use crate::actors::Agent;
use crate::actors::endpoints::{DeleteEndpoint, ListEndpointSpecs, UpsertEndpoint, UpsertNamespace};
use crate::actors::identity::RemoveRemoteEndpoint;
use crate::actors::policy_watch::{ListPolicies, RemoveSource, UpsertSourceText};
use crate::api::types::{EndpointSpec, NamespaceSpec, PolicyStatus};

/// How the Kubernetes source runs.
#[derive(Clone, Debug)]
pub struct KubeOptions {
    /// This node's name (`spec.nodeName` of its pods).
    pub node_name: String,
    /// Cluster name (label `io.cilium.k8s.policy.cluster`).
    pub cluster: String,
    /// Interval of the full reconcile pass (retries, interfaces that appeared).
    pub resync: Duration,
    /// Other nodes' pods from the API become remote endpoints with node-local numbers;
    /// off in kvstore mode, where they come from etcd with the cluster's numbers (one
    /// source per address, as Cilium's ipcache takes them from the kvstore there).
    pub remote_pods: bool,
}

/// The API resource of a Cilium policy kind.
pub fn cilium_resource(kind: &str) -> ApiResource {
    let plural = if kind == CNP_KIND { "ciliumnetworkpolicies" } else { "ciliumclusterwidenetworkpolicies" };
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("cilium.io", "v2", kind), plural)
}

/// The API resource of a tier kind (`policy.networking.k8s.io`).
pub fn tier_resource(kind: &str) -> ApiResource {
    let (_, version, plural) = TIER_KINDS.iter().find(|t| t.0 == kind).copied().unwrap_or(TIER_KINDS[0]);
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("policy.networking.k8s.io", version, kind), plural)
}

enum Input {
    Cnp(Box<Event<DynamicObject>>),
    Tier(&'static str, Box<Event<DynamicObject>>),
    /// A tier kind's list answered 404: the API server does not serve it.
    TierNotServed(&'static str, String),
    Ccnp(Box<Event<DynamicObject>>),
    Knp(Box<Event<NetworkPolicy>>),
    Ns(Box<Event<Namespace>>),
    Pod(Box<Event<Pod>>),
    WatchError(&'static str, String),
    Tick,
    /// An actor restarted: hand in again what it lost, answer when done.
    Resend(crate::actors::ResendRequest),
}

fn watch<K, F>(api: Api<K>, what: &'static str, wrap: F) -> std::pin::Pin<Box<dyn Stream<Item = Input> + Send>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    F: Fn(Box<Event<K>>) -> Input + Send + 'static,
{
    // Bookmarks keep the resourceVersion fresh; a 410 Gone or a broken connection makes
    // the watcher relist (Init..InitDone), after a backoff while the server is away.
    let config = watcher::Config::default();
    Box::pin(watcher::watcher(api, config).default_backoff().map(move |r| match r {
        Ok(ev) => wrap(Box::new(ev)),
        Err(e) => Input::WatchError(what, e.to_string()),
    }))
}

/// The watch of a tier kind; a 404 (kind not served) is reported as such.
fn watch_tier(client: &Client, kind: &'static str) -> std::pin::Pin<Box<dyn Stream<Item = Input> + Send>> {
    let api = Api::<DynamicObject>::all_with(client.clone(), &tier_resource(kind));
    Box::pin(watcher::watcher(api, watcher::Config::default()).default_backoff().map(move |r| match r {
        Ok(ev) => Input::Tier(kind, Box::new(ev)),
        Err(
            watcher::Error::InitialListFailed(kube::Error::Api(e))
            | watcher::Error::WatchStartFailed(kube::Error::Api(e)),
        ) if e.code == 404 => Input::TierNotServed(kind, e.message.clone()),
        Err(e) => Input::WatchError(kind, e.to_string()),
    }))
}

/// Mirrors of the API and what was handed to the actors.
pub struct KubeSync {
    opts: KubeOptions,
    cnp: Mirror<DynamicObject>,
    ccnp: Mirror<DynamicObject>,
    knp: Mirror<NetworkPolicy>,
    tiers: TierMirrors,
    namespaces: Mirror<Namespace>,
    pods: Mirror<Pod>,
    applied_policies: BTreeMap<String, String>,
    applied_namespaces: BTreeMap<String, BTreeMap<String, String>>,
    applied_local: BTreeMap<(String, String), EndpointSpec>,
    applied_remote: BTreeMap<String, RemoteSpec>,
    written_status: BTreeMap<String, NodePolicyStatus>,
    /// Tier policies: status/reason/message of the condition last written, by source.
    written_tier_status: BTreeMap<String, String>,
}

impl KubeSync {
    /// True once every watched kind was listed completely.
    pub fn all_listed(&self) -> bool {
        self.cnp.synced()
            && self.ccnp.synced()
            && self.knp.synced()
            && self.tiers.values().all(Mirror::synced)
            && self.namespaces.synced()
            && self.pods.synced()
    }

    pub fn new(opts: KubeOptions) -> Self {
        KubeSync {
            opts,
            cnp: Mirror::default(),
            ccnp: Mirror::default(),
            knp: Mirror::default(),
            tiers: TIER_KINDS.iter().map(|t| (t.0, Mirror::default())).collect(),
            namespaces: Mirror::default(),
            pods: Mirror::default(),
            applied_policies: BTreeMap::new(),
            applied_namespaces: BTreeMap::new(),
            applied_local: BTreeMap::new(),
            applied_remote: BTreeMap::new(),
            written_status: BTreeMap::new(),
            written_tier_status: BTreeMap::new(),
        }
    }

    /// Applies one input to the mirrors; true when a reconcile pass is due. Resend requests
    /// are answered after the pass, through `answers`.
    fn absorb(&mut self, input: Input, answers: &mut Vec<tokio::sync::oneshot::Sender<()>>) -> bool {
        match input {
            Input::Resend(req) => {
                if req.forgotten.policies {
                    self.applied_policies.clear();
                }
                if req.forgotten.remote_endpoints {
                    self.applied_remote.clear();
                }
                answers.push(req.done);
                true
            }
            Input::Cnp(e) => self.cnp.apply(*e),
            Input::Ccnp(e) => self.ccnp.apply(*e),
            Input::Knp(e) => self.knp.apply(*e),
            Input::Tier(kind, e) => self.tiers.get_mut(kind).is_some_and(|m| m.apply(*e)),
            Input::TierNotServed(kind, e) => {
                let Some(m) = self.tiers.get_mut(kind) else { return false };
                if !m.synced() || !m.is_empty() {
                    tracing::warn!(
                        resource = kind,
                        error = %e,
                        "the API server does not serve this kind (is the network-policy-api CRD installed?); \
                         treating it as empty and retrying with backoff"
                    );
                }
                m.not_served()
            }
            Input::Ns(e) => self.namespaces.apply(*e),
            Input::Pod(e) => self.pods.apply(*e),
            Input::WatchError(what, e) => {
                tracing::warn!(resource = what, error = %e, "watch failed; retrying with backoff, enforcement unchanged");
                false
            }
            Input::Tick => true,
        }
    }

    /// One reconcile pass.
    async fn reconcile(&mut self, agent: &Agent, client: &Client) {
        self.sync_policies(agent).await;
        self.write_statuses(agent, client).await;
        if self.namespaces.synced() {
            self.sync_namespaces(agent).await;
            if self.pods.synced() {
                self.sync_endpoints(agent).await;
            }
        }
    }

    async fn sync_policies(&mut self, agent: &Agent) {
        let desired = desired_policies(&self.cnp, &self.ccnp, &self.knp, &self.tiers);
        let p = plan(&self.applied_policies, &desired);
        for (source, text) in p.upserts {
            match agent.policy_watch.send(UpsertSourceText { source: source.clone(), text: text.clone() }).await {
                Ok(applied) => {
                    tracing::info!(%source, revision = applied.revision, "policy from the API applied");
                    self.applied_policies.insert(source, text);
                }
                Err(e) => tracing::error!(%source, error = %e, "handing a policy to the policy watch failed"),
            }
        }
        for source in p.removes {
            match agent.policy_watch.send(RemoveSource { source: source.clone() }).await {
                Ok(revision) => {
                    tracing::info!(%source, revision, "policy deleted in the API removed");
                    self.applied_policies.remove(&source);
                    self.written_status.remove(&source);
                    self.written_tier_status.remove(&source);
                }
                Err(e) => tracing::error!(%source, error = %e, "removing a policy failed"),
            }
        }
    }

    async fn write_statuses(&mut self, agent: &Agent, client: &Client) {
        let Ok(all) = agent.policy_watch.send(ListPolicies).await else { return };
        let mut by_source: BTreeMap<String, Vec<PolicyStatus>> = BTreeMap::new();
        for s in all {
            by_source.entry(s.source.clone()).or_default().push(s);
        }
        let node = self.opts.node_name.clone();
        let objects: Vec<(&'static str, DynamicObject)> = self
            .cnp
            .objects()
            .map(|o| (CNP_KIND, o.clone()))
            .chain(self.ccnp.objects().map(|o| (CCNP_KIND, o.clone())))
            .collect();
        for (kind, obj) in objects {
            let ns = obj.namespace();
            let source = super::translate::policy_source(kind, ns.as_deref(), &obj.name_any());
            let Some(statuses) = by_source.get(&source) else { continue };
            let want = node_status(statuses);
            let have = current_node_status(&obj, &node);
            if !status_differs(have.as_ref(), &want) || self.written_status.get(&source) == Some(&want) {
                continue;
            }
            match patch_policy_status(client, kind, ns.as_deref(), &obj.name_any(), &node, &want).await {
                Ok(()) => {
                    self.written_status.insert(source, want);
                }
                Err(e) => tracing::warn!(%source, error = %e, "writing the policy status failed; will retry"),
            }
        }
        self.write_tier_statuses(&by_source, client).await;
    }

    /// This node's condition on each tier policy (server-side apply of one entry of
    /// `status.conditions`, owned by this node's field manager).
    async fn write_tier_statuses(&mut self, by_source: &BTreeMap<String, Vec<PolicyStatus>>, client: &Client) {
        let node = self.opts.node_name.clone();
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
        let objects: Vec<(&'static str, DynamicObject)> =
            self.tiers.iter().flat_map(|(kind, m)| m.objects().map(|o| (*kind, o.clone()))).collect();
        for (kind, obj) in objects {
            let name = obj.name_any();
            let source = super::translate::policy_source(kind, None, &name);
            let Some(statuses) = by_source.get(&source) else { continue };
            let Some(condition) = tier_condition(&obj, &node, statuses, &now) else { continue };
            let key = format!("{}/{}/{}", condition.status, condition.reason, condition.message);
            if self.written_tier_status.get(&source) == Some(&key) {
                continue;
            }
            match apply_tier_condition(client, kind, &name, &node, condition).await {
                Ok(()) => {
                    self.written_tier_status.insert(source, key);
                }
                Err(e) => tracing::warn!(%source, error = %e, "writing the policy status failed; will retry"),
            }
        }
    }

    async fn sync_namespaces(&mut self, agent: &Agent) {
        let desired = desired_namespaces(&self.namespaces);
        let p = plan(&self.applied_namespaces, &desired);
        for (name, labels) in p.upserts {
            let msg = UpsertNamespace { name: name.clone(), spec: NamespaceSpec { labels: labels.clone() } };
            match agent.endpoints.send(msg).await {
                Ok(Ok(_)) => {
                    self.applied_namespaces.insert(name, labels);
                }
                Ok(Err(e)) => tracing::warn!(namespace = %name, error = %e, "namespace not applied; will retry"),
                Err(e) => tracing::error!(namespace = %name, error = %e, "endpoint tracker unavailable"),
            }
        }
        for name in p.removes {
            self.applied_namespaces.remove(&name);
        }
    }

    async fn sync_endpoints(&mut self, agent: &Agent) {
        // What the tracker holds now (a CNI registration may have replaced a spec).
        let held = agent.endpoints.send(ListEndpointSpecs).await.unwrap_or_default();
        for (key, spec) in &mut self.applied_local {
            match held.get(key) {
                Some(h) => *spec = h.clone(),
                None => spec.interface.clear(),
            }
        }
        let routes = route::read_routes();
        let desired =
            desired_endpoints(&self.pods, &self.applied_namespaces, &self.opts.node_name, &self.opts.cluster, |info| {
                let by_route = info.ips().into_iter().find_map(|ip| route::interface_for(&routes, ip));
                // Registered by the CNI plugin with the same addresses.
                let by_cni = held
                    .get(&(info.namespace.clone(), info.name.clone()))
                    .filter(|s| s.ipv4 == info.ipv4 && s.ipv6 == info.ipv6)
                    .map(|s| s.interface.clone());
                by_route.or(by_cni)
            });
        if !desired.waiting.is_empty() {
            tracing::debug!(pods = ?desired.waiting, "local pods whose interface is not known yet");
        }
        let p = plan(&self.applied_local, &desired.local);
        for ((namespace, name), spec) in p.upserts {
            let msg = UpsertEndpoint { namespace: namespace.clone(), name: name.clone(), spec: spec.clone() };
            match agent.endpoints.send(msg).await {
                Ok(Ok(_)) => {
                    self.applied_local.insert((namespace, name), spec);
                }
                Ok(Err(e)) => {
                    tracing::warn!(pod = %format!("{namespace}/{name}"), error = %e, "endpoint not applied; will retry");
                }
                Err(e) => tracing::error!(error = %e, "endpoint tracker unavailable"),
            }
        }
        for (namespace, name) in p.removes {
            let msg = DeleteEndpoint { namespace: namespace.clone(), name: name.clone() };
            match agent.endpoints.send(msg).await {
                Ok(_) => {
                    self.applied_local.remove(&(namespace, name));
                }
                Err(e) => tracing::error!(error = %e, "endpoint tracker unavailable"),
            }
        }
        let remote = if self.opts.remote_pods { desired.remote } else { BTreeMap::new() };
        let p = plan(&self.applied_remote, &remote);
        for (key, spec) in p.upserts {
            if agent.identities.send(spec.upsert(&key, None)).await.is_ok() {
                self.applied_remote.insert(key, spec);
            }
        }
        for key in p.removes {
            if agent.identities.send(RemoveRemoteEndpoint { key: key.clone() }).await.is_ok() {
                self.applied_remote.remove(&key);
            }
        }
    }
}

/// Writes this node's entry of a CNP's or CCNP's `status.nodes` (merge patch of the status
/// subresource; other nodes' entries are left alone).
pub async fn patch_policy_status(
    client: &Client,
    kind: &str,
    namespace: Option<&str>,
    name: &str,
    node: &str,
    status: &NodePolicyStatus,
) -> Result<(), kube::Error> {
    let ar = cilium_resource(kind);
    let api: Api<DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    let patch = serde_json::json!({ "status": { "nodes": { node: status } } });
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

/// Sets this node's condition on a tier policy's status by server-side apply with the
/// field manager `palisade-agent-<node>`: `conditions` is a list map keyed by `type`, so
/// every node owns its own entry and no node overwrites another's.
pub async fn apply_tier_condition(
    client: &Client,
    kind: &str,
    name: &str,
    node: &str,
    condition: k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition,
) -> Result<(), kube::Error> {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &tier_resource(kind));
    let patch = serde_json::json!({
        "apiVersion": tier_api_version(kind),
        "kind": kind,
        "metadata": { "name": name },
        "status": TierPolicyStatus { conditions: vec![condition] },
    });
    let params = PatchParams::apply(&format!("palisade-agent-{node}")).force();
    api.patch_status(name, &params, &Patch::Apply(&patch)).await?;
    Ok(())
}

/// Runs the Kubernetes source until the agent stops. Never returns on API errors: the
/// watchers retry with backoff, and enforcement stays as it was meanwhile.
pub async fn run(agent: Agent, client: Client, opts: KubeOptions) {
    tracing::info!(node = %opts.node_name, "Kubernetes mode: watching policies, namespaces and pods");
    let resync = opts.resync;
    let cnp = Api::<DynamicObject>::all_with(client.clone(), &cilium_resource(CNP_KIND));
    let ccnp = Api::<DynamicObject>::all_with(client.clone(), &cilium_resource(CCNP_KIND));
    let ticks = futures_util::stream::unfold((), move |()| async move {
        tokio::time::sleep(resync).await;
        Some((Input::Tick, ()))
    });
    let resends = futures_util::stream::unfold(agent.external.register(), |mut rx| async move {
        let req = rx.recv().await?;
        Some((Input::Resend(req), rx))
    });
    let mut inputs = futures_util::stream::select_all(vec![
        watch(cnp, CNP_KIND, Input::Cnp),
        watch(ccnp, CCNP_KIND, Input::Ccnp),
        watch(Api::<NetworkPolicy>::all(client.clone()), "NetworkPolicy", Input::Knp),
        watch_tier(&client, TIER_KINDS[0].0),
        watch_tier(&client, TIER_KINDS[1].0),
        watch_tier(&client, TIER_KINDS[2].0),
        watch(Api::<Namespace>::all(client.clone()), "Namespace", Input::Ns),
        watch(Api::<Pod>::all(client.clone()), "Pod", Input::Pod),
        Box::pin(ticks),
        Box::pin(resends),
    ]);
    let mut sync = KubeSync::new(opts);
    // Nothing is applied before every list was seen once (see `Agent::resync`).
    let mut synced = false;
    while let Some(input) = inputs.next().await {
        let mut answers = Vec::new();
        let mut due = sync.absorb(input, &mut answers);
        // Take the whole burst before reconciling once.
        while let Some(Some(more)) = inputs.next().now_or_never() {
            due |= sync.absorb(more, &mut answers);
        }
        if due {
            sync.reconcile(&agent, &client).await;
            for done in answers {
                let _ = done.send(());
            }
            if !synced && sync.all_listed() {
                synced = true;
                agent.external.mark_listed();
                match agent.resync_local().await {
                    Ok(revision) => {
                        tracing::info!(revision, "Kubernetes source synced; applying");
                        // Readiness hook (ops): every list complete and handed to the actors once.
                        crate::metrics::readiness().source_synced(crate::metrics::SOURCE_KUBERNETES, revision);
                    }
                    Err(e) => tracing::error!(error = %e, "resync after the Kubernetes lists failed"),
                }
            }
        }
    }
}
