//! `palisade ui`: a web page over the agents' local API, served by the CLI on a loopback
//! address. The page (HTML, CSS, JS, all in this binary) draws the service map from the
//! flow records, lists them with the `observe` filters, shows a pod's identity, labels,
//! policies and kernel entries, and for a drop the explanation of `policy explain`.
//!
//! The agent keeps its API on a unix socket (file permissions decide who may read it); the
//! CLI, run by whoever may read that socket, is the one that opens a TCP port, and only on
//! loopback. Requests whose `Host` is not the loopback address the page was served on are
//! refused (a page of another site cannot reach it by DNS rebinding).
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::Parser;
use palisade_api::Client;
use palisade_api::flow::{Flow, FlowsResponse, LostEvents};
use palisade_api::types::ExplainRequest;
use serde::{Deserialize, Serialize};

const INDEX_HTML: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const APP_CSS: &str = include_str!("ui/app.css");

/// The agents the page reads: one per node (their flows are merged by time).
#[derive(Clone, Debug)]
pub struct Agents {
    /// (node label, client); the label is the socket's path when the node is unnamed.
    pub agents: Vec<(String, Client)>,
}

struct Ui {
    agents: Agents,
    /// `127.0.0.1:PORT` (and `localhost:PORT`): the `Host` values accepted.
    hosts: Vec<String>,
}

/// Checks the address `palisade ui` is asked to listen on: loopback only.
pub fn check_listen(addr: SocketAddr) -> Result<SocketAddr, String> {
    if addr.ip().is_loopback() {
        Ok(addr)
    } else {
        Err(format!(
            "ui --listen {addr}: only a loopback address is allowed (e.g. 127.0.0.1:7070): the page shows \
             the cluster's flows and policies and has no login"
        ))
    }
}

/// Serves the page until the process is stopped. `ready` is called with the bound
/// address (port 0 picks a free one).
pub async fn serve(addr: SocketAddr, agents: Agents, ready: impl FnOnce(SocketAddr)) -> Result<(), String> {
    let addr = check_listen(addr)?;
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("ui: cannot listen on {addr}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| format!("ui: {e}"))?;
    let port = bound.port();
    let hosts = vec![format!("{}:{port}", bound.ip()), format!("localhost:{port}"), format!("[::1]:{port}")];
    let ui = Arc::new(Ui { agents, hosts });
    let app = Router::new()
        .route("/", get(|| async { page(INDEX_HTML, "text/html; charset=utf-8") }))
        .route("/app.js", get(|| async { page(APP_JS, "text/javascript; charset=utf-8") }))
        .route("/app.css", get(|| async { page(APP_CSS, "text/css; charset=utf-8") }))
        .route("/api/flows", get(flows))
        .route("/api/endpoints", get(endpoints))
        .route("/api/pod", get(pod))
        .route("/api/explain", post(explain))
        .layer(middleware::from_fn_with_state(ui.clone(), only_loopback_host))
        .with_state(ui);
    ready(bound);
    axum::serve(listener, app).await.map_err(|e| format!("ui: {e}"))
}

fn page(body: &'static str, content_type: &'static str) -> Response {
    let mut r = body.into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; img-src 'self' data:; style-src 'self'"),
    );
    r
}

async fn only_loopback_host(State(ui): State<Arc<Ui>>, req: Request, next: Next) -> Response {
    let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    if ui.hosts.iter().any(|h| h == host) {
        next.run(req).await
    } else {
        (StatusCode::FORBIDDEN, format!("Host {host:?} is not this page's loopback address")).into_response()
    }
}

fn fail(status: StatusCode, error: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": error.into() }))).into_response()
}

/// The `observe` flags of the page's filter box.
#[derive(Parser, Debug)]
#[command(name = "observe", no_binary_name = false, disable_help_flag = true)]
struct Filters {
    #[command(flatten)]
    args: crate::observe::ObserveArgs,
}

#[derive(Deserialize)]
struct FlowsParams {
    /// `observe` flags, space-separated (`--verdict DROPPED --not --from-pod default/a`).
    #[serde(default)]
    q: String,
}

/// The flows of the page: `observe` flags, one query to each agent, merged by time.
#[derive(Serialize, Default, Debug)]
pub struct FlowsAnswer {
    pub flows: Vec<Flow>,
    pub lost: Vec<LostEvents>,
    /// Agents that did not answer (the others' flows are still shown).
    pub errors: Vec<String>,
}

/// Parses the filter box: the flags of `palisade observe` (without `--follow`; default
/// `--last 1000`).
pub fn parse_filters(q: &str, now_unix_ns: u64) -> Result<palisade_api::flow::FlowQuery, String> {
    let mut words = vec!["observe".to_string()];
    words.extend(q.split_whitespace().map(str::to_string));
    let (kept, negated) = crate::observe::split_not(words)?;
    let f = Filters::try_parse_from(kept).map_err(|e| {
        let text = e.to_string();
        text.lines().next().unwrap_or("invalid filter").trim_start_matches("error: ").to_string()
    })?;
    if f.args.follow {
        return Err("--follow: the page follows by itself (it asks again every 2 s)".into());
    }
    let mut args = f.args;
    if args.last.is_none() && args.since.is_none() {
        args.last = Some(1000);
    }
    args.query(&negated, now_unix_ns)
}

