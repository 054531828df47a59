//! The agent's state directory (`--state-dir`, default `/var/lib/palisade`): what the agent
//! was told through its API and cannot find anywhere else after a restart, i.e. the
//! endpoint registry (namespaces, pods with their node-local ids and identities) and the
//! addresses given reserved identities. Policies come back from their sources (the policy
//! directory, the Kubernetes API); what is enforced stays in the pinned maps.
//!
//! Files are JSON, replaced atomically (written to a temporary file in the same directory,
//! flushed, renamed over the old one, directory flushed), so a crash at any point leaves
//! either the old or the new version, never half a file.
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::api::types::{EndpointSpec, ReservedEntity};

/// File of the endpoint registry.
pub const ENDPOINTS_FILE: &str = "endpoints.json";
/// File of the reserved ipcache entries.
pub const IPCACHE_FILE: &str = "ipcache.json";
/// What the kvstore taught (the other nodes' pods, identities and nodes), restored before the
/// store answers after a restart.
pub const KVSTORE_FILE: &str = "kvstore-remote.json";
/// Format version written into every file.
pub const VERSION: u32 = 1;

/// One endpoint as saved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SavedEndpoint {
    pub namespace: String,
    pub name: String,
    pub id: u16,
    pub identity: u32,
    /// Security labels (`source:key=value`) the identity stands for.
    pub labels: Vec<String>,
    /// Interface index when registered: a different index under the same name is another
    /// interface (the pod was replaced while no agent ran).
    pub ifindex: u32,
    pub spec: EndpointSpec,
}

/// The endpoint registry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointRegistry {
    pub version: u32,
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pub endpoints: Vec<SavedEndpoint>,
}

/// One reserved ipcache entry as saved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SavedReserved {
    pub cidr: String,
    pub entity: ReservedEntity,
}

/// The reserved ipcache entries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReservedEntries {
    pub version: u32,
    pub entries: Vec<SavedReserved>,
}

/// The state directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateDir {
    pub path: PathBuf,
}

impl StateDir {
    pub const DEFAULT: &'static str = "/var/lib/palisade";

    pub fn new(path: impl Into<PathBuf>) -> StateDir {
        StateDir { path: path.into() }
    }

    /// The endpoint registry; empty when there is none yet. An unreadable file is an error
    /// (starting empty would remove every endpoint's enforcement).
    pub fn load_endpoints(&self) -> std::io::Result<EndpointRegistry> {
        load(&self.path.join(ENDPOINTS_FILE))
    }

    pub fn save_endpoints(&self, reg: &EndpointRegistry) -> std::io::Result<()> {
        save(&self.path, ENDPOINTS_FILE, &EndpointRegistry { version: VERSION, ..reg.clone() })
    }

    pub fn load_reserved(&self) -> std::io::Result<ReservedEntries> {
        load(&self.path.join(IPCACHE_FILE))
    }

    pub fn save_reserved(&self, entries: &ReservedEntries) -> std::io::Result<()> {
        save(&self.path, IPCACHE_FILE, &ReservedEntries { version: VERSION, ..entries.clone() })
    }

    /// What the kvstore taught this node of the others (`kvstore/sync.rs`); empty when
    /// there is none.
    pub fn load_kvstore<T: Default + for<'de> Deserialize<'de>>(&self) -> std::io::Result<T> {
        load(&self.path.join(KVSTORE_FILE))
    }

    pub fn save_kvstore<T: Serialize>(&self, value: &T) -> std::io::Result<()> {
        save(&self.path, KVSTORE_FILE, value)
    }

    /// Removes the state files and the directory (if empty then). Missing is fine.
    pub fn remove(&self) -> std::io::Result<()> {
        for f in [ENDPOINTS_FILE, IPCACHE_FILE, KVSTORE_FILE] {
            match std::fs::remove_file(self.path.join(f)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        match std::fs::remove_dir(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

fn load<T: Default + for<'de> Deserialize<'de>>(path: &Path) -> std::io::Result<T> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(T::default()),
        Err(e) => return Err(e),
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", path.display())))
}

/// Writes `value` as `dir/name` atomically (temporary file, fsync, rename, fsync of `dir`).
fn save<T: Serialize>(dir: &Path, name: &str, value: &T) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.tmp"));
    let text = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_round_trips_and_missing_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("state"));
        assert_eq!(state.load_endpoints().unwrap(), EndpointRegistry::default());
        let mut reg = EndpointRegistry::default();
        reg.namespaces.insert("shop".into(), BTreeMap::from([("team".into(), "a".into())]));
        reg.endpoints.push(SavedEndpoint {
            namespace: "shop".into(),
            name: "web".into(),
            id: 3,
            identity: 256,
            labels: vec!["k8s:app=web".into()],
            ifindex: 7,
            spec: serde_json::from_str(r#"{"interface":"veth0","ipv4":"10.0.0.2"}"#).unwrap(),
        });
        state.save_endpoints(&reg).unwrap();
        let back = state.load_endpoints().unwrap();
        assert_eq!(back.endpoints, reg.endpoints);
        assert_eq!(back.version, VERSION);
        // No temporary file is left behind.
        let names: Vec<String> = std::fs::read_dir(&state.path)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![ENDPOINTS_FILE.to_string()]);
        state.remove().unwrap();
        assert!(!state.path.exists());
    }

    #[test]
    fn a_corrupt_registry_is_an_error_not_an_empty_one() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        std::fs::write(dir.path().join(ENDPOINTS_FILE), b"{not json").unwrap();
        let e = state.load_endpoints().unwrap_err();
        assert!(e.to_string().contains(ENDPOINTS_FILE), "{e}");
    }
}
