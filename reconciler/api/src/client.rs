//! Client of the agent's local API, used by the CLI, the CNI plugin and the testbed.
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use crate::types::{
    Ack, ApiError, BpfPolicy, EndpointSpec, EndpointStatus, ExplainRequest, Explanation, IdentityInfo, IpcacheEntry,
    IpcacheEntrySpec, MonitorEvent, NamespaceSpec, PolicyStatus, Status,
};

/// Why a call to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the agent at {socket}: {source} (is palisade-agent running, and are you root?)")]
    Connect { socket: PathBuf, source: std::io::Error },
    #[error("talking to the agent at {socket}: {source}")]
    Http { socket: PathBuf, source: hyper::Error },
    #[error("the agent answered {status} to {method} {path}: {message}")]
    Status { method: String, path: String, status: u16, message: String },
    #[error("the agent's answer to {path} is not what this client expects: {source}")]
    Decode { path: String, source: serde_json::Error },
    #[error("waiting for revision {revision}: not realized within {timeout_ms} ms")]
    WaitTimeout { revision: u64, timeout_ms: u64 },
}

/// A handle on the agent's API socket. Each call opens its own connection.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl AsRef<Path>) -> Self {
        Client { socket: socket.as_ref().to_path_buf() }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn connect(&self) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, ClientError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Connect { socket: self.socket.clone(), source })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ClientError::Http { socket: self.socket.clone(), source })?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    async fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<R, ClientError> {
        let mut sender = self.connect().await?;
        let bytes = match body {
            Some(b) => Bytes::from(serde_json::to_vec(b).expect("API bodies serialize")),
            None => Bytes::new(),
        };
        let req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header("host", "palisade")
            .header("content-type", "application/json")
            .body(Full::new(bytes))
            .expect("valid request");
        let resp = sender
            .send_request(req)
            .await
            .map_err(|source| ClientError::Http { socket: self.socket.clone(), source })?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|source| ClientError::Http { socket: self.socket.clone(), source })?
            .to_bytes();
        if !status.is_success() {
            if status == StatusCode::REQUEST_TIMEOUT && path.starts_with("/v1/wait") {
                let q = |k: &str| {
                    path.split(['?', '&']).find_map(|kv| kv.strip_prefix(k)).and_then(|v| v.parse().ok()).unwrap_or(0)
                };
                return Err(ClientError::WaitTimeout { revision: q("revision="), timeout_ms: q("timeout_ms=") });
            }
            let message = serde_json::from_slice::<ApiError>(&body)
                .map_or_else(|_| String::from_utf8_lossy(&body).into_owned(), |e| e.error);
            return Err(ClientError::Status {
                method: method.to_string(),
                path: path.to_string(),
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_slice(&body).map_err(|source| ClientError::Decode { path: path.to_string(), source })
    }

    pub async fn status(&self) -> Result<Status, ClientError> {
        self.call::<(), _>(Method::GET, "/v1/status", None).await
    }

    pub async fn put_namespace(&self, name: &str, spec: &NamespaceSpec) -> Result<Ack, ClientError> {
        self.call(Method::PUT, &format!("/v1/namespaces/{name}"), Some(spec)).await
    }

    pub async fn put_endpoint(
        &self,
        namespace: &str,
        name: &str,
        spec: &EndpointSpec,
    ) -> Result<EndpointStatus, ClientError> {
        self.call(Method::PUT, &format!("/v1/endpoints/{namespace}/{name}"), Some(spec)).await
    }

    pub async fn delete_endpoint(&self, namespace: &str, name: &str) -> Result<Ack, ClientError> {
        self.call::<(), _>(Method::DELETE, &format!("/v1/endpoints/{namespace}/{name}"), None).await
    }

    pub async fn endpoints(&self) -> Result<Vec<EndpointStatus>, ClientError> {
        self.call::<(), _>(Method::GET, "/v1/endpoints", None).await
    }

    pub async fn put_ipcache(&self, spec: &IpcacheEntrySpec) -> Result<Ack, ClientError> {
        self.call(Method::PUT, "/v1/ipcache", Some(spec)).await
    }

    /// The kernel's ipcache, read back from the maps.
    pub async fn ipcache(&self) -> Result<Vec<IpcacheEntry>, ClientError> {
        self.call::<(), _>(Method::GET, "/v1/ipcache", None).await
    }

    /// The kernel's policy entries of one endpoint (`namespace/name` or id), read back
    /// from the maps and decoded.
    pub async fn bpf_policy(&self, endpoint: &str) -> Result<BpfPolicy, ClientError> {
        let q: String = endpoint
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        self.call::<(), _>(Method::GET, &format!("/v1/bpf/policy?endpoint={q}"), None).await
    }

    pub async fn identities(&self) -> Result<Vec<IdentityInfo>, ClientError> {
        self.call::<(), _>(Method::GET, "/v1/identities", None).await
    }

    pub async fn policies(&self) -> Result<Vec<PolicyStatus>, ClientError> {
        self.call::<(), _>(Method::GET, "/v1/policies", None).await
    }

    /// Explains the verdict of a flow (see [`ExplainRequest`]).
    pub async fn explain(&self, req: &ExplainRequest) -> Result<Explanation, ClientError> {
        self.call(Method::POST, "/v1/explain", Some(req)).await
    }

    /// Makes the agent re-read its policy directory now; answers the revision that
    /// includes what it found (wait for it with [`Client::wait_revision`]).
    pub async fn rescan_policies(&self) -> Result<Ack, ClientError> {
        self.call::<(), _>(Method::POST, "/v1/policies/rescan", None).await
    }

    /// Waits until every endpoint has realized `revision` in the kernel.
    pub async fn wait_revision(&self, revision: u64, timeout: Duration) -> Result<Status, ClientError> {
        let ms = timeout.as_millis() as u64;
        self.call::<(), _>(Method::GET, &format!("/v1/wait?revision={revision}&timeout_ms={ms}"), None).await
    }

    /// Tests only (agent started with `--fault-injection`): makes one actor
    /// (`policy_watch`, `endpoint_tracker`, `identity_cache`, `resolver`, `map_writer`)
    /// panic; answers once it was restarted and every source resynced, with the revision
    /// that includes the rebuilt state.
    pub async fn debug_panic(&self, actor: &str) -> Result<Ack, ClientError> {
        self.call::<(), _>(Method::POST, &format!("/v1/debug/panic/{actor}"), None).await
    }

    /// Waits until the agent has realized everything it has accepted so far.
    pub async fn wait_current(&self, timeout: Duration) -> Result<Status, ClientError> {
        let rev = self.status().await?.revision;
        self.wait_revision(rev, timeout).await
    }

    /// Opens the verdict-event stream. Events arrive as they happen from the moment the
    /// call returns.
    pub async fn monitor(&self) -> Result<MonitorStream, ClientError> {
        self.stream(Method::GET, "/v1/monitor", Bytes::new()).await
    }

    /// Queries the agent's flow buffer (`palisade observe`): the matching flows, lost-event
    /// notes, and with `follow` new flows as they come.
    pub async fn flows(&self, query: &crate::flow::FlowQuery) -> Result<FlowStream, ClientError> {
        let body = serde_json::to_vec(query).expect("a query serializes");
        self.stream(Method::POST, "/v1/flows", Bytes::from(body)).await
    }

    async fn stream<T>(&self, method: Method, path: &str, body: Bytes) -> Result<LineStream<T>, ClientError> {
        let mut sender = self.connect().await?;
        let req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header("host", "palisade")
            .header("content-type", "application/json")
            .body(Full::new(body))
            .expect("valid request");
        let resp = sender
            .send_request(req)
            .await
            .map_err(|source| ClientError::Http { socket: self.socket.clone(), source })?;
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            let bytes = resp.into_body().collect().await.map(http_body_util::Collected::to_bytes).unwrap_or_default();
            let message = serde_json::from_slice::<crate::types::ApiError>(&bytes)
                .map_or_else(|_| String::from_utf8_lossy(&bytes).into_owned(), |e| e.error);
            return Err(ClientError::Status { method: method.to_string(), path: path.into(), status, message });
        }
        Ok(LineStream {
            body: resp.into_body(),
            buf: Vec::new(),
            socket: self.socket.clone(),
            path: path.into(),
            item: std::marker::PhantomData,
        })
    }
}

/// A live stream of verdict events.
pub type MonitorStream = LineStream<MonitorEvent>;
/// The answer of a flow query.
pub type FlowStream = LineStream<crate::flow::FlowsResponse>;

/// One JSON document per line.
pub struct LineStream<T> {
    body: hyper::body::Incoming,
    buf: Vec<u8>,
    socket: PathBuf,
    path: String,
    item: std::marker::PhantomData<T>,
}

impl<T: serde::de::DeserializeOwned> LineStream<T> {
    /// The next document; `None` when the agent closed the stream.
    pub async fn next(&mut self) -> Result<Option<T>, ClientError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return serde_json::from_slice(&line)
                    .map(Some)
                    .map_err(|source| ClientError::Decode { path: self.path.clone(), source });
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(source)) => {
                    return Err(ClientError::Http { socket: self.socket.clone(), source });
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}
