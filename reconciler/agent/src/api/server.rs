//! The local API server: HTTP/1.1 + JSON on a unix socket (mode 0600, root only). Routes
//! are listed in [`super::types`]. Handlers only translate between HTTP and actor messages.
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

use super::types::*;
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
        .route("/v1/ipcache", put(put_ipcache))
        .route("/v1/identities", get(identities))
        .route("/v1/policies", get(policies))
        .route("/v1/policies/rescan", post(rescan))
        .route("/v1/wait", get(wait))
        .route("/v1/monitor", get(monitor))
        .route("/v1/explain", post(explain))
        .with_state(agent)
}

async fn current_status(agent: &Agent) -> Result<Status, ApiFailure> {
    let revision = agent.resolver.send(CurrentRevision).await?;
    let realized = agent.map_writer.send(GetRealized).await?;
    let endpoints = agent.endpoints.send(ListEndpoints).await?;
    let identities = agent.identities.send(ListIdentities).await?;
    let policies = agent.policy_watch.send(ListPolicies).await?;
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
        map_errors: realized.map_errors.clone(),
        datapath_counters: DatapathCounters {
            drift_checks: realized.counters.drift_checks,
            drift_repairs: realized.counters.drift_repairs,
            map_overflows: realized.counters.map_overflows,
            apply_failures: realized.counters.apply_failures,
        },
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
        security_labels: ep.labels.iter().map(|l| l.to_string()).collect(),
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
    match agent.map_writer.send(WaitRealized { revision: q.revision, timeout }).await? {
        Some(_) => Ok(Json(current_status(&agent).await?)),
        None => Err(ApiFailure(
            StatusCode::REQUEST_TIMEOUT,
            format!("revision {} not realized within {} ms", q.revision, q.timeout_ms),
        )),
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
