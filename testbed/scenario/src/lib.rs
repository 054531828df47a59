//! Testbed scenario files (docs/scenario-format.md, version 1.1): the YAML model exactly as
//! people write it, parsing with the path of the offending key in every error, and the
//! validated, resolved [`Plan`]: pods with the addresses the testbed gives them, world and
//! entity hosts, policy manifests, probes. One crate, so that the testbed and the offline
//! `palisade policy explain --scenario` see the same pods at the same addresses.
//!
//! Parsing is strict: an unknown key anywhere outside the policy manifests is an error that
//! names its path (`pods[1].lables`). Policy manifests are passed to the agent as they are
//! (only the testbed's own `expectRejected` key is taken out): judging them is the agent's job.
mod model;
mod plan;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};

pub use model::{Expect, IpFamily, PodPort, PortProtocol, ProbeProtocol, RawNode, RawPod, RawProbe, RawScenario};
pub use plan::{
    Entity, HostRef, IMPLICIT_NODE, KUBE_APISERVER_IPV4, KUBE_APISERVER_IPV6, MAX_NODES, NODE_IPV4, NODE_IPV6,
    POD_GATEWAY_IPV4, POD_GATEWAY_IPV6, Plan, PlanHost, PlanNode, PlanPod, PlanPolicy, PlanProbe, REMOTE_NODE_IPV4,
    REMOTE_NODE_IPV6, host_interface_name, node_addresses, node_pod_cidrs,
};
pub use validate::{MAX_PODS, MAX_PROBES};

/// One thing wrong with a scenario, at a key path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issue {
    /// Key path in the file, e.g. `probes[2].port`.
    pub path: String,
    pub message: String,
    /// The scenario is valid but uses something this testbed version cannot run yet.
    pub unsupported: bool,
}

impl Issue {
    pub(crate) fn invalid(path: impl Into<String>, message: impl Into<String>) -> Issue {
        Issue { path: path.into(), message: message.into(), unsupported: false }
    }
    pub(crate) fn unsupported(path: impl Into<String>, message: impl Into<String>) -> Issue {
        Issue { path: path.into(), message: message.into(), unsupported: true }
    }
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.unsupported {
            write!(f, "{}: {}: not supported yet by this testbed version", self.path, self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Why a scenario file cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("{}: cannot read the scenario: {source}", file.display())]
    Read { file: PathBuf, source: std::io::Error },
    #[error("{}: {}: {message}{}", file.display(), if path.is_empty() { "(top level)" } else { path.as_str() }, location.map(|(l, c)| format!(" (line {l}, column {c})")).unwrap_or_default())]
    Syntax {
        file: PathBuf,
        /// Key path of the error (`pods[0].foo`), empty at the top level.
        path: String,
        message: String,
        /// Line and column, 1-based, when the YAML parser knows them.
        location: Option<(usize, usize)>,
    },
    #[error("{}: invalid scenario:\n{}", file.display(), issues.iter().map(|i| format!("  {i}")).collect::<Vec<_>>().join("\n"))]
    Invalid { file: PathBuf, issues: Vec<Issue> },
}

impl ScenarioError {
    /// Every issue of an [`ScenarioError::Invalid`] error (empty for the others).
    pub fn issues(&self) -> &[Issue] {
        match self {
            ScenarioError::Invalid { issues, .. } => issues,
            _ => &[],
        }
    }
}

/// Reads, parses and validates a scenario file.
pub fn load(file: &Path) -> Result<Plan, ScenarioError> {
    let text =
        std::fs::read_to_string(file).map_err(|source| ScenarioError::Read { file: file.to_path_buf(), source })?;
    load_str(&text, file)
}

/// Parses and validates scenario text; `file` is only used in messages and the report.
pub fn load_str(text: &str, file: &Path) -> Result<Plan, ScenarioError> {
    let raw = parse(text, file)?;
    validate::resolve(raw, file).map_err(|issues| ScenarioError::Invalid { file: file.to_path_buf(), issues })
}

/// The YAML parser's options for scenario files: YAML 1.2 booleans only (`yes` stays a
/// string inside policy manifests, as in Kubernetes), and an empty value for a string key
/// is the empty string, as before (`serde_yaml` did that).
fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        strict_booleans: true,
        null_as_string: true,
        with_snippet: false,
    }
}

/// Parses scenario text into the raw model (no cross-checks).
pub fn parse(text: &str, file: &Path) -> Result<RawScenario, ScenarioError> {
    // The key path of a deserialization error; the parser's own errors have none.
    let path = std::cell::RefCell::new(String::new());
    let parsed = serde_saphyr::with_deserializer_from_str_with_options(text, yaml_options(), |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            *path.borrow_mut() = e.path().to_string();
            e.into_inner()
        })
    });
    let inner = match parsed {
        Ok(raw) => return Ok(raw),
        Err(e) => e,
    };
    let path = path.into_inner();
    let location = inner.location().map(|l| (l.line() as usize, l.column() as usize));
    Err(ScenarioError::Syntax {
        file: file.to_path_buf(),
        path: if path == "." { String::new() } else { path },
        message: strip_location(&inner.to_string()),
        location,
    })
}

/// The YAML parser appends " at line L, column C" to its messages; the location is
/// reported separately.
fn strip_location(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) if message[i..].contains(" column ") => message[..i].to_string(),
        _ => message.to_string(),
    }
}

#[cfg(test)]
mod tests;