/// Asks every agent and merges the answers by time (RFC 3339 UTC with nanoseconds sorts as
/// text). With `last`, the last N of the merge.
pub async fn merged_flows(agents: &Agents, query: &palisade_api::flow::FlowQuery) -> FlowsAnswer {
    let mut answer = FlowsAnswer::default();
    for (node, c) in &agents.agents {
        let mut one = async || -> Result<(), palisade_api::ClientError> {
            let mut stream = c.flows(query).await?;
            while let Some(r) = stream.next().await? {
                match r {
                    FlowsResponse::Flow(f) => answer.flows.push(*f),
                    FlowsResponse::LostEvents(l) => answer.lost.push(l),
                }
            }
            Ok(())
        };
        if let Err(e) = one().await {
            answer.errors.push(format!("{node}: {e}"));
        }
    }
    answer.flows.sort_by(|a, b| a.time.cmp(&b.time));
    if let Some(n) = query.last {
        let drop = answer.flows.len().saturating_sub(n);
        answer.flows.drain(..drop);
    }
    answer
}

async fn flows(State(ui): State<Arc<Ui>>, Query(p): Query<FlowsParams>) -> Response {
    let query = match parse_filters(&p.q, crate::observe::now_ns()) {
        Ok(q) => q,
        Err(e) => return fail(StatusCode::BAD_REQUEST, format!("filter {:?}: {e}", p.q)),
    };
    Json(merged_flows(&ui.agents, &query).await).into_response()
}

async fn endpoints(State(ui): State<Arc<Ui>>) -> Response {
    let mut all = Vec::new();
    let mut errors = Vec::new();
    for (node, c) in &ui.agents.agents {
        match c.endpoints().await {
            Ok(eps) => all.extend(eps.into_iter().map(|e| (node.clone(), e))),
            Err(e) => errors.push(format!("{node}: {e}")),
        }
    }
    let endpoints: Vec<serde_json::Value> = all
        .into_iter()
        .map(|(node, e)| {
            let mut v = serde_json::to_value(e).expect("serializes");
            v["node"] = node.into();
            v
        })
        .collect();
    Json(serde_json::json!({ "endpoints": endpoints, "errors": errors })).into_response()
}

#[derive(Deserialize)]
struct PodParams {
    /// `namespace/name`.
    name: String,
}

/// A pod: its endpoint (identity, labels), the policies behind its kernel entries, and the
/// entries, from the agent that has it.
async fn pod(State(ui): State<Arc<Ui>>, Query(p): Query<PodParams>) -> Response {
    let mut errors = Vec::new();
    for (node, c) in &ui.agents.agents {
        let eps = match c.endpoints().await {
            Ok(eps) => eps,
            Err(e) => {
                errors.push(format!("{node}: {e}"));
                continue;
            }
        };
        let Some(ep) = eps.into_iter().find(|e| format!("{}/{}", e.namespace, e.name) == p.name) else { continue };
        let bpf = match c.bpf_policy(&p.name).await {
            Ok(b) => b,
            Err(e) => return fail(StatusCode::BAD_GATEWAY, format!("{node}: {e}")),
        };
        let mut policies: Vec<String> = bpf
            .entries
            .iter()
            .flat_map(|e| e.policies.iter().cloned())
            .filter(|p| !p.starts_with("built-in"))
            .collect();
        policies.sort();
        policies.dedup();
        return Json(serde_json::json!({ "node": node, "endpoint": ep, "policies": policies, "bpf": bpf }))
            .into_response();
    }
    let why = if errors.is_empty() { String::new() } else { format!(" ({})", errors.join("; ")) };
    fail(StatusCode::NOT_FOUND, format!("no agent has a pod {}{why}", p.name))
}

/// `policy explain` of a flow, by the agent that has the destination pod (else the first
/// that answers).
async fn explain(State(ui): State<Arc<Ui>>, Json(req): Json<ExplainRequest>) -> Response {
    let mut last = String::from("no agent");
    for (node, c) in &ui.agents.agents {
        match c.explain(&req).await {
            Ok(e) if e.ingress.endpoint.is_some() || ui.agents.agents.len() == 1 => {
                return Json(e).into_response();
            }
            Ok(_) => last = format!("{node}: the destination is not a pod of this node"),
            Err(e) => last = format!("{node}: {e}"),
        }
    }
    // No agent has the destination: the first one's answer (its egress side).
    for (_, c) in &ui.agents.agents {
        if let Ok(e) = c.explain(&req).await {
            return Json(e).into_response();
        }
    }
    fail(StatusCode::BAD_GATEWAY, last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_the_observe_flags() {
        let q = parse_filters("--verdict dropped --not --from-pod default/other --port 9090", 0).unwrap();
        assert_eq!(q.whitelist[0].verdict, vec!["DROPPED"]);
        assert_eq!(q.whitelist[0].port, vec![9090]);
        assert_eq!(q.blacklist[0].source_pod, vec!["default/other"]);
        assert_eq!(q.last, Some(1000));
        assert!(!q.follow);
        assert_eq!(parse_filters("", 0).unwrap().last, Some(1000));
        assert_eq!(parse_filters("--last 5", 0).unwrap().last, Some(5));
        let e = parse_filters("--verdikt DROPPED", 0).unwrap_err();
        assert!(e.contains("--verdikt"), "{e}");
        assert!(parse_filters("--follow", 0).unwrap_err().contains("--follow"));
        assert!(parse_filters("--not", 0).is_err());
    }

    #[test]
    fn only_loopback_addresses() {
        assert!(check_listen("127.0.0.1:0".parse().unwrap()).is_ok());
        assert!(check_listen("[::1]:7070".parse().unwrap()).is_ok());
        let e = check_listen("0.0.0.0:7070".parse().unwrap()).unwrap_err();
        assert!(e.contains("loopback"), "{e}");
        assert!(check_listen("192.0.2.1:7070".parse().unwrap()).is_err());
    }
}
