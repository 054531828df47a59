//! The smallest workaround for testcontainers' fixed Docker API version (see the crate
//! documentation): a proxy on a unix socket that forwards every request to the engine's
//! socket with the version in its path (`/v1.53/containers/create`) set to the one the
//! engine speaks (`/v1.41/containers/create`). Bodies, headers and streamed answers (logs
//! followed) pass unchanged.
use std::path::PathBuf;

use hyper::body::Incoming;
use hyper::server::conn::http1 as server;
use hyper::service::service_fn;
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};

/// `/v1.53/x?y` -> `/v{version}/x?y`; other paths unchanged.
fn with_version(uri: &Uri, version: &str) -> Uri {
    let pq = uri.path_and_query().map_or("/", |p| p.as_str());
    let rewritten = match pq.strip_prefix("/v").and_then(|rest| rest.split_once('/')) {
        Some((v, rest)) if v.split('.').all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) => {
            format!("/v{version}/{rest}")
        }
        _ => pq.to_string(),
    };
    rewritten.parse().unwrap_or_else(|_| uri.clone())
}

async fn forward(
    mut req: Request<Incoming>,
    engine: PathBuf,
    version: String,
) -> Result<hyper::Response<Incoming>, std::io::Error> {
    *req.uri_mut() = with_version(req.uri(), &version);
    let stream = UnixStream::connect(&engine).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.send_request(req).await.map_err(std::io::Error::other)
}

/// Serves the proxy on `listener` until the process ends: every request goes to the engine
/// at `engine` (its socket path) at API `version` (`1.41`).
pub async fn serve_api_version_proxy(listener: UnixListener, engine: PathBuf, version: String) {
    while let Ok((stream, _)) = listener.accept().await {
        let (engine, version) = (engine.clone(), version.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| forward(req, engine.clone(), version.clone()));
            let _ = server::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_version_of_the_path_changes() {
        let u = |s: &str| with_version(&s.parse().unwrap(), "1.41").to_string();
        assert_eq!(u("/v1.53/containers/create?name=x"), "/v1.41/containers/create?name=x");
        assert_eq!(
            u("/v1.53/containers/abc/logs?follow=true&stdout=true"),
            "/v1.41/containers/abc/logs?follow=true&stdout=true"
        );
        assert_eq!(u("/_ping"), "/_ping");
        assert_eq!(u("/version"), "/version");
        assert_eq!(u("/volumes/v1.2/x"), "/volumes/v1.2/x");
    }
}
