//! The local API server: HTTP/1.1 + JSON on a unix socket (mode 0600, root only). Routes
//! are listed in [`super::types`]. Handlers only translate between HTTP and actor messages.
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::net::UnixListener;

use super::types::{
    Ack, ApiError, BpfPolicy, BpfPolicyEntry, DatapathCounters, EndpointSpec, EndpointStatus, ExplainRequest,
    Explanation, IdentityInfo, IpcacheEntry, IpcacheEntrySpec, NamespaceSpec, PolicyStatus, Status,
};
use crate::actors::Agent;
use crate::actors::endpoints::{DeleteEndpoint, ListEndpoints, UpsertEndpoint, UpsertNamespace};
use crate::actors::identity::{ListIdentities, UpsertReservedPrefix};
use crate::actors::map_writer::{GetRealized, WaitRealized};
use crate::actors::policy_watch::{ListPolicies, Rescan};
use crate::actors::resolver::{CurrentRevision, Explain};
use crate::endpoint::LocalEndpoint;
use crate::error::AgentError;

/// An error answer.
struct ApiFailure(StatusCode, String);

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        (self.0, Json(ApiError { error: self.1 })).into_response()
    }
}

impl From<AgentError> for ApiFailure {
    fn from(e: AgentError) -> Self {
        let code = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        ApiFailure(code, e.to_string())
    }
}

impl From<actix::MailboxError> for ApiFailure {
    fn from(e: actix::MailboxError) -> Self {
        AgentError::from(e).into()
    }
}

type ApiResult<T> = Result<Json<T>, ApiFailure>;

/// Binds the socket (replacing a stale one) and serves until the task is dropped.
pub async fn serve(agent: Agent, socket: &Path) -> std::io::Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(socket)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    tracing::info!(socket = %socket.display(), "local API listening");
    axum::serve(listener, router(agent)).await
}

/// The API's routes.
pub fn router(agent: Agent) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/namespaces/{name}", put(put_namespace))
        .route("/v1/endpoints", get(list_endpoints))
        .route("/v1/endpoints/{namespace}/{name}", put(put_endpoint).delete(delete_endpoint))
        .route("/v1/ipcache", put(put_ipcache).get(list_ipcache))
        .route("/v1/bpf/policy", get(bpf_policy))
        .route("/v1/identities", get(identities))
        .route("/v1/policies", get(policies))
        .route("/v1/policies/rescan", post(rescan))
        .route("/v1/wait", get(wait))
        .route("/v1/monitor", get(monitor))
        .route("/v1/flows", post(flows))
        .route("/v1/explain", post(explain))
        .route("/v1/debug/panic/{actor}", post(debug_panic))
        .with_state(agent)
}

async fn current_status(agent: &Agent) -> Result<Status, ApiFailure> {
    let revision = agent.resolver.send(CurrentRevision).await?;
    let realized = agent.map_writer.send(GetRealized).await?;
    let endpoints = agent.endpoints.send(ListEndpoints).await?;
    let identities = agent.identities.send(ListIdentities).await?;
    let policies = agent.policy_watch.send(ListPolicies).await?;
    let times = crate::revisions::times();
    let mut warnings = realized.warnings.clone();
    for p in &policies {
        for w in &p.warnings {
            warnings.push(format!("{} {}: {w}", p.kind, p.name));
        }
    }
    Ok(Status {
        revision,
        realized_revision: realized.revision,
        endpoints: endpoints.len(),
        identities: identities.len(),
        policies: policies.iter().filter(|p| p.enforced).count(),
        rejected_policies: policies.iter().filter(|p| !p.enforced).count(),
        attach_mode: realized.attach_mode,
        bpffs: agent.config.bpffs.display().to_string(),
        warnings,
        revision_accepted_unix_ms: times.accepted_unix_ms,
        realized_revision_accepted_unix_ms: times.realized_accepted_unix_ms,
        realized_revision_unix_ms: times.realized_unix_ms,
        map_errors: realized.map_errors.clone(),
        datapath_counters: DatapathCounters {
            drift_checks: realized.counters.drift_checks,
            drift_repairs: realized.counters.drift_repairs,
            map_overflows: realized.counters.map_overflows,
            apply_failures: realized.counters.apply_failures,
        },
        kvstore: agent.kvstore.get().map(|(kv, opts)| kv.status(opts)),
    })
}

