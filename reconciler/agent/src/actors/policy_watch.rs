//! Policy watch actor: reads every manifest in the policy directory, validates it, and
//! keeps the repository of accepted policies. A manifest that fails validation is
//! reported (kind, name, field path, reason) and changes nothing that is enforced: the
//! last accepted version of the same policy stays in force.
//!
//! The directory is watched with inotify and, as a fallback, re-read every few seconds;
//! an unchanged file costs one read and a hash.
//!
//! Other sources (the Kubernetes API) hand in manifests as text under a source key
//! ([`UpsertSourceText`], [`RemoveSource`]), e.g. `kube:CiliumNetworkPolicy/ns/name`: each
//! is treated like one more file, with the same validation and last-good-version rules.
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use notify::Watcher;
use palisade_policy::model::Policy;

use super::resolver::{PoliciesChanged, Resolver};
use crate::api::types::PolicyStatus;
pub use palisade_node::sources::PolicySources;

pub struct PolicyWatch {
    dir: PathBuf,
    sources: PolicySources,
    revision: u64,
    resolver: Addr<Resolver>,
    rescan_interval: Duration,
    watcher: Option<notify::RecommendedWatcher>,
    /// A re-read for inotify events is queued.
    rescan_queued: bool,
    /// The metadata of every file as last read, and whether its last change was already
    /// [`SETTLE`] old then.
    seen: HashMap<PathBuf, (FileStamp, bool)>,
    /// The next re-read reads every file (set every [`FULL_READ_EVERY`] periodic re-reads).
    full_read_due: bool,
    periodic: u32,
}

/// A file whose last change (ctime) was this old when it was read is not read again until
/// its metadata changes: any later write sets its ctime to a later time, one the stamp
/// does not hold, whatever the file system's timestamp granularity (far finer than this).
const SETTLE: Duration = Duration::from_secs(1);
/// Every this many periodic re-reads, every file is read whatever its metadata (a clock
/// set back could in theory give a rewritten file its old ctime).
const FULL_READ_EVERY: u32 = 15;

/// What identifies a file's content without reading it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamp {
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    fn of(path: &std::path::Path) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }

    /// Whether the last change is at least [`SETTLE`] old.
    fn settled(&self) -> bool {
        let changed = std::time::UNIX_EPOCH
            + Duration::new(self.ctime.0.max(0) as u64, self.ctime.1.clamp(0, 999_999_999) as u32);
        std::time::SystemTime::now().duration_since(changed).is_ok_and(|age| age >= SETTLE)
    }
}

impl PolicyWatch {
    pub fn new(dir: PathBuf, resolver: Addr<Resolver>, rescan_interval: Duration) -> Self {
        PolicyWatch {
            dir,
            sources: PolicySources::default(),
            revision: 0,
            resolver,
            rescan_interval,
            watcher: None,
            rescan_queued: false,
            seen: HashMap::new(),
            full_read_due: false,
            periodic: 0,
        }
    }

