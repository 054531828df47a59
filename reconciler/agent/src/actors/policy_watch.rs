//! Policy watch actor: reads every manifest in the policy directory, validates it, and
//! keeps the repository of accepted policies. A manifest that fails validation is
//! reported (kind, name, field path, reason) and changes nothing that is enforced: the
//! last accepted version of the same policy stays in force.
//!
//! The directory is watched with inotify and, as a fallback, re-read every few seconds;
//! an unchanged file costs one read and a hash.
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use notify::Watcher;
use palisade_policy::model::Policy;
use palisade_policy::parse::{ManifestOutcome, parse_manifests};

use super::endpoints::{EndpointTracker, PoliciesForLabels};
use super::resolver::{PoliciesChanged, Resolver};
use crate::api::types::PolicyStatus;

/// Identity of a policy: (kind, namespace, name).
type PolicyId = (String, Option<String>, String);

fn policy_id(p: &Policy) -> PolicyId {
    (p.kind.to_string(), p.namespace.clone(), p.name.clone())
}

/// What one file currently contributes.
#[derive(Debug, Default)]
struct FileState {
    hash: u64,
    statuses: Vec<PolicyStatus>,
}

pub struct PolicyWatch {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// Accepted policies by id, with the file they came from.
    accepted: BTreeMap<PolicyId, (PathBuf, Policy)>,
    revision: u64,
    resolver: Addr<Resolver>,
    endpoints: Addr<EndpointTracker>,
    rescan_interval: Duration,
    watcher: Option<notify::RecommendedWatcher>,
}

impl PolicyWatch {
    pub fn new(
        dir: PathBuf,
        resolver: Addr<Resolver>,
        endpoints: Addr<EndpointTracker>,
        rescan_interval: Duration,
    ) -> Self {
        PolicyWatch {
            dir,
            files: BTreeMap::new(),
            accepted: BTreeMap::new(),
            revision: 0,
            resolver,
            endpoints,
            rescan_interval,
            watcher: None,
        }
    }

    fn list_files(&self) -> std::io::Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
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