async fn status(State(agent): State<Agent>) -> ApiResult<Status> {
    Ok(Json(current_status(&agent).await?))
}

async fn put_namespace(
    State(agent): State<Agent>,
    UrlPath(name): UrlPath<String>,
    Json(spec): Json<NamespaceSpec>,
) -> ApiResult<Ack> {
    let revision = agent.endpoints.send(UpsertNamespace { name, spec }).await??;
    Ok(Json(Ack { revision }))
}

fn endpoint_status(ep: &LocalEndpoint, realized: &crate::actors::map_writer::RealizedState) -> EndpointStatus {
    let r = realized.endpoints.get(&ep.id).cloned().unwrap_or_default();
    EndpointStatus {
        id: ep.id,
        namespace: ep.namespace.clone(),
        name: ep.name.clone(),
        identity: ep.identity,
        security_labels: ep.labels.iter().map(std::string::ToString::to_string).collect(),
        ipv4: ep.ipv4,
        ipv6: ep.ipv6,
        interface: ep.interface.clone(),
        ifindex: ep.ifindex,
        ingress_enforced: r.ingress_enforced,
        egress_enforced: r.egress_enforced,
        realized_revision: r.realized_revision,
        policy_entries: r.policy_entries,
        fail_closed: r.fail_closed,
    }
}

async fn put_endpoint(
    State(agent): State<Agent>,
    UrlPath((namespace, name)): UrlPath<(String, String)>,
    Json(spec): Json<EndpointSpec>,
) -> ApiResult<EndpointStatus> {
    let (ep, _revision) = agent.endpoints.send(UpsertEndpoint { namespace, name, spec }).await??;
    let realized = agent.map_writer.send(GetRealized).await?;
    Ok(Json(endpoint_status(&ep, &realized)))
}

async fn delete_endpoint(
    State(agent): State<Agent>,
    UrlPath((namespace, name)): UrlPath<(String, String)>,
) -> ApiResult<Ack> {
    let revision = agent.endpoints.send(DeleteEndpoint { namespace, name }).await??;
    Ok(Json(Ack { revision }))
}

async fn list_endpoints(State(agent): State<Agent>) -> ApiResult<Vec<EndpointStatus>> {
    let eps = agent.endpoints.send(ListEndpoints).await?;
    let realized = agent.map_writer.send(GetRealized).await?;
    Ok(Json(eps.iter().map(|e| endpoint_status(e, &realized)).collect()))
}

async fn put_ipcache(State(agent): State<Agent>, Json(spec): Json<IpcacheEntrySpec>) -> ApiResult<Ack> {
    agent.identities.send(UpsertReservedPrefix { cidr: spec.cidr, entity: spec.entity }).await??;
    // The identity cache pushed the change to the resolver before answering.
    let revision = agent.resolver.send(CurrentRevision).await?;
    Ok(Json(Ack { revision }))
}

async fn identities(State(agent): State<Agent>) -> ApiResult<Vec<IdentityInfo>> {
    Ok(Json(agent.identities.send(ListIdentities).await?))
}

async fn policies(State(agent): State<Agent>) -> ApiResult<Vec<PolicyStatus>> {
    Ok(Json(agent.policy_watch.send(ListPolicies).await?))
}

async fn rescan(State(agent): State<Agent>) -> ApiResult<Ack> {
    let revision = agent.policy_watch.send(Rescan).await?;
    Ok(Json(Ack { revision }))
}

#[derive(Deserialize)]
struct WaitQuery {
    revision: u64,
    #[serde(default = "default_wait_ms")]
    timeout_ms: u64,
}

fn default_wait_ms() -> u64 {
    10_000
}