    fn list_files(&self) -> std::io::Result<Vec<PathBuf>> {
        palisade_node::sources::policy_files(&self.dir)
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
        let present: BTreeSet<String> = files.iter().map(|p| p.display().to_string()).collect();
        // Files that disappeared take their policies with them.
        let gone: Vec<String> = self.sources.dir_sources().filter(|k| !present.contains(*k)).cloned().collect();
        for source in gone {
            if self.sources.remove_source(&source) {
                tracing::info!(file = %source, "policy file removed");
                changed = true;
            }
        }
        self.seen.retain(|p, _| present.contains(&p.display().to_string()));
        let full = std::mem::take(&mut self.full_read_due);
        for path in files {
            // A file read after its last change had settled is not read again while its
            // metadata stays the same (see [`FileStamp`]).
            let stamp = FileStamp::of(&path);
            if !full
                && let Some(now) = &stamp
                && self.seen.get(&path).is_some_and(|(before, settled)| *settled && before == now)
            {
                continue;
            }
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    // Vanished or unreadable between listing and reading: try again next time.
                    tracing::warn!(file = %path.display(), error = %e, "cannot read policy file; enforcement unchanged");
                    continue;
                }
            };
            match stamp {
                Some(st) => {
                    let settled = st.settled();
                    self.seen.insert(path.clone(), (st, settled));
                }
                None => {
                    self.seen.remove(&path);
                }
            }
            let mut h = DefaultHasher::new();
            bytes.hash(&mut h);
            let hash = h.finish();
            let source = path.display().to_string();
            if self.sources.unchanged(&source, hash) {
                continue;
            }
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            changed |= self.sources.load_source(&source, &name, true, &bytes, hash);
        }
        changed
    }

    /// Hands the accepted set to the endpoint tracker and the resolver; answers the
    /// revision that includes it (or the current one when nothing changed).
    fn publish(&mut self, changed: bool) -> ResponseActFuture<Self, u64> {
        if !changed {
            let rev = self.revision;
            self.sources.stamp(rev);
            return Box::pin(fut::ready(rev));
        }
        let policies: Arc<Vec<Policy>> = Arc::new(self.sources.policies());
        tracing::info!(policies = policies.len(), "policy repository changed");
        let resolver = self.resolver.clone();
        Box::pin(async move { resolver.send(PoliciesChanged { policies }).await }.into_actor(self).map(
            |res, act, _| {
                if let Ok(rev) = res {
                    act.revision = rev;
                }
                act.sources.stamp(act.revision);
                act.revision
            },
        ))
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
                addr.do_send(DirChanged);
            }
        }) {
            Ok(mut w) => match w.watch(&self.dir, notify::RecursiveMode::NonRecursive) {
                Ok(()) => self.watcher = Some(w),
                Err(e) => tracing::warn!(error = %e, "inotify watch failed; falling back to periodic re-reads"),
            },
            Err(e) => tracing::warn!(error = %e, "inotify unavailable; falling back to periodic re-reads"),
        }
        ctx.notify(Rescan);
        ctx.run_interval(self.rescan_interval, |act, ctx| {
            act.periodic += 1;
            if act.periodic % FULL_READ_EVERY == 0 {
                act.full_read_due = true;
            }
            ctx.notify(Rescan);
        });
    }
}

/// Re-reads the policy directory now; answers the revision that includes what it found.
#[derive(Message)]
#[rtype(result = "u64")]
pub struct Rescan;

impl Handler<Rescan> for PolicyWatch {
    type Result = AtomicResponse<Self, u64>;
    fn handle(&mut self, _: Rescan, _: &mut Context<Self>) -> Self::Result {
        self.rescan_and_publish()
    }
}

impl PolicyWatch {
    fn rescan_and_publish(&mut self) -> AtomicResponse<Self, u64> {
        let changed = self.rescan();
        // Readiness hook (ops): the first complete read of the directory is its first sync.
        AtomicResponse::new(Box::pin(self.publish(changed).map(|revision, _, _| {
            crate::metrics::readiness().source_synced(crate::metrics::SOURCE_POLICY_DIR, revision);
            revision
        })))
    }
}

/// inotify saw a change in the directory. Writing one file makes several events (create,
/// modify, close); they are taken together: one re-read after the messages already queued.
#[derive(Message)]
#[rtype(result = "()")]
struct DirChanged;

impl Handler<DirChanged> for PolicyWatch {
    type Result = ();
    fn handle(&mut self, _: DirChanged, ctx: &mut Context<Self>) {
        if !self.rescan_queued {
            self.rescan_queued = true;
            ctx.notify(QueuedRescan);
        }
    }
}

#[derive(Message)]
#[rtype(result = "u64")]
struct QueuedRescan;

impl Handler<QueuedRescan> for PolicyWatch {
    type Result = AtomicResponse<Self, u64>;
    fn handle(&mut self, _: QueuedRescan, _: &mut Context<Self>) -> Self::Result {
        self.rescan_queued = false;
        self.rescan_and_publish()
    }
}