    /// Re-reads the directory; true when the accepted set changed.
    fn rescan(&mut self) -> bool {
        let files = match self.list_files() {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read the policy directory; enforcement unchanged");
                return false;
            }
        };
        let mut changed = false;
        let present: BTreeSet<PathBuf> = files.iter().cloned().collect();
        // Files that disappeared take their policies with them.
        let gone: Vec<PathBuf> = self.files.keys().filter(|p| !present.contains(*p)).cloned().collect();
        for path in gone {
            self.files.remove(&path);
            let before = self.accepted.len();
            self.accepted.retain(|_, (src, _)| src != &path);
            if self.accepted.len() != before {
                tracing::info!(file = %path.display(), "policy file removed");
                changed = true;
            }
        }
        for path in files {
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    // Vanished or unreadable between listing and reading: try again next time.
                    tracing::warn!(file = %path.display(), error = %e, "cannot read policy file; enforcement unchanged");
                    continue;
                }
            };
            let mut h = DefaultHasher::new();
            bytes.hash(&mut h);
            let hash = h.finish();
            if self.files.get(&path).is_some_and(|f| f.hash == hash) {
                continue;
            }
            changed |= self.load_file(&path, &bytes, hash);
        }
        changed
    }

    /// Applies one changed file; true when the accepted set changed.
    fn load_file(&mut self, path: &Path, bytes: &[u8], hash: u64) -> bool {
        let source = path.display().to_string();
        let next_revision = PENDING;
        let reject_file = |error: String| PolicyStatus {
            source: source.clone(),
            kind: "File".into(),
            namespace: None,
            name: path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            enforced: false,
            error: Some(error),
            warnings: Vec::new(),
            revision: next_revision,
        };
        let text = match std::str::from_utf8(bytes) {
            Ok(t) => t,
            Err(e) => {
                let msg = format!(
                    "{source}: not UTF-8 text (invalid byte at offset {}); the policies of this file that were in force stay in force",
                    e.valid_up_to()
                );
                tracing::error!("{msg}");
                self.files.insert(path.to_path_buf(), FileState { hash, statuses: vec![reject_file(msg)] });
                return false;
            }
        };
        let outcomes = match parse_manifests(text, &source) {
            Ok(o) => o,
            Err(e) => {
                let msg = format!("{e}; the policies of this file that were in force stay in force");
                tracing::error!("{msg}");
                self.files.insert(path.to_path_buf(), FileState { hash, statuses: vec![reject_file(msg)] });
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
                    if let Some(other) = clash.or_else(|| now.contains_key(&id).then(|| path.to_path_buf())) {
                        let msg = format!(
                            "{} {}: a policy with this kind, namespace and name is already defined in {}; rename one of them",
                            id.0,
                            display_name(&id),
                            other.display()
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
                self.accepted.insert(id, (path.to_path_buf(), policy));
                changed = true;
            }
        }
        self.files.insert(path.to_path_buf(), FileState { hash, statuses });
        changed
    }

    /// Gives the statuses written by the last rescan the revision that realized them.
    fn stamp(&mut self, revision: u64) {
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

impl Actor for PolicyWatch {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if let Err(e) = std::fs::create_dir_all(&self.dir) {
            tracing::error!(dir = %self.dir.display(), error = %e, "cannot create the policy directory");
        }
        let addr = ctx.address();
        match notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            // Only changes matter: our own reads produce access events, which must not
            // trigger another read.
            if let Ok(ev) = res
                && (ev.kind.is_create() || ev.kind.is_modify() || ev.kind.is_remove())
            {
                addr.do_send(Rescan);
            }
        }) {
            Ok(mut w) => match w.watch(&self.dir, notify::RecursiveMode::NonRecursive) {
                Ok(()) => self.watcher = Some(w),
                Err(e) => tracing::warn!(error = %e, "inotify watch failed; falling back to periodic re-reads"),
            },
            Err(e) => tracing::warn!(error = %e, "inotify unavailable; falling back to periodic re-reads"),
        }
        ctx.notify(Rescan);
        ctx.run_interval(self.rescan_interval, |_, ctx| ctx.notify(Rescan));
    }
}

/// Re-reads the policy directory now; answers the revision that includes what it found.
#[derive(Message)]
#[rtype(result = "u64")]
pub struct Rescan;

impl Handler<Rescan> for PolicyWatch {
    type Result = AtomicResponse<Self, u64>;
    fn handle(&mut self, _: Rescan, _: &mut Context<Self>) -> Self::Result {
        if !self.rescan() {
            let rev = self.revision;
            self.stamp(rev);
            return AtomicResponse::new(Box::pin(fut::ready(rev)));
        }
        let policies: Arc<Vec<Policy>> = Arc::new(self.accepted.values().map(|(_, p)| p.clone()).collect());
        tracing::info!(policies = policies.len(), "policy repository changed");
        let (endpoints, resolver) = (self.endpoints.clone(), self.resolver.clone());
        AtomicResponse::new(Box::pin(
            async move {
                // Pods' ipBlock memberships first, then the rules that use them.
                let relabelled = endpoints.send(PoliciesForLabels { policies: policies.clone() }).await;
                if let Ok(Err(e)) = &relabelled {
                    tracing::error!(error = %e, "re-deriving pod labels for ipBlocks failed");
                }
                resolver.send(PoliciesChanged { policies }).await
            }
            .into_actor(self)
            .map(|res, act, _| {
                if let Ok(rev) = res {
                    act.revision = rev;
                }
                act.stamp(act.revision);
                act.revision
            }),
        ))
    }
}

/// Status of every manifest seen.
#[derive(Message)]
#[rtype(result = "Vec<PolicyStatus>")]
pub struct ListPolicies;

impl Handler<ListPolicies> for PolicyWatch {
    type Result = MessageResult<ListPolicies>;
    fn handle(&mut self, _: ListPolicies, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.files.values().flat_map(|f| f.statuses.iter().cloned()).collect())
    }
}
