//! Errors of the agent's operations, as the API reports them.
use std::path::PathBuf;

/// What went wrong, with what a user needs to act on it.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(
        "endpoint {namespace}/{name}: interface {interface:?} does not exist in the agent's network namespace; create the pod's veth first (the host side must be visible to the agent)"
    )]
    InterfaceNotFound { namespace: String, name: String, interface: String },
    #[error(
        "endpoint {namespace}/{name}: namespace {namespace:?} is unknown; register it first (PUT /v1/namespaces/{namespace})"
    )]
    UnknownNamespace { namespace: String, name: String },
    #[error("endpoint {namespace}/{name} not found")]
    EndpointNotFound { namespace: String, name: String },
    #[error("endpoint {namespace}/{name}: {reason}")]
    InvalidEndpoint { namespace: String, name: String, reason: String },
    #[error("no endpoint ids left (65535 endpoints on this node)")]
    EndpointIdsExhausted,
    #[error(transparent)]
    InvalidCidr(#[from] palisade_node::ipcache::InvalidPrefix),
    #[error("datapath: {0}")]
    Datapath(#[from] crate::datapath::DatapathError),
    #[error("policy directory {path}: {source}")]
    PolicyDir { path: PathBuf, source: std::io::Error },
    /// Kvstore mode: etcd could not give an identity (unreachable, or a conflict).
    #[error("{0}; nothing new is allowed until it can")]
    Kvstore(String),
    #[error("the agent is shutting down ({0})")]
    Mailbox(#[from] actix::MailboxError),
}

impl AgentError {
    /// HTTP status the API answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            AgentError::EndpointNotFound { .. } => 404,
            AgentError::InterfaceNotFound { .. }
            | AgentError::UnknownNamespace { .. }
            | AgentError::InvalidEndpoint { .. }
            | AgentError::InvalidCidr(_) => 400,
            AgentError::EndpointIdsExhausted => 507,
            AgentError::Kvstore(_) => 503,
            _ => 500,
        }
    }
}
