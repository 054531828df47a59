//! A scenario kept up between shell commands (`palisade-testbed up / probe / exec / down`):
//! where an instance keeps its state, what the state file records, the processes it names
//! (checked by PID *and* start time, so a recycled PID is never signalled), the control
//! protocol between the commands and the process that holds the scenario, and the sweep
//! that removes everything an instance made even when that process is gone.
//!
//! An instance is a directory `<state root>/<name>` (state root `/run/palisade-testbed`, or
//! `PALISADE_TESTBED_STATE_DIR`) with `state.json` (written once the scenario is up),
//! `control.sock` (the holder's control socket) and `testbed.log` (the holder's output).
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::SetupError;
use crate::netns;
use crate::scenario::{IpFamily, ProbeProtocol};

/// Where instances live unless `PALISADE_TESTBED_STATE_DIR` says otherwise.
pub const DEFAULT_STATE_ROOT: &str = "/run/palisade-testbed";
/// The instance `up` makes when not given `--name`.
pub const DEFAULT_NAME: &str = "default";
pub const STATE_FILE: &str = "state.json";
pub const CONTROL_SOCKET: &str = "control.sock";
pub const HOLDER_LOG: &str = "testbed.log";
/// The holder's [`ProcRef`], written by `up` as soon as it is started (before the state).
pub const HOLDER_FILE: &str = "holder.json";

/// The directory that holds every instance.
pub fn state_root() -> PathBuf {
    std::env::var_os("PALISADE_TESTBED_STATE_DIR").map_or_else(|| PathBuf::from(DEFAULT_STATE_ROOT), PathBuf::from)
}

/// Instance names become directory names: lowercase letters, digits, '-', at most 32.
pub fn check_name(name: &str) -> Result<(), SetupError> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok { Ok(()) } else { Err(SetupError::InstanceName { name: name.to_string() }) }
}

/// A process, by PID and the start time the kernel gives it (`/proc/PID/stat`, field 22).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcRef {
    pub pid: u32,
    pub start_time: u64,
}

impl ProcRef {
    /// The running process `pid`, if there is one.
    pub fn of(pid: u32) -> Option<ProcRef> {
        start_time(pid).map(|start_time| ProcRef { pid, start_time })
    }

    /// Still the same process (not exited, PID not reused). A zombie counts as gone.
    pub fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start_time) && !is_zombie(self.pid)
    }

    /// Sends `signal` if this is still the same process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> bool {
        self.alive() && nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), signal).is_ok()
    }

    /// Waits until the process is gone; false if it still runs after `limit`.
    pub fn wait_gone(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.alive() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// SIGTERM, `grace` to exit, then SIGKILL. True when it is gone.
    pub fn stop(&self, grace: Duration) -> bool {
        if !self.alive() {
            return true;
        }
        self.signal(nix::sys::signal::Signal::SIGTERM);
        if self.wait_gone(grace) {
            return true;
        }
        self.signal(nix::sys::signal::Signal::SIGKILL);
        self.wait_gone(Duration::from_secs(5))
    }
}

fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// Field 22 of `/proc/PID/stat` (fields after the name start at 3).
fn start_time(pid: u32) -> Option<u64> {
    stat_fields(pid)?.get(22 - 3)?.parse().ok()
}

fn is_zombie(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|f| f.first().is_some_and(|s| s == "Z" || s == "X"))
}

/// A probe end one can `exec` in: a pod, or a host that is not a pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct End {
    /// `namespace/pod`, `entity:host`, `entity:remote-node`, or a world host's address.
    pub name: String,
    pub netns: String,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
}

/// What `up` made, for the other commands (and for `down` when the holder is gone).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceState {
    pub name: String,
    pub scenario: String,
    pub file: PathBuf,
    /// The process that holds the scenario (listeners, agent, namespaces).
    pub holder: ProcRef,
    pub agent: Option<ProcRef>,
    pub api_socket: PathBuf,
    pub policy_dir: PathBuf,
    pub agent_log: Option<PathBuf>,
    /// The run's temporary directory (socket, log, policies) and bpffs pin directory.
    pub run_dir: PathBuf,
    pub bpffs_dir: PathBuf,
    /// Every network namespace, the node's last.
    pub namespaces: Vec<String>,
    pub ends: Vec<End>,
    /// A probe of the scenario, for the examples `up` prints.
    pub example_probe: Option<(String, String, String)>,
    /// With several nodes: the nodes after the first, each with its own agent and
    /// directories (the first node's are the fields above).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeState>,
    /// With several nodes: the first node's name (whose agent the fields above describe).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_node: Option<String>,
    /// Kubernetes mode: a kubeconfig for the testbed's API server on 127.0.0.1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
}

