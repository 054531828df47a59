//! Why a run could not be set up or could not check what the scenario says (exit code 2).
use std::path::PathBuf;

use palisade_agent::api::ClientError;

use crate::cleanup::Terminating;
use crate::scenario::ScenarioError;

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    #[error("`{command}` failed ({status}): {stderr}")]
    Command { command: String, status: String, stderr: String },
    #[error("cannot run `{command}`: {source} (is iproute2 installed?)")]
    Spawn { command: String, source: std::io::Error },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error(
        "network namespace {name} already exists: an earlier run with the same process id left it behind; \
         remove it with `ip netns delete {name}`"
    )]
    NetnsExists { name: String },
    #[error("{} already exists: an earlier run with the same process id left it behind; remove it", path.display())]
    PathExists { path: PathBuf },
    #[error(
        "agent binary {} not found: build it (`cargo build -p palisade-agent`), or name it with --agent or PALISADE_AGENT",
        path.display()
    )]
    AgentMissing { path: PathBuf },
    #[error("cannot start the agent {}: {source}", path.display())]
    AgentSpawn { path: PathBuf, source: std::io::Error },
    #[error("the agent exited ({status}) {when}; last lines of {}:\n{tail}", log.display())]
    AgentExited { status: String, when: String, log: PathBuf, tail: String },
    #[error("the agent did not answer on {} within {secs} s ({last}); last lines of {}:\n{tail}", socket.display(), log.display())]
    AgentNotReady { socket: PathBuf, secs: u64, last: String, log: PathBuf, tail: String },
    #[error("agent API, {call}: {source}")]
    Api { call: String, source: ClientError },
    #[error("agent API, {call}: no answer within {secs} s (the agent hangs?)")]
    AgentHung { call: String, secs: u64 },
    #[error("the agent did not report policy file {file} within {secs} s")]
    PolicyNotSeen { file: String, secs: u64 },
    #[error("policy manifest {manifest} (policies[{index}]) was rejected by the agent: {error}")]
    ManifestRejected { manifest: String, index: usize, error: String },
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Terminating(#[from] Terminating),
}

impl SetupError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SetupError {
        let what = what.into();
        move |source| SetupError::Io { what, source }
    }
}
