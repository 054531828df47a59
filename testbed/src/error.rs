//! Why a run could not be set up or could not check what the scenario says (exit code 2).
use std::path::PathBuf;

use palisade_api::ClientError;

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
    #[error("{name:?} is not an instance name (lowercase letters, digits and '-', at most 32)")]
    InstanceName { name: String },
    #[error(
        "testbed instance {name:?} is already up (testbed process {pid}): take it down first (`palisade-testbed down --name {name}`) or give this one another --name"
    )]
    InstanceUp { name: String, pid: u32 },
    #[error("testbed instance {name:?} was left behind by a testbed process that is gone ({}): remove it with `palisade-testbed down --name {name}`", dir.display())]
    InstanceLeftOver { name: String, dir: PathBuf },
    #[error("no testbed instance {name:?} is up (bring one up with `palisade-testbed up FILE`)")]
    NoInstance { name: String },
    #[error(
        "testbed instance {name:?} is not up: its testbed process is gone; `palisade-testbed down --name {name}` removes what is left"
    )]
    InstanceGone { name: String },
    #[error("the testbed process that brings the scenario up exited ({status}); its output:\n{tail}")]
    HolderExited { status: String, tail: String },
    #[error("the scenario was not up within {secs} s; the testbed process's output:\n{tail}")]
    HolderTimeout { secs: u64, tail: String },
    #[error("{name:?} is not a pod or host of the testbed instance (it has: {known})")]
    UnknownEnd { name: String, known: String },
    #[error("the testbed instance answered: {0}")]
    Holder(String),
    #[error(transparent)]
    Terminating(#[from] Terminating),
}

impl SetupError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SetupError {
        let what = what.into();
        move |source| SetupError::Io { what, source }
    }
}