/// A node after the first of an instance with several nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeState {
    pub name: String,
    pub netns: String,
    pub agent: Option<ProcRef>,
    pub api_socket: PathBuf,
    pub agent_log: Option<PathBuf>,
    pub run_dir: PathBuf,
    pub bpffs_dir: PathBuf,
}

impl InstanceState {
    /// Reads `dir/state.json`; `None` when there is none (yet).
    pub fn load(dir: &Path) -> Result<Option<InstanceState>, SetupError> {
        let path = dir.join(STATE_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(SetupError::Io { what: format!("reading {}", path.display()), source: e }),
        };
        serde_json::from_str(&text).map(Some).map_err(|e| SetupError::Io {
            what: format!("reading {}", path.display()),
            source: std::io::Error::other(e),
        })
    }

    /// Writes `dir/state.json` atomically.
    pub fn save(&self, dir: &Path) -> Result<(), SetupError> {
        let text = serde_json::to_string_pretty(self).expect("the state serializes");
        let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
        let path = dir.join(STATE_FILE);
        std::fs::write(&tmp, text).map_err(SetupError::io(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, &path).map_err(SetupError::io(format!("writing {}", path.display())))
    }

    /// The end `target` names: `namespace/pod`, `node` (= `entity:host`, the first node),
    /// `node:NAME` or just a node's `NAME`, an entity, or a world host's address.
    pub fn end(&self, target: &str) -> Option<&End> {
        let target = if target == "node" { "entity:host" } else { target };
        self.ends.iter().find(|e| e.name == target).or_else(|| {
            let as_node = format!("node:{target}");
            self.ends.iter().find(|e| e.name == as_node)
        })
    }
}

/// The holder recorded in `dir`: from the state file, else from the file `up` writes
/// when it starts the holder.
pub fn holder_of(dir: &Path, state: Option<&InstanceState>) -> Option<ProcRef> {
    state.map(|s| s.holder).or_else(|| {
        let text = std::fs::read_to_string(dir.join(HOLDER_FILE)).ok()?;
        serde_json::from_str(&text).ok()
    })
}

/// Creates the directory of a new instance; fails if the instance exists (up, or left over).
pub fn create_dir(name: &str) -> Result<PathBuf, SetupError> {
    let root = state_root();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&root)
        .map_err(SetupError::io(format!("creating {}", root.display())))?;
    let dir = root.join(name);
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => Ok(dir),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let state = InstanceState::load(&dir).ok().flatten();
            Err(match holder_of(&dir, state.as_ref()) {
                Some(h) if h.alive() => SetupError::InstanceUp { name: name.to_string(), pid: h.pid },
                _ => SetupError::InstanceLeftOver { name: name.to_string(), dir },
            })
        }
        Err(e) => Err(SetupError::Io { what: format!("creating {}", dir.display()), source: e }),
    }
}

/// A request to the holder.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Request {
    Probe(ProbeRequest),
    /// Take everything down and exit.
    Down,
}

/// A probe as `palisade-testbed probe` names it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProbeRequest {
    pub from: String,
    pub to: String,
    pub port: Option<u16>,
    pub protocol: ProbeProtocol,
    pub family: Option<IpFamily>,
}

/// The holder's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Response {
    Probe(ProbeOutcome),
    /// Everything is removed; the holder exits.
    Down,
    Error(String),
}

/// What a probe observed.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeOutcome {
    pub from: String,
    pub to: String,
    pub port: Option<u16>,
    pub protocol: String,
    pub family: IpFamily,
    /// `allow`, `deny` or `error`.
    pub observed: String,
    pub decided_by: String,
    pub detail: Option<String>,
    pub ms: u64,
    /// With several nodes: which node judged each side (`egress node-a, ingress node-b`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judged_on: Option<String>,
}

/// Sends one request on the instance's control socket and reads the answer (bounded).
pub fn request(dir: &Path, req: &Request, limit: Duration) -> Result<Response, SetupError> {
    let path = dir.join(CONTROL_SOCKET);
    let what = format!("talking to the testbed on {}", path.display());
    let stream = UnixStream::connect(&path).map_err(SetupError::io(what.clone()))?;
    stream.set_read_timeout(Some(limit)).map_err(SetupError::io(what.clone()))?;
    stream.set_write_timeout(Some(limit)).map_err(SetupError::io(what.clone()))?;
    let mut line = serde_json::to_string(req).expect("requests serialize");
    line.push('\n');
    (&stream).write_all(line.as_bytes()).map_err(SetupError::io(what.clone()))?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).map_err(SetupError::io(what.clone()))?;
    serde_json::from_str(&answer).map_err(|e| SetupError::Io {
        what,
        source: std::io::Error::other(format!("unreadable answer {answer:?}: {e}")),
    })
}

