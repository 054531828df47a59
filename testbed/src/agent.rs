//! The real agent, run as a node runs it: its working directories, its process (inside the
//! node's network namespace), and everything the testbed tells it through its local API
//! (namespaces, endpoints, the node's address, policy manifests).
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use palisade_api::types::{EndpointStatus, NamespaceSpec, PolicyStatus};
use palisade_api::{Client, ClientError};
use palisade_cli::offline;

use crate::cleanup;
use crate::error::SetupError;
use crate::scenario::{Plan, PlanPolicy};

/// How long the agent may take to answer on its socket, and to realize a revision.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long any other API call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound of a wait call: the agent's own timeout plus slack.
const WAIT_CALL_TIMEOUT: Duration = Duration::from_secs(READY_TIMEOUT.as_secs() + 5);

/// Makes one call to the agent, bounded by `limit`: a hung agent fails the run instead of
/// hanging it.
pub async fn call<T>(
    what: impl Into<String>,
    limit: Duration,
    fut: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, SetupError> {
    let what = what.into();
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(|source| SetupError::Api { call: what, source }),
        Err(_) => Err(SetupError::AgentHung { call: what, secs: limit.as_secs() }),
    }
}

/// The run's directories: a private temporary directory (policy dir, API socket, log) and
/// a pin directory in bpffs. Both are removed when dropped (the temporary one is kept with
/// `--keep-logs`).
pub struct RunDirs {
    pub root: PathBuf,
    pub policies: PathBuf,
    /// Files are written here, then renamed into `policies` (the agent never sees half a file).
    pub staging: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    /// The agent's state directory (endpoint registry), inside `root`.
    pub state: PathBuf,
    pub bpffs: PathBuf,
    // Dropped in this order: the pins first, then the temporary directory.
    _bpffs_guard: cleanup::Guard,
    _root_guard: cleanup::Guard,
}

/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";

impl RunDirs {
    /// The remote endpoints file of this node's agent (file mode of several nodes).
    pub fn remote_endpoints(&self) -> PathBuf {
        self.root.join("remote-endpoints.json")
    }

    /// Creates `$TMPDIR/palisade-testbed-<tag>` and `/sys/fs/bpf/palisade-testbed-<tag>`.
    pub fn create(tag: &str, keep_logs: bool) -> Result<RunDirs, SetupError> {
        let root = std::env::temp_dir().join(format!("palisade-testbed-{tag}"));
        let bpffs = Path::new(BPFFS).join(format!("palisade-testbed-{tag}"));
        for p in [&root, &bpffs] {
            if p.exists() {
                return Err(SetupError::PathExists { path: p.clone() });
            }
        }
        let root_guard = {
            let root = root.clone();
            cleanup::register(format!("directory {}", root.display()), move || {
                if keep_logs {
                    eprintln!("palisade-testbed: logs kept in {}", root.display());
                } else {
                    let _ = std::fs::remove_dir_all(&root);
                }
            })?
        };
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&root)
            .map_err(SetupError::io(format!("creating {}", root.display())))?;
        let bpffs_guard = {
            let bpffs = bpffs.clone();
            cleanup::register(format!("bpffs directory {}", bpffs.display()), move || {
                let _ = std::fs::remove_dir_all(&bpffs);
            })?
        };
        std::fs::create_dir(&bpffs)
            .map_err(SetupError::io(format!("creating {} (is bpffs mounted on {BPFFS}?)", bpffs.display())))?;
        let policies = root.join("policies");
        let staging = root.join("staging");
        for d in [&policies, &staging] {
            std::fs::create_dir(d).map_err(SetupError::io(format!("creating {}", d.display())))?;
        }
        let socket = root.join("agent.sock");
        if socket.as_os_str().len() >= 100 {
            return Err(SetupError::Io {
                what: format!("API socket path {}", socket.display()),
                source: std::io::Error::other("too long for a unix socket: set TMPDIR to a shorter directory"),
            });
        }
        Ok(RunDirs {
            log: root.join("agent.log"),
            state: root.join("state"),
            socket,
            policies,
            staging,
            root,
            bpffs,
            _bpffs_guard: bpffs_guard,
            _root_guard: root_guard,
        })
    }

    /// Writes `text` as `policies/<name>` atomically.
    pub fn write_policy(&self, name: &str, text: &str) -> Result<PathBuf, SetupError> {
        let staged = self.staging.join(name);
        let target = self.policies.join(name);
        std::fs::write(&staged, text).map_err(SetupError::io(format!("writing {}", staged.display())))?;
        std::fs::rename(&staged, &target).map_err(SetupError::io(format!("moving {}", target.display())))?;
        Ok(target)
    }
}