/// Re-reads the policy directory and hands the whole accepted set on, changed or not (the
/// agent's start and every actor restart: the resolver may have nothing). Answers the
/// revision that includes it.
#[derive(Message)]
#[rtype(result = "u64")]
pub struct Resync;

impl Handler<Resync> for PolicyWatch {
    type Result = AtomicResponse<Self, u64>;
    fn handle(&mut self, _: Resync, _: &mut Context<Self>) -> Self::Result {
        self.rescan();
        AtomicResponse::new(self.publish(true))
    }
}

/// After a panic: forget every source; `started` runs again, watches the directory and
/// re-reads it (sources handed in as text come back with their next sync).
impl Supervised for PolicyWatch {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.sources = PolicySources::default();
        self.watcher = None;
        self.rescan_queued = false;
        self.seen.clear();
    }
}

/// What became of a source handed in as text: the revision that includes it and the
/// status of every manifest in it (for a status write-back).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceApplied {
    pub revision: u64,
    pub statuses: Vec<PolicyStatus>,
}

/// Adds or replaces a source given as text (e.g. `kube:CiliumNetworkPolicy/ns/name` with
/// the object as YAML or JSON). Validation and last-good-version rules are those of files.
#[derive(Message)]
#[rtype(result = "SourceApplied")]
pub struct UpsertSourceText {
    pub source: String,
    pub text: String,
}

impl Handler<UpsertSourceText> for PolicyWatch {
    type Result = AtomicResponse<Self, SourceApplied>;
    fn handle(&mut self, msg: UpsertSourceText, _: &mut Context<Self>) -> Self::Result {
        let changed = self.sources.upsert_text(&msg.source, &msg.text);
        let source = msg.source;
        AtomicResponse::new(Box::pin(self.publish(changed).map(move |revision, act: &mut Self, _| SourceApplied {
            revision,
            statuses: act.sources.statuses_of(&source),
        })))
    }
}

/// Forgets a source handed in with [`UpsertSourceText`] and its policies; answers the
/// revision that no longer includes them.
#[derive(Message)]
#[rtype(result = "u64")]
pub struct RemoveSource {
    pub source: String,
}

impl Handler<RemoveSource> for PolicyWatch {
    type Result = AtomicResponse<Self, u64>;
    fn handle(&mut self, msg: RemoveSource, _: &mut Context<Self>) -> Self::Result {
        let changed = self.sources.remove_source(&msg.source);
        if changed {
            tracing::info!(source = %msg.source, "policy source removed");
        }
        AtomicResponse::new(self.publish(changed))
    }
}

/// Status of every manifest seen.
#[derive(Message)]
#[rtype(result = "Vec<PolicyStatus>")]
pub struct ListPolicies;

impl Handler<ListPolicies> for PolicyWatch {
    type Result = MessageResult<ListPolicies>;
    fn handle(&mut self, _: ListPolicies, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.sources.statuses())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file just written is not settled (it is read again next time, whatever its
    /// metadata); one whose last change is older is, and a rewrite changes its stamp.
    #[test]
    fn file_stamps_settle_and_change_with_a_rewrite() {
        let dir = std::env::temp_dir().join(format!("palisade-stamp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("p.yaml");
        std::fs::write(&f, "aaaa").unwrap();
        let first = FileStamp::of(&f).unwrap();
        assert!(!first.settled(), "just written: {first:?}");
        std::fs::write(&f, "bbbb").unwrap();
        let second = FileStamp::of(&f).unwrap();
        assert!(!second.settled());
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        let old = FileStamp { ctime: (now.as_secs() as i64 - 2, 0), ..second.clone() };
        assert!(old.settled());
        let new = FileStamp { ctime: (now.as_secs() as i64, 0), ..second };
        assert!(!new.settled());
        assert!(FileStamp::of(&dir.join("missing.yaml")).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