/// Removes whatever of the instance is left, in order: the agent (by its recorded PID and
/// start time), the network namespaces, the pin and temporary directories, the instance's
/// own directory. Returns what was removed and what could not be.
pub fn sweep(dir: &Path, state: Option<&InstanceState>) -> (Vec<String>, Vec<String>) {
    let (mut removed, mut failed) = (Vec::new(), Vec::new());
    if let Some(s) = state {
        for agent in s.nodes.iter().filter_map(|n| n.agent).chain(s.agent).filter(ProcRef::alive) {
            if agent.stop(Duration::from_secs(5)) {
                removed.push(format!("agent process {}", agent.pid));
            } else {
                failed.push(format!("agent process {}: still running after SIGKILL", agent.pid));
            }
        }
        for ns in &s.namespaces {
            if Path::new(netns::NETNS_DIR).join(ns).exists() {
                match netns::delete(ns) {
                    Ok(()) => removed.push(format!("network namespace {ns}")),
                    Err(e) => failed.push(format!("network namespace {ns}: {e}")),
                }
            }
        }
        let node_dirs = s.nodes.iter().flat_map(|n| [&n.bpffs_dir, &n.run_dir]);
        for d in node_dirs.chain([&s.bpffs_dir, &s.run_dir]) {
            if d.exists() {
                match std::fs::remove_dir_all(d) {
                    Ok(()) => removed.push(format!("directory {}", d.display())),
                    Err(e) => failed.push(format!("directory {}: {e}", d.display())),
                }
            }
        }
    }
    if dir.exists() {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => removed.push(format!("instance directory {}", dir.display())),
            Err(e) => failed.push(format!("instance directory {}: {e}", dir.display())),
        }
    }
    (removed, failed)
}

/// Instances whose holder is gone (for `cleanup`).
pub fn abandoned() -> Vec<(PathBuf, Option<InstanceState>)> {
    let Ok(entries) = std::fs::read_dir(state_root()) else { return Vec::new() };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let dir = e.path();
        if !dir.is_dir() {
            continue;
        }
        let state = InstanceState::load(&dir).ok().flatten();
        // No holder recorded: `up` died before starting it, or is starting it right now;
        // only an old directory is judged abandoned.
        let gone = match holder_of(&dir, state.as_ref()) {
            Some(h) => !h.alive(),
            None => e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > Duration::from_mins(10))),
        };
        if gone {
            out.push((dir, state));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("default").is_ok());
        assert!(check_name("dev-2").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("../etc").is_err());
        assert!(check_name("A").is_err());
    }

    #[test]
    fn this_process_is_alive_and_a_wrong_start_time_is_not() {
        let me = ProcRef::of(std::process::id()).unwrap();
        assert!(me.alive());
        assert!(!ProcRef { start_time: me.start_time + 1, ..me }.alive());
    }

    #[test]
    fn state_round_trips_and_finds_ends() {
        let dir = tempfile::tempdir().unwrap();
        let s = InstanceState {
            name: "t".into(),
            scenario: "s".into(),
            file: "s.yaml".into(),
            holder: ProcRef { pid: 1, start_time: 2 },
            agent: None,
            api_socket: "/x/agent.sock".into(),
            policy_dir: "/x/policies".into(),
            agent_log: None,
            run_dir: "/x".into(),
            bpffs_dir: "/sys/fs/bpf/x".into(),
            namespaces: vec!["pt1-p0".into(), "pt1-node".into()],
            ends: vec![End { name: "entity:host".into(), netns: "pt1-node".into(), ipv4: None, ipv6: None }],
            example_probe: None,
            nodes: Vec::new(),
            first_node: None,
            kubeconfig: None,
        };
        s.save(dir.path()).unwrap();
        assert_eq!(InstanceState::load(dir.path()).unwrap().unwrap(), s);
        assert_eq!(s.end("node").unwrap().netns, "pt1-node");
        assert!(s.end("default/x").is_none());
        assert!(InstanceState::load(&dir.path().join("none")).unwrap().is_none());
    }
}