/// How to stop the agent for a restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopHow {
    /// SIGTERM: the agent exits on its own, the datapath stays (a rolling update).
    Term,
    /// SIGKILL: the agent dies wherever it was (a crash, an OOM kill).
    Kill,
}

/// The agent process. Dropping it stops the agent (SIGTERM, then SIGKILL after 5 s).
pub struct AgentProcess {
    child: Arc<Mutex<Option<Child>>>,
    pub client: Client,
    pub log: PathBuf,
    pub socket: PathBuf,
    binary: PathBuf,
    cluster: Option<String>,
    extra_args: Vec<String>,
    _guard: cleanup::Guard,
}

impl AgentProcess {
    /// Starts `binary` inside the node's network namespace (and in its own process group,
    /// so a terminal's Ctrl-C reaches the testbed, which then stops the agent in order).
    pub fn spawn(
        binary: &Path,
        node_ns: File,
        dirs: &RunDirs,
        cluster: Option<&str>,
        extra_args: &[String],
    ) -> Result<AgentProcess, SetupError> {
        if !binary.is_file() {
            return Err(SetupError::AgentMissing { path: binary.to_path_buf() });
        }
        let child: Arc<Mutex<Option<Child>>> = Arc::new(Mutex::new(None));
        let guard = {
            let child = child.clone();
            cleanup::register(format!("agent process ({})", binary.display()), move || {
                if let Some(c) = child.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
                    stop(c);
                }
            })?
        };
        let process = AgentProcess {
            child,
            client: Client::new(&dirs.socket),
            log: dirs.log.clone(),
            socket: dirs.socket.clone(),
            binary: binary.to_path_buf(),
            cluster: cluster.map(str::to_string),
            extra_args: extra_args.to_vec(),
            _guard: guard,
        };
        process.start_child(node_ns, dirs, false)?;
        Ok(process)
    }

    /// Starts the agent process (the log is appended to on a restart).
    fn start_child(&self, node_ns: File, dirs: &RunDirs, append: bool) -> Result<(), SetupError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&dirs.log)
            .map_err(SetupError::io(format!("opening {}", dirs.log.display())))?;
        let log2 = log.try_clone().map_err(SetupError::io("duplicating the log file handle"))?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--bpffs")
            .arg(&dirs.bpffs)
            .arg("--policy-dir")
            .arg(&dirs.policies)
            .arg("--api-socket")
            .arg(&dirs.socket)
            .arg("--state-dir")
            .arg(&dirs.state);
        if let Some(c) = &self.cluster {
            cmd.arg("--cluster").arg(c);
        }
        cmd.args(&self.extra_args);
        // The log is a file people read: no colour escapes.
        cmd.env("NO_COLOR", "1").stdin(Stdio::null()).stdout(log).stderr(log2).process_group(0);
        // Spawned from the thread that runs the whole scenario, which outlives it.
        crate::netns::enter_on_spawn(
            &mut cmd,
            node_ns.as_raw_fd(),
            libc::SIGTERM,
            "the testbed exited while starting the agent",
        );
        let mut slot = self.child.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.is_some() {
            return Err(SetupError::Unsupported("the agent still runs; stop it before starting it again".into()));
        }
        let spawned = cmd.spawn().map_err(|source| SetupError::AgentSpawn { path: self.binary.clone(), source })?;
        drop(node_ns);
        tracing::debug!(pid = spawned.id(), "agent started");
        *slot = Some(spawned);
        Ok(())
    }

    /// Stops the agent with SIGTERM or SIGKILL (this child only, by its PID) and waits up
    /// to `timeout` for it to exit; answers its exit status. The datapath it loaded stays.
    pub fn stop_now(&self, how: StopHow, timeout: Duration) -> Result<String, SetupError> {
        let mut slot = self.child.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(mut child) = slot.take() else { return Ok("not running".into()) };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let sig = match how {
            StopHow::Term => nix::sys::signal::Signal::SIGTERM,
            StopHow::Kill => nix::sys::signal::Signal::SIGKILL,
        };
        if !matches!(child.try_wait(), Ok(Some(_))) {
            let _ = nix::sys::signal::kill(pid, sig);
        }
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Ok(status.to_string()),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(SetupError::AgentHung {
                        call: format!("exiting after {how:?}"),
                        secs: timeout.as_secs(),
                    });
                }
            }
        }
    }

    /// Starts the agent again after [`AgentProcess::stop_now`], with the same arguments and
    /// directories (its log continues in the same file).
    pub fn start_again(&self, node_ns: File, dirs: &RunDirs) -> Result<(), SetupError> {
        self.start_child(node_ns, dirs, true)
    }

    /// The agent's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref().map(Child::id)
    }

    /// The agent's exit status if it has exited.
    pub fn exited(&self) -> Option<String> {
        let mut c = self.child.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match c.as_mut().map(Child::try_wait) {
            Some(Ok(Some(status))) => Some(status.to_string()),
            None => Some("stopped".into()),
            _ => None,
        }
    }

    /// The last `n` lines of the agent's log.
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(&self.log, n)
    }

    /// An error for an agent that has exited, if it has.
    pub fn check_alive(&self, when: &str) -> Result<(), SetupError> {
        match self.exited() {
            Some(status) => Err(SetupError::AgentExited {
                status,
                when: when.to_string(),
                log: self.log.clone(),
                tail: self.log_tail(30),
            }),
            None => Ok(()),
        }
    }

    /// Waits until the agent answers `status` on its socket.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), SetupError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive("before answering on its API socket")?;
            let last = match call("status", Duration::from_secs(2), self.client.status()).await {
                Ok(_) => return Ok(()),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(SetupError::AgentNotReady {
                    socket: self.socket.clone(),
                    secs: timeout.as_secs(),
                    last,
                    log: self.log.clone(),
                    tail: self.log_tail(30),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// SIGTERM, up to 5 s to exit, then SIGKILL. Only ever this child, by its PID.
fn stop(mut child: Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_)) | Err(_)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(n)..].join("\n");
    if tail.is_empty() { "(empty)".into() } else { tail }
}

