//! The process that holds a scenario up for `palisade-testbed up` (hidden subcommand
//! `hold`, started by `up` in its own session): it brings the scenario up as a
//! [`Session`], records the instance's state, then serves the control socket (probes,
//! down) until it is told to go down or gets SIGTERM/SIGINT/SIGHUP. Either way everything
//! is removed by the session's guards, and the instance directory last.
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::cleanup;
use crate::cli::{EXIT_OK, EXIT_SETUP};
use crate::error::SetupError;
use crate::instance::{CONTROL_SOCKET, End, InstanceState, ProbeOutcome, ProbeRequest, ProcRef, Request, Response};
use crate::scenario::{self, Expect, HostRef, Plan, RawProbe};
use crate::session::{RunNames, RunOptions, Session};

/// How long a request may take to arrive once connected.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What `up` tells the holder.
#[derive(Clone, Debug)]
pub struct HoldOptions {
    /// The instance directory (made by `up`).
    pub dir: PathBuf,
    pub name: String,
    pub file: PathBuf,
    pub agent: PathBuf,
    pub timeout: Duration,
    pub kvstore: bool,
    pub kubernetes: bool,
}

/// The holder's whole life; its output goes to the instance's log.
pub fn hold(opts: &HoldOptions) -> ExitCode {
    let plan = match scenario::load(&opts.file) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("palisade-testbed: {e}");
            return ExitCode::from(EXIT_SETUP);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("palisade-testbed: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_SETUP);
        }
    };
    match runtime.block_on(hold_scenario(&plan, opts)) {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(e) => {
            if !cleanup::terminating() {
                eprintln!("palisade-testbed: scenario {} ({}): {e}", plan.name, plan.file.display());
            }
            ExitCode::from(EXIT_SETUP)
        }
    }
}

async fn hold_scenario(plan: &Plan, opts: &HoldOptions) -> Result<(), SetupError> {
    let run = RunOptions {
        agent_args: Vec::new(),
        keep_logs: false,
        timeout: opts.timeout,
        kvstore: opts.kvstore,
        kubernetes: opts.kubernetes,
        ..RunOptions::new(Some(opts.agent.clone()))
    };
    let session = Session::up(plan, &run, &RunNames::for_scenario(0)).await?;
    for f in &session.policy_outcome().failures {
        eprintln!("palisade-testbed: warning: {f}");
    }
    let socket = opts.dir.join(CONTROL_SOCKET);
    let listener = UnixListener::bind(&socket).map_err(SetupError::io(format!("listening on {}", socket.display())))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
        .map_err(SetupError::io(format!("restricting {}", socket.display())))?;
    // From here on the instance directory is this process's to remove, last.
    let dir_guard = {
        let dir = opts.dir.clone();
        cleanup::register(format!("testbed instance directory {}", dir.display()), move || {
            let _ = std::fs::remove_dir_all(&dir);
        })?
    };
    // Kubernetes mode: the API server on this machine's loopback too, for kubectl.
    let kube = match session.kube_api() {
        Some(api) => {
            let server = crate::kubeapi::KubeApiServer::serve_here(api.clone())?;
            let path = opts.dir.join("kubeconfig");
            std::fs::write(&path, server.kubeconfig())
                .map_err(SetupError::io(format!("writing {}", path.display())))?;
            Some((server, path))
        }
        None => None,
    };
    let mut state = state_of(plan, &session, opts)?;
    state.kubeconfig = kube.as_ref().map(|(_, path)| path.clone());
    state.save(&opts.dir)?;
    eprintln!("palisade-testbed: scenario {} is up as instance {:?}", plan.name, opts.name);

    let requester = serve(&session, &listener).await;
    eprintln!("palisade-testbed: taking instance {:?} down", opts.name);
    drop(listener);
    drop(kube);
    session.down().await;
    dir_guard.release();
    if let Some(mut stream) = requester {
        let _ = reply(&mut stream, &Response::Down).await;
    }
    Ok(())
}