async fn wait(State(agent): State<Agent>, Query(q): Query<WaitQuery>) -> Result<Json<Status>, ApiFailure> {
    let timeout = Duration::from_millis(q.timeout_ms.min(600_000));
    // Revision 1 at least: nothing is realized before the sources synced (the first apply),
    // so a wait never answers for a starting agent that has applied nothing yet.
    let revision = q.revision.max(1);
    match agent.map_writer.send(WaitRealized { revision, timeout }).await? {
        Some(_) => Ok(Json(current_status(&agent).await?)),
        None => Err(ApiFailure(
            StatusCode::REQUEST_TIMEOUT,
            format!("revision {} not realized within {} ms", q.revision, q.timeout_ms),
        )),
    }
}

/// Fault injection (only with `--fault-injection`): the named actor panics; answers once
/// the supervisor restarted it and a resync went through.
async fn debug_panic(State(agent): State<Agent>, UrlPath(actor): UrlPath<String>) -> ApiResult<Ack> {
    use crate::actors::supervise::{InjectPanic, resyncs};
    if !agent.config.fault_injection {
        return Err(ApiFailure(
            StatusCode::NOT_FOUND,
            "fault injection is off (start the agent with --fault-injection)".into(),
        ));
    }
    let key: &'static str = match actor.as_str() {
        "policy_watch" => "policy_watch",
        "endpoint_tracker" => "endpoint_tracker",
        "identity_cache" => "identity_cache",
        "resolver" => "resolver",
        "map_writer" => "map_writer",
        other => return Err(ApiFailure(StatusCode::BAD_REQUEST, format!("no actor named {other:?}"))),
    };
    let before = resyncs().get(key).map_or(0, |r| r.0);
    // The handler panics, so no answer comes back: the send fails, as expected.
    let _ = match key {
        "policy_watch" => agent.policy_watch.send(InjectPanic).await,
        "endpoint_tracker" => agent.endpoints.send(InjectPanic).await,
        "identity_cache" => agent.identities.send(InjectPanic).await,
        "resolver" => agent.resolver.send(InjectPanic).await,
        _ => agent.map_writer.send(InjectPanic).await,
    };
    // The supervisor restarts the actor and resyncs every source; answer with that revision.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match resyncs().get(key) {
            Some((n, revision)) if *n > before => return Ok(Json(Ack { revision: *revision })),
            _ if tokio::time::Instant::now() >= deadline => {
                return Err(ApiFailure(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("{key} was not restarted and resynced within 30 s"),
                ));
            }
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn explain(State(agent): State<Agent>, Json(request): Json<ExplainRequest>) -> ApiResult<Explanation> {
    let cluster = agent.config.cluster.clone();
    match agent.resolver.send(Explain { request, cluster }).await? {
        Ok(mut e) => {
            // Sides that fail closed (maps too small) deny whatever the policy says.
            let realized = agent.map_writer.send(GetRealized).await?;
            if realized.endpoints.values().any(|r| !r.fail_closed.is_empty()) {
                let eps = agent.endpoints.send(ListEndpoints).await?;
                let ids = eps.iter().map(|ep| (ep.full_name(), ep.id)).collect();
                crate::actors::map_writer::explain_fail_closed(&mut e, &realized, &ids);
            }
            Ok(Json(e))
        }
        Err(msg) => Err(ApiFailure(StatusCode::BAD_REQUEST, msg)),
    }
}