/// Tells the agent about the scenario's namespaces and pods, the node's addresses (entity
/// host) and those the testbed designates as remote node and API server, and
/// waits until it has realized all of it. Returns the endpoints by pod index. What is told
/// comes from the functions offline `palisade policy explain --scenario` uses too, so both
/// see the same pods, addresses and entities.
pub async fn register(client: &Client, plan: &Plan) -> Result<HashMap<usize, EndpointStatus>, SetupError> {
    register_node(client, plan, 0).await
}

/// [`register`] for the agent of node `node`: every namespace, the pods of that node that
/// are not host-network, that node's address as host and the other nodes' as remote node.
pub async fn register_node(
    client: &Client,
    plan: &Plan,
    node: usize,
) -> Result<HashMap<usize, EndpointStatus>, SetupError> {
    for (name, labels) in &plan.namespaces {
        let spec = NamespaceSpec { labels: labels.clone() };
        call(format!("registering namespace {name}"), CALL_TIMEOUT, client.put_namespace(name, &spec)).await?;
    }
    let mut endpoints = HashMap::new();
    for pod in plan.pods.iter().filter(|p| p.node == node && !p.host_network) {
        let spec = offline::scenario_endpoint_spec(pod);
        let status = call(
            format!("registering pod {}", pod.key()),
            CALL_TIMEOUT,
            client.put_endpoint(&pod.namespace, &pod.name, &spec),
        )
        .await?;
        endpoints.insert(pod.index, status);
    }
    for spec in offline::scenario_reserved_entries_for_node(plan, node) {
        let what = format!("registering {} as entity {:?}", spec.cidr, spec.entity);
        call(what, CALL_TIMEOUT, client.put_ipcache(&spec)).await?;
    }
    call("waiting until the endpoints are realized", WAIT_CALL_TIMEOUT, client.wait_current(READY_TIMEOUT)).await?;
    Ok(endpoints)
}

/// Writes the file of the other nodes' pods that the agent of node `node` watches
/// (`--remote-endpoints`), atomically.
pub fn write_remote_endpoints(path: &Path, plan: &Plan, node: usize) -> Result<(), SetupError> {
    let file = offline::scenario_remote_endpoints(plan, node);
    let text = serde_json::to_string_pretty(&file).map_err(|e| SetupError::Io {
        what: format!("encoding {}", path.display()),
        source: std::io::Error::other(e),
    })?;
    let staged = path.with_extension("json.new");
    std::fs::write(&staged, text).map_err(SetupError::io(format!("writing {}", staged.display())))?;
    std::fs::rename(&staged, path).map_err(SetupError::io(format!("moving {}", path.display())))
}