/// The state file's content for a session that is up.
fn state_of(plan: &Plan, session: &Session, opts: &HoldOptions) -> Result<InstanceState, SetupError> {
    let own = |pid: u32, what: &str| {
        ProcRef::of(pid).ok_or_else(|| SetupError::Io {
            what: format!("reading the start time of the {what} (process {pid})"),
            source: std::io::Error::other("no such process"),
        })
    };
    let holder = own(std::process::id(), "testbed")?;
    let agent = session.agent_pid().map(|pid| own(pid, "agent")).transpose()?;
    let topo = session.topology();
    let mut ends: Vec<End> = plan
        .pods
        .iter()
        .zip(&topo.pods)
        .map(|(pod, net)| End { name: pod.key(), netns: net.netns.name().to_string(), ipv4: net.ipv4, ipv6: net.ipv6 })
        .collect();
    for (host, net) in plan.hosts.iter().zip(&topo.hosts) {
        let netns = net.netns.as_ref().unwrap_or(&topo.node_at(net.node).netns);
        let name = match host.host {
            HostRef::Node(k) => format!("node:{}", plan.nodes[k].name),
            ref other => other.to_string(),
        };
        ends.push(End { name, netns: netns.name().to_string(), ipv4: net.ipv4, ipv6: net.ipv6 });
    }
    if plan.nodes_listed {
        for (n, node) in plan.nodes.iter().zip(topo.nodes()) {
            let name = format!("node:{}", n.name);
            if !ends.iter().any(|e| e.name == name) {
                ends.push(End { name, netns: node.netns.name().to_string(), ipv4: node.ipv4, ipv6: node.ipv6 });
            }
        }
    }
    if !ends.iter().any(|e| e.name == "entity:host") {
        let node = &topo.node;
        ends.push(End {
            name: "entity:host".into(),
            netns: node.netns.name().to_string(),
            ipv4: node.ipv4,
            ipv6: node.ipv6,
        });
    }
    let example_probe =
        plan.probes.iter().find(|p| matches!((&p.from, &p.to), (HostRef::Pod(_), HostRef::Pod(_)))).map(|p| {
            let spec = match p.port {
                Some(port) => format!("{port}/{}", p.protocol),
                None => p.protocol.to_string(),
            };
            (p.from_text.clone(), p.to_text.clone(), spec)
        });
    let dirs = session.dirs();
    let mut nodes = Vec::new();
    for (k, node) in plan.nodes.iter().enumerate().skip(1) {
        let d = session.dirs_of(k).expect("every node has directories");
        nodes.push(crate::instance::NodeState {
            name: node.name.clone(),
            netns: topo.node_at(k).netns.name().to_string(),
            agent: session.agent_pid_of(k).map(|pid| own(pid, "agent")).transpose()?,
            api_socket: d.socket.clone(),
            agent_log: session.agent_pid_of(k).map(|_| d.log.clone()),
            run_dir: d.root.clone(),
            bpffs_dir: d.bpffs.clone(),
        });
    }
    Ok(InstanceState {
        name: opts.name.clone(),
        scenario: plan.name.clone(),
        file: plan.file.clone(),
        holder,
        agent,
        api_socket: dirs.socket.clone(),
        policy_dir: dirs.policies.clone(),
        agent_log: session.agent_log().map(Path::to_path_buf),
        run_dir: dirs.root.clone(),
        bpffs_dir: dirs.bpffs.clone(),
        namespaces: session.netns_names(),
        ends,
        example_probe,
        nodes,
        first_node: plan.is_multi_node().then(|| plan.nodes[0].name.clone()),
        kubeconfig: None,
    })
}

/// Serves requests until one asks to go down; returns that requester's connection.
async fn serve(session: &Session, listener: &UnixListener) -> Option<UnixStream> {
    let mut connections = FuturesUnordered::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => connections.push(handle(session, stream)),
                Err(e) => {
                    tracing::warn!(error = %e, "control socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(done) = connections.next(), if !connections.is_empty() => {
                if done.is_some() {
                    return done;
                }
            }
        }
    }
}

/// One request; answers it, except `down`, whose connection is handed back.
async fn handle(session: &Session, stream: UnixStream) -> Option<UnixStream> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let read = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await;
    let mut stream = reader.into_inner();
    let request = match read {
        Ok(Ok(_)) => serde_json::from_str::<Request>(&line).map_err(|e| format!("unreadable request: {e}")),
        Ok(Err(e)) => Err(format!("reading the request: {e}")),
        Err(_) => Err("no request within 10 s".to_string()),
    };
    let response = match request {
        Ok(Request::Down) => return Some(stream),
        Ok(Request::Probe(p)) => probe(session, p).await,
        Err(e) => Response::Error(e),
    };
    let _ = reply(&mut stream, &response).await;
    None
}

async fn reply(stream: &mut UnixStream, response: &Response) -> std::io::Result<()> {
    let mut text = serde_json::to_string(response).expect("responses serialize");
    text.push('\n');
    stream.write_all(text.as_bytes()).await?;
    stream.shutdown().await
}

async fn probe(session: &Session, p: ProbeRequest) -> Response {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let raw = RawProbe {
        from: p.from,
        to: p.to,
        port: p.port,
        protocol: p.protocol,
        icmp_type: None,
        family: p.family,
        expect: Expect::Allow,
    };
    let index = session.plan().probes.len() + NEXT.fetch_add(1, Ordering::Relaxed);
    let probe = match session.plan().extra_probe(&raw, index) {
        Ok(probe) => probe,
        Err(issues) => return Response::Error(issues.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")),
    };
    let r = session.probe(&probe).await;
    Response::Probe(ProbeOutcome {
        from: r.from,
        to: r.to,
        port: r.port,
        protocol: r.protocol,
        family: r.family,
        observed: r.observed.as_str().to_string(),
        decided_by: r.decided_by,
        detail: r.detail,
        ms: r.ms,
        judged_on: r.judged.as_ref().map(crate::report::JudgedOn::text),
    })
}