async fn monitor(State(agent): State<Agent>) -> Response {
    let rx = agent.events.subscribe();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(ev) => {
                    let mut line = serde_json::to_vec(&ev).unwrap_or_default();
                    line.push(b'\n');
                    return Some((Ok::<_, Infallible>(Bytes::from(line)), rx));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(lost = n, "a monitor client is too slow; events were skipped");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    // A first empty line tells the client the stream is open.
    let stream = futures_util::stream::once(async { Ok(Bytes::from_static(b"\n")) }).chain(stream);
    ([(axum::http::header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(stream)).into_response()
}

/// `POST /v1/flows`: the flow buffer's matching flows, one [`FlowsResponse`] per line,
/// then with `follow` new ones as they come.
///
/// [`FlowsResponse`]: palisade_api::flow::FlowsResponse
async fn flows(State(agent): State<Agent>, Json(query): Json<palisade_api::flow::FlowQuery>) -> Response {
    use palisade_api::flow::{FlowsResponse, LostEvents};
    if let Err(e) = query.validate() {
        return ApiFailure(StatusCode::BAD_REQUEST, e).into_response();
    }
    let line = |r: &FlowsResponse| {
        let mut l = serde_json::to_vec(r).unwrap_or_default();
        l.push(b'\n');
        Ok::<_, Infallible>(Bytes::from(l))
    };
    agent.flows.flush().await;
    let (now, rx, next_seq) = agent.flows.query(&query);
    let head = futures_util::stream::iter(now.iter().map(line).collect::<Vec<_>>());
    let Some(rx) = rx else {
        return ([(axum::http::header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(head)).into_response();
    };
    let live = futures_util::stream::unfold((rx, query), move |(mut rx, query)| async move {
        loop {
            match rx.recv().await {
                // Already sent from the buffer.
                Ok(s) if s.seq < next_seq => {}
                Ok(s) if query.matches(&s.flow, s.unix_ns) => {
                    let r = FlowsResponse::Flow(Box::new(s.flow.clone()));
                    return Some((line(&r), (rx, query)));
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    crate::metrics::global().flows_lost("slow-reader", n);
                    let r = FlowsResponse::LostEvents(LostEvents { source: "SLOW_READER".into(), num_events_lost: n });
                    return Some((line(&r), (rx, query)));
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    ([(axum::http::header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(head.chain(live))).into_response()
}

/// Labels of every identity the agent knows, and of the CIDR identities the kernel's
/// ipcache holds (`cidr:<prefix>`, `reserved:world`...: derived from their prefix).
fn identity_labels(ids: &[IdentityInfo], ipcache: &[super::kernel::IpcacheRow]) -> BTreeMap<u32, Vec<String>> {
    let mut out: BTreeMap<u32, Vec<String>> = ids.iter().map(|i| (i.id, i.labels.clone())).collect();
    for row in ipcache {
        if row.identity & palisade_common::identity::LOCAL_SCOPE != 0
            && !out.contains_key(&row.identity)
            && let Some(p) = palisade_policy::Prefix::new(row.addr, row.prefix_len)
        {
            let labels = palisade_policy::cidr::cidr_labels(&p).iter().map(std::string::ToString::to_string).collect();
            out.insert(row.identity, labels);
        }
    }
    out
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, super::kernel::KernelReadError> + Send + 'static,
) -> Result<T, ApiFailure> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(ApiFailure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
        Err(e) => Err(ApiFailure(StatusCode::INTERNAL_SERVER_ERROR, format!("reading the kernel maps: {e}"))),
    }
}

async fn list_ipcache(State(agent): State<Agent>) -> ApiResult<Vec<IpcacheEntry>> {
    let dir = agent.config.bpffs.clone();
    let rows = blocking(move || super::kernel::ipcache(&dir)).await?;
    let ids = agent.identities.send(ListIdentities).await?;
    let eps = agent.endpoints.send(ListEndpoints).await?;
    let labels = identity_labels(&ids, &rows);
    let owner = |addr: std::net::IpAddr, len: u8| {
        eps.iter()
            .find(|e| {
                (len == 32 && e.ipv4.map(std::net::IpAddr::V4) == Some(addr))
                    || (len == 128 && e.ipv6.map(std::net::IpAddr::V6) == Some(addr))
            })
            .map(LocalEndpoint::full_name)
    };
    Ok(Json(
        rows.iter()
            .map(|r| IpcacheEntry {
                prefix: format!("{}/{}", r.addr, r.prefix_len),
                identity: r.identity,
                labels: labels.get(&r.identity).cloned().unwrap_or_default(),
                endpoint: owner(r.addr, r.prefix_len),
            })
            .collect(),
    ))
}

#[derive(Deserialize)]
struct BpfPolicyQuery {
    endpoint: String,
}

/// The L4 part of a POLICY key in words: (protocol, port).
fn describe_l4(key: &palisade_common::PolicyKey) -> (String, String) {
    use palisade_common::{POLICY_PREFIX_FIXED, POLICY_PREFIX_PROTO};
    let len = u32::from(key.prefix_len);
    if len <= POLICY_PREFIX_FIXED {
        return ("ANY".into(), "any".into());
    }
    let proto = crate::monitor::protocol_name(key.protocol);
    let port = match len.saturating_sub(POLICY_PREFIX_PROTO) {
        0 => "any".to_string(),
        bits if bits >= 16 => key.dport().to_string(),
        bits => {
            let lo = key.dport();
            format!("{lo}-{}", lo | (u16::MAX >> bits))
        }
    };
    (proto, port)
}

async fn bpf_policy(State(agent): State<Agent>, Query(q): Query<BpfPolicyQuery>) -> ApiResult<BpfPolicy> {
    let eps = agent.endpoints.send(ListEndpoints).await?;
    let ep = eps.iter().find(|e| e.full_name() == q.endpoint || e.id.to_string() == q.endpoint).cloned().ok_or_else(
        || {
            ApiFailure(
                StatusCode::NOT_FOUND,
                format!("no endpoint {} on this node (see `palisade endpoint list`)", q.endpoint),
            )
        },
    )?;
    let dir = agent.config.bpffs.clone();
    let id = ep.id;
    let (loaded, rows, ipcache) = blocking(move || {
        Ok((super::kernel::endpoint(&dir, id)?, super::kernel::policy_of(&dir, id)?, super::kernel::ipcache(&dir)?))
    })
    .await?;
    let ids = agent.identities.send(ListIdentities).await?;
    let labels = identity_labels(&ids, &ipcache);
    let ctx = agent.decode.read().map(|c| c.clone()).unwrap_or_default();
    let entries = rows
        .iter()
        .map(|r| {
            let identity = r.key.identity();
            let (protocol, port) = describe_l4(&r.key);
            let builtin = crate::monitor::BuiltinKey {
                direction: r.key.direction,
                identity,
                any_protocol: u32::from(r.key.prefix_len) <= palisade_common::POLICY_PREFIX_FIXED,
            };
            let policies = ctx
                .attribution(r.value.cookie, builtin)
                .unwrap_or_else(|| vec![format!("unknown cookie {} (not written by this agent)", r.value.cookie)]);
            BpfPolicyEntry {
                direction: if r.key.direction == palisade_common::direction::INGRESS { "ingress" } else { "egress" }
                    .into(),
                identity,
                labels: if identity == 0 {
                    vec!["any".into()]
                } else {
                    labels.get(&identity).cloned().unwrap_or_default()
                },
                protocol,
                port,
                action: if r.value.flags & palisade_common::policy_flags::DENY != 0 { "deny" } else { "allow" }.into(),
                prefix_len: r.key.prefix_len,
                cookie: r.value.cookie,
                policies,
                rules: ctx.rules.get(&r.value.cookie).cloned().unwrap_or_default(),
                probed: r.probed,
                audit_view: r.key.view == palisade_common::policy_view::AUDIT,
            }
        })
        .collect();
    let flags = loaded.map_or(0, |(_, info)| info.flags);
    Ok(Json(BpfPolicy {
        endpoint: ep.full_name(),
        endpoint_id: ep.id,
        identity: loaded.map_or(ep.identity, |(_, info)| info.identity),
        ifindex: loaded.map_or(0, |(ifindex, _)| ifindex),
        ingress_enforced: flags & palisade_common::endpoint_flags::INGRESS_ENFORCED != 0,
        egress_enforced: flags & palisade_common::endpoint_flags::EGRESS_ENFORCED != 0,
        entries,
    }))
}

#[cfg(test)]
mod tests {
    use palisade_common::{PolicyKey, proto};

    #[test]
    fn policy_keys_read_back_as_protocol_and_port() {
        let l4 = |prefix: u32, protocol: u8, port: u16| {
            let (p, q) = super::describe_l4(&PolicyKey::new(3, 0, 256, protocol, port).at_prefix(prefix));
            format!("{p}/{q}")
        };
        assert_eq!(l4(64, 0, 0), "ANY/any");
        assert_eq!(l4(72, proto::UDP, 0), "UDP/any");
        assert_eq!(l4(88, proto::TCP, 8080), "TCP/8080");
        assert_eq!(l4(86, proto::TCP, 8000), "TCP/8000-8003");
        assert_eq!(l4(88, proto::ICMP, 8), "ICMP/8");
    }
}
