//! The policy repository without its actor: every source (a file of the policy directory,
//! or an object of the Kubernetes API under a key such as `kube:CiliumNetworkPolicy/ns/name`)
//! with the status of each of its manifests, and the accepted policies. A manifest that
//! fails validation is reported (kind, name, field path, reason) and changes nothing that
//! is enforced: the last accepted version of the same policy stays in force. The agent's
//! policy watch feeds it; offline `policy explain` reads a directory through it too.
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};

use palisade_api::types::PolicyStatus;
use palisade_policy::model::Policy;
use palisade_policy::parse::{ManifestOutcome, parse_manifests};

/// The files of a policy directory the agent reads, sorted: `*.yaml`, `*.yml`, `*.json`,
/// not hidden (the agent's policy watch and offline explain read the same ones).
pub fn policy_files(dir: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let hidden = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
        if !hidden && matches!(ext, "yaml" | "yml" | "json") && path.is_file() {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Identity of a policy: (kind, namespace, name).
type PolicyId = (String, Option<String>, String);

fn policy_id(p: &Policy) -> PolicyId {
    (p.kind.to_string(), p.namespace.clone(), p.name.clone())
}

/// What one source (a file, or an object of the Kubernetes API) currently contributes.
#[derive(Debug, Default)]
struct FileState {
    hash: u64,
    statuses: Vec<PolicyStatus>,
    /// True for files of the policy directory (which a rescan may find gone).
    from_dir: bool,
}

/// The policy repository: every source (file or API object) with the statuses of its
/// manifests, and the accepted policies. Plain code: the actor only feeds it.
#[derive(Debug, Default)]
pub struct PolicySources {
    /// Every source by its key: a file's path, or `kube:Kind/ns/name`.
    files: BTreeMap<String, FileState>,
    /// Accepted policies by id, with the source they came from.
    accepted: BTreeMap<PolicyId, (String, Policy)>,
}

impl PolicySources {
    /// The accepted policies.
    pub fn policies(&self) -> Vec<Policy> {
        self.accepted.values().map(|(_, p)| p.clone()).collect()
    }

    /// The status of every manifest of every source.
    pub fn statuses(&self) -> Vec<PolicyStatus> {
        self.files.values().flat_map(|f| f.statuses.iter().cloned()).collect()
    }

    /// Keys of the sources read from the policy directory.
    pub fn dir_sources(&self) -> impl Iterator<Item = &String> {
        self.files.iter().filter(|(_, f)| f.from_dir).map(|(k, _)| k)
    }

    /// Whether `source` was last read with this content hash.
    pub fn unchanged(&self, source: &str, hash: u64) -> bool {
        self.files.get(source).is_some_and(|f| f.hash == hash)
    }

    /// Forgets a source and the policies it contributed; true when the accepted set changed.
    pub fn remove_source(&mut self, source: &str) -> bool {
        self.files.remove(source);
        let before = self.accepted.len();
        self.accepted.retain(|_, (src, _)| src != source);
        self.accepted.len() != before
    }

    /// Applies one new or changed source (`name` names it when the text as a whole is
    /// unreadable); true when the accepted set changed.
    pub fn load_source(&mut self, source: &str, name: &str, from_dir: bool, bytes: &[u8], hash: u64) -> bool {
        let path = source;
        let source = source.to_string();
        let next_revision = PENDING;
        let reject_file = |error: String| PolicyStatus {
            source: source.clone(),
            kind: if from_dir { "File".into() } else { "Source".into() },
            namespace: None,
            name: name.to_string(),
            enforced: false,
            error: Some(error),
            warnings: Vec::new(),
            revision: next_revision,
            audit: false,
        };
        let text = match std::str::from_utf8(bytes) {
            Ok(t) => t,
            Err(e) => {
                let msg = format!(
                    "{source}: not UTF-8 text (invalid byte at offset {}); the policies of this file that were in force stay in force",
                    e.valid_up_to()
                );
                tracing::error!("{msg}");
                self.files.insert(source.clone(), FileState { hash, statuses: vec![reject_file(msg)], from_dir });
                return false;
            }
        };
        let outcomes = match parse_manifests(text, &source) {
            Ok(o) => o,
            Err(e) => {
                let msg = format!("{e}; the policies of this file that were in force stay in force");
                tracing::error!("{msg}");
                self.files.insert(source.clone(), FileState { hash, statuses: vec![reject_file(msg)], from_dir });
                return false;
            }
        };
        // New content of this file: what it accepts now, and ids it names but rejects
        // (whose last good version stays).
        let mut now: BTreeMap<PolicyId, Policy> = BTreeMap::new();
        let mut kept: BTreeSet<PolicyId> = BTreeSet::new();
        let mut statuses = Vec::new();
        for outcome in outcomes {
            match outcome {
                ManifestOutcome::Accepted(policy) => {
                    let id = policy_id(&policy);
                    let clash = self.accepted.get(&id).filter(|(src, _)| src != path).map(|(src, _)| src.clone());
                    if let Some(other) = clash.or_else(|| now.contains_key(&id).then(|| path.to_string())) {
                        let msg = format!(
                            "{} {}: a policy with this kind, namespace and name is already defined in {other}; rename one of them",
                            id.0,
                            display_name(&id),
                        );
                        tracing::error!(file = %source, "{msg}");
                        statuses.push(PolicyStatus {
                            source: source.clone(),
                            kind: id.0.clone(),
                            namespace: id.1.clone(),
                            name: id.2.clone(),
                            enforced: false,
                            error: Some(msg),
                            warnings: Vec::new(),
                            revision: next_revision,
                            audit: false,
                        });
                        continue;
                    }
                    for w in &policy.warnings {
                        tracing::warn!(policy = %display_name(&id), "{w}");
                    }
                    statuses.push(PolicyStatus {
                        source: source.clone(),
                        kind: id.0.clone(),
                        namespace: id.1.clone(),
                        name: id.2.clone(),
                        enforced: true,
                        error: None,
                        warnings: policy.warnings.clone(),
                        revision: next_revision,
                        audit: policy.audit,
                    });
                    now.insert(id, policy);
                }
                ManifestOutcome::Rejected(err) => {
                    let msg = err.to_string();
                    tracing::error!(file = %source, "policy rejected: {msg}");
                    let (kind, namespace, name) = err.identity();
                    let id = (kind.clone(), namespace.clone(), name.clone());
                    let still = self.accepted.get(&id).is_some_and(|(src, _)| src == path);
                    if still {
                        kept.insert(id);
                    }
                    statuses.push(PolicyStatus {
                        source: source.clone(),
                        kind,
                        namespace,
                        name,
                        enforced: false,
                        error: Some(if still {
                            format!("{msg} (the previously accepted version stays in force)")
                        } else {
                            msg
                        }),
                        warnings: Vec::new(),
                        revision: next_revision,
                        audit: false,
                    });
                }
            }
        }
        let mut changed = false;
        let stale: Vec<PolicyId> = self
            .accepted
            .iter()
            .filter(|(id, (src, _))| src == path && !now.contains_key(*id) && !kept.contains(*id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            self.accepted.remove(&id);
            changed = true;
        }
        for (id, policy) in now {
            let same = self.accepted.get(&id).is_some_and(|(_, p)| *p == policy);
            if !same {
                self.accepted.insert(id, (path.to_string(), policy));
                changed = true;
            }
        }
        self.files.insert(source, FileState { hash, statuses, from_dir });
        changed
    }

    /// Applies a manifest handed in as text; true when the accepted set changed.
    pub fn upsert_text(&mut self, source: &str, text: &str) -> bool {
        let mut h = DefaultHasher::new();
        text.hash(&mut h);
        let hash = h.finish();
        if self.files.get(source).is_some_and(|f| f.hash == hash) {
            return false;
        }
        self.load_source(source, source, false, text.as_bytes(), hash)
    }

    /// Statuses of one source.
    pub fn statuses_of(&self, source: &str) -> Vec<PolicyStatus> {
        self.files.get(source).map(|f| f.statuses.clone()).unwrap_or_default()
    }

    /// Gives the statuses written by the last rescan the revision that realized them.
    pub fn stamp(&mut self, revision: u64) {
        for f in self.files.values_mut() {
            for s in &mut f.statuses {
                if s.revision == PENDING {
                    s.revision = revision;
                }
            }
        }
    }
}

/// Revision placeholder of a status until the resolver numbers the change.
const PENDING: u64 = u64::MAX;

fn display_name(id: &PolicyId) -> String {
    match &id.1 {
        Some(ns) => format!("{ns}/{}", id.2),
        None => id.2.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_directory_is_its_visible_yaml_and_json_files_in_order() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b.yaml", "a.json", "c.yml", ".hidden.yaml", "notes.txt", "d.yaml.swp"] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        std::fs::create_dir(dir.path().join("sub.yaml")).unwrap();
        let names: Vec<String> = policy_files(dir.path())
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["a.json", "b.yaml", "c.yml"]);
        assert!(policy_files(&dir.path().join("missing")).is_err());
    }

    const CNP: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: web, namespace: shop}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress: [{fromEndpoints: [{matchLabels: {app: api}}]}]\n";
    const CNP_BAD: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: web, namespace: shop}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress: [{fromEndpoints: [{matchLabels: {app: api}}], toPorts: [{ports: [{port: \"99999\"}]}]}]\n";
    const KEY: &str = "kube:CiliumNetworkPolicy/shop/web";

    #[test]
    fn api_source_is_accepted_then_kept_when_a_bad_version_arrives() {
        let mut s = PolicySources::default();
        assert!(s.upsert_text(KEY, CNP));
        assert_eq!(s.policies().len(), 1);
        let st = s.statuses_of(KEY);
        assert_eq!(st.len(), 1);
        assert!(st[0].enforced, "{st:?}");
        assert_eq!(st[0].source, KEY);
        // Same text again: nothing changes.
        assert!(!s.upsert_text(KEY, CNP));
        // A bad version is reported with its field path; the good one stays in force.
        assert!(!s.upsert_text(KEY, CNP_BAD));
        let st = s.statuses_of(KEY);
        assert!(!st[0].enforced);
        let err = st[0].error.clone().unwrap();
        assert!(err.contains("CiliumNetworkPolicy shop/web"), "{err}");
        assert!(err.contains("spec.ingress[0].toPorts[0].ports[0].port"), "{err}");
        assert!(err.contains("previously accepted version stays in force"), "{err}");
        assert_eq!(s.policies().len(), 1);
        // Removing the source removes its policy.
        assert!(s.remove_source(KEY));
        assert!(s.policies().is_empty());
        assert!(s.statuses().is_empty());
        assert!(!s.remove_source(KEY));
    }

    #[test]
    fn api_source_and_file_cannot_define_the_same_policy() {
        let mut s = PolicySources::default();
        assert!(s.load_source("/etc/p/web.yaml", "web.yaml", true, CNP.as_bytes(), 1));
        assert!(!s.upsert_text(KEY, CNP));
        let err = s.statuses_of(KEY)[0].error.clone().unwrap();
        assert!(err.contains("already defined in /etc/p/web.yaml"), "{err}");
        assert_eq!(s.dir_sources().count(), 1);
    }

    #[test]
    fn unreadable_api_text_names_the_source() {
        let mut s = PolicySources::default();
        assert!(!s.upsert_text(KEY, "{not: [yaml"));
        let st = s.statuses_of(KEY);
        assert_eq!(st[0].kind, "Source");
        assert_eq!(st[0].name, KEY);
        assert!(!st[0].enforced);
    }
}