/// Waits (bounded) until the kernel's ipcache of node `node`'s agent maps every address of
/// the other nodes' pods to a pod identity (it read its remote endpoints file), then until
/// that is realized.
pub async fn wait_remote_endpoints(client: &Client, plan: &Plan, node: usize) -> Result<(), SetupError> {
    let wanted: Vec<String> = plan
        .pods
        .iter()
        .filter(|p| p.node != node && !p.host_network)
        .flat_map(|p| [p.ipv4.map(|a| format!("{a}/32")), p.ipv6.map(|a| format!("{a}/128"))].into_iter().flatten())
        .collect();
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let entries = call("reading the ipcache", CALL_TIMEOUT, client.ipcache()).await?;
        let missing: Vec<&String> = wanted
            .iter()
            .filter(|w| !entries.iter().any(|e| &e.prefix == *w && e.identity >= FIRST_CLUSTER_IDENTITY))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(SetupError::Unsupported(format!(
                "node {}: after {}s the agent's ipcache still lacks the other nodes' pods {missing:?} (from its --remote-endpoints file or the kvstore)",
                plan.nodes[node].name,
                READY_TIMEOUT.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The first identity of a cluster's label sets (below it: reserved identities).
const FIRST_CLUSTER_IDENTITY: u32 = 256;

/// What applying the scenario's policies found, besides hard errors.
#[derive(Debug, Default)]
pub struct PolicyOutcome {
    /// Warnings the agent reported on enforced manifests (L7 parts not enforced...).
    pub warnings: Vec<String>,
    /// Checks that failed (a manifest expected to be rejected was enforced, or a rejected
    /// manifest changed what is enforced): the scenario fails (exit 1).
    pub failures: Vec<String>,
}

/// Writes every manifest into the policy directory and waits until the agent has realized
/// them. Manifests are applied in two steps: first those that must be enforced, then those
/// the scenario expects to be rejected, checking that the second step changed nothing that
/// is enforced. A manifest rejected unexpectedly is an error.
pub async fn apply_policies(client: &Client, dirs: &RunDirs, plan: &Plan) -> Result<PolicyOutcome, SetupError> {
    let mut outcome = PolicyOutcome::default();
    let (rejected, accepted): (Vec<&PlanPolicy>, Vec<&PlanPolicy>) =
        plan.policies.iter().partition(|p| p.expect_rejected);

    let statuses = write_and_settle(client, dirs, &accepted).await?;
    for p in &accepted {
        let st = find_status(&statuses, &p.file_name)
            .ok_or_else(|| SetupError::PolicyNotSeen { file: p.file_name.clone(), secs: READY_TIMEOUT.as_secs() })?;
        if !st.enforced {
            return Err(SetupError::ManifestRejected {
                manifest: p.label(),
                index: p.index,
                error: st.error.clone().unwrap_or_else(|| "(the agent gave no reason)".into()),
            });
        }
        outcome.warnings.extend(st.warnings.iter().map(|w| format!("{}: {w}", p.label())));
    }
    if rejected.is_empty() {
        return Ok(outcome);
    }

    let before = enforcement(client).await?;
    let statuses = write_and_settle(client, dirs, &rejected).await?;
    for p in &rejected {
        match find_status(&statuses, &p.file_name) {
            None => {
                return Err(SetupError::PolicyNotSeen { file: p.file_name.clone(), secs: READY_TIMEOUT.as_secs() });
            }
            Some(st) if st.enforced => outcome.failures.push(format!(
                "policies[{}] {} has expectRejected: true, but the agent accepted and enforces it",
                p.index,
                p.label()
            )),
            Some(st) => tracing::info!(manifest = %p.label(), error = ?st.error, "rejected as expected"),
        }
    }
    let after = enforcement(client).await?;
    if before != after {
        outcome.failures.push(format!(
            "applying the manifests expected to be rejected changed what is enforced:\n  before: {before:?}\n  after:  {after:?}"
        ));
    }
    Ok(outcome)
}

/// Another node's agent, reading the policy directory the first node's start filled: makes
/// it re-read the directory, waits until that revision is realized, and checks it enforces
/// every manifest the scenario expects enforced and none of those it expects rejected.
pub async fn check_policies_read(client: &Client, plan: &Plan) -> Result<PolicyOutcome, SetupError> {
    let ack = call("asking the agent to re-read its policy directory", CALL_TIMEOUT, client.rescan_policies()).await?;
    call(
        "waiting until the policies are realized",
        WAIT_CALL_TIMEOUT,
        client.wait_revision(ack.revision, READY_TIMEOUT),
    )
    .await?;
    let statuses = call("listing policies", CALL_TIMEOUT, client.policies()).await?;
    let mut outcome = PolicyOutcome::default();
    for p in &plan.policies {
        let st = find_status(&statuses, &p.file_name)
            .ok_or_else(|| SetupError::PolicyNotSeen { file: p.file_name.clone(), secs: READY_TIMEOUT.as_secs() })?;
        match (p.expect_rejected, st.enforced) {
            (false, false) => {
                return Err(SetupError::ManifestRejected {
                    manifest: p.label(),
                    index: p.index,
                    error: st.error.clone().unwrap_or_else(|| "(the agent gave no reason)".into()),
                });
            }
            (true, true) => outcome.failures.push(format!(
                "policies[{}] {} has expectRejected: true, but another node's agent accepted and enforces it",
                p.index,
                p.label()
            )),
            _ => {}
        }
    }
    Ok(outcome)
}

/// Writes the manifests, makes the agent take them in, waits until that revision is
/// realized, and returns the agent's view of every manifest.
async fn write_and_settle(
    client: &Client,
    dirs: &RunDirs,
    policies: &[&PlanPolicy],
) -> Result<Vec<PolicyStatus>, SetupError> {
    for p in policies {
        let text = p.to_yaml().map_err(|e| SetupError::Io {
            what: format!("encoding {}", p.label()),
            source: std::io::Error::other(e),
        })?;
        dirs.write_policy(&p.file_name, &text)?;
    }
    match tokio::time::timeout(CALL_TIMEOUT, client.rescan_policies()).await {
        Err(_) => Err(SetupError::AgentHung {
            call: "asking the agent to re-read its policy directory".into(),
            secs: CALL_TIMEOUT.as_secs(),
        }),
        Ok(Ok(ack)) => {
            call(
                "waiting until the policies are realized",
                WAIT_CALL_TIMEOUT,
                client.wait_revision(ack.revision, READY_TIMEOUT),
            )
            .await?;
            call("listing policies", CALL_TIMEOUT, client.policies()).await
        }
        // An agent without the rescan call: wait until it lists every file.
        Ok(Err(ClientError::Status { status: 404 | 405, .. })) => {
            let deadline = Instant::now() + READY_TIMEOUT;
            loop {
                let statuses = call("listing policies", CALL_TIMEOUT, client.policies()).await?;
                let missing = policies.iter().find(|p| find_status(&statuses, &p.file_name).is_none());
                match missing {
                    None => {
                        call(
                            "waiting until the policies are realized",
                            WAIT_CALL_TIMEOUT,
                            client.wait_current(READY_TIMEOUT),
                        )
                        .await?;
                        return call("listing policies", CALL_TIMEOUT, client.policies()).await;
                    }
                    Some(p) if Instant::now() >= deadline => {
                        return Err(SetupError::PolicyNotSeen {
                            file: p.file_name.clone(),
                            secs: READY_TIMEOUT.as_secs(),
                        });
                    }
                    Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
        Ok(Err(e)) => {
            Err(SetupError::Api { call: "asking the agent to re-read its policy directory".into(), source: e })
        }
    }
}

/// The agent's status of the manifest written as `file_name`.
pub fn find_status<'a>(statuses: &'a [PolicyStatus], file_name: &str) -> Option<&'a PolicyStatus> {
    statuses.iter().find(|s| s.source == file_name || Path::new(&s.source).file_name().is_some_and(|f| f == file_name))
}

/// What is enforced, per endpoint: (key, identity, ingress enforced, egress enforced, entries).
type Enforcement = Vec<(String, u32, bool, bool, usize)>;

async fn enforcement(client: &Client) -> Result<Enforcement, SetupError> {
    let mut v: Enforcement = call("listing endpoints", CALL_TIMEOUT, client.endpoints())
        .await?
        .into_iter()
        .map(|e| {
            (format!("{}/{}", e.namespace, e.name), e.identity, e.ingress_enforced, e.egress_enforced, e.policy_entries)
        })
        .collect();
    v.sort();
    Ok(v)
}
