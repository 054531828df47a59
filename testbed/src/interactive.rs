//! The developer's commands on a scenario kept up between shell invocations:
//! `up FILE` (starts the holder, waits until the scenario is up, says how to use it),
//! `probe FROM TO PORT/PROTO`, `exec TARGET -- CMD...` (a command inside a pod's or
//! host's network namespace) and `down` (removes everything, also when the holder is gone).
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use crate::cleanup;
use crate::cli::{EXIT_MISMATCH, EXIT_OK, EXIT_SETUP};
use crate::error::SetupError;
use crate::instance::{
    self, HOLDER_FILE, HOLDER_LOG, InstanceState, ProbeOutcome, ProbeRequest, ProcRef, Request, Response,
};
use crate::netns::NETNS_DIR;
use crate::scenario::{self, Expect, IpFamily, ProbeProtocol};

/// How long `up` waits for the scenario (namespaces, agent, registrations, policies).
const UP_TIMEOUT: Duration = Duration::from_mins(3);
/// How long a probe request may take (a probe is bounded by its timeout plus grace).
const PROBE_REQUEST_TIMEOUT: Duration = Duration::from_mins(1);
/// How long `down` waits for the holder to take everything down.
const DOWN_TIMEOUT: Duration = Duration::from_mins(1);

/// `up`'s settings.
#[derive(Clone, Debug)]
pub struct UpOptions {
    pub name: String,
    pub file: PathBuf,
    pub agent: PathBuf,
    pub timeout: Duration,
    /// Kvstore mode (an etcd in the testbed, every agent with `--kvstore`).
    pub kvstore: bool,
    /// Kubernetes mode (the testbed's API server, also on this machine's loopback).
    pub kubernetes: bool,
}

#[allow(clippy::needless_pass_by_value, reason = "the exit path takes the error it reports")]
fn fail(e: SetupError) -> ExitCode {
    eprintln!("palisade-testbed: {e}");
    ExitCode::from(EXIT_SETUP)
}

/// `palisade-testbed up FILE`.
pub fn up(opts: &UpOptions) -> ExitCode {
    match up_inner(opts) {
        Ok(state) => {
            print!("{}", describe(&state));
            ExitCode::from(EXIT_OK)
        }
        Err(e) => fail(e),
    }
}

fn up_inner(opts: &UpOptions) -> Result<InstanceState, SetupError> {
    instance::check_name(&opts.name)?;
    let plan = scenario::load(&opts.file)?;
    let dir = instance::create_dir(&opts.name)?;
    // Until the holder has recorded the state, the directory is ours to remove.
    let dir_guard = {
        let dir = dir.clone();
        cleanup::register(format!("testbed instance directory {}", dir.display()), move || {
            let _ = std::fs::remove_dir_all(&dir);
        })?
    };
    let log_path = dir.join(HOLDER_LOG);
    let log = File::create(&log_path).map_err(SetupError::io(format!("creating {}", log_path.display())))?;
    let log2 = log.try_clone().map_err(SetupError::io("duplicating the log file handle"))?;
    let exe = std::env::current_exe().map_err(SetupError::io("finding this executable"))?;
    let mut cmd = Command::new(&exe);
    cmd.arg("hold")
        .arg("--dir")
        .arg(&dir)
        .arg("--name")
        .arg(&opts.name)
        .arg("--agent")
        .arg(&opts.agent)
        .arg("--timeout-ms")
        .arg(opts.timeout.as_millis().to_string())
        .args(opts.kvstore.then_some("--kvstore"))
        .args(opts.kubernetes.then_some("--kubernetes"))
        .arg(std::path::absolute(&plan.file).unwrap_or_else(|_| plan.file.clone()))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe calls (setsid, sigemptyset, sigprocmask).
    unsafe {
        cmd.pre_exec(|| {
            // Its own session: a terminal closing or Ctrl-C in this shell does not reach it.
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&raw mut none);
            if libc::sigprocmask(libc::SIG_SETMASK, &raw const none, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(SetupError::io(format!("starting {} hold", exe.display())))?;
    let holder = ProcRef::of(child.id());
    if let Some(h) = holder {
        let path = dir.join(HOLDER_FILE);
        std::fs::write(&path, serde_json::to_string(&h).expect("serializes"))
            .map_err(SetupError::io(format!("writing {}", path.display())))?;
    }
    // Interrupted while waiting: the holder takes its own things down on SIGTERM.
    let holder_guard = cleanup::register("the testbed process holding the scenario", move || {
        if let Some(h) = holder {
            h.stop(Duration::from_secs(30));
        }
    })?;
    let deadline = Instant::now() + UP_TIMEOUT;
    loop {
        if let Some(state) = InstanceState::load(&dir)? {
            holder_guard.disarm();
            dir_guard.disarm();
            return Ok(state);
        }
        if let Some(status) = child.try_wait().map_err(SetupError::io("waiting for the testbed process"))? {
            drop(holder_guard);
            let tail = crate::agent::log_tail(&log_path, 40);
            return Err(SetupError::HolderExited { status: status.to_string(), tail });
        }
        if Instant::now() >= deadline {
            let tail = crate::agent::log_tail(&log_path, 40);
            drop(holder_guard);
            let _ = child.wait();
            return Err(SetupError::HolderTimeout { secs: UP_TIMEOUT.as_secs(), tail });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What `up` prints: where things are and how to use them.
fn describe(s: &InstanceState) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let exe = std::env::current_exe().ok();
    let palisade = exe
        .as_ref()
        .and_then(|p| p.parent())
        .map(|d| d.join("palisade"))
        .filter(|p| p.is_file())
        .map_or_else(|| "palisade".to_string(), |p| command_name(&p));
    let testbed = exe.map_or_else(|| "palisade-testbed".into(), |p| command_name(&p));
    let name = if s.name == instance::DEFAULT_NAME { String::new() } else { format!(" --name {}", s.name) };
    let socket = s.api_socket.display();
    let agent = s.agent.map_or_else(|| "none".to_string(), |a| format!("process {}", a.pid));
    let _ = writeln!(out, "scenario {} ({}) is up as testbed instance {:?}", s.scenario, s.file.display(), s.name);
    let _ = writeln!(out, "  testbed process  {} (keeps the pods' listeners; `down` stops it)", s.holder.pid);
    let on = s.first_node.as_ref().map(|n| format!(" (node {n})")).unwrap_or_default();
    let _ = writeln!(
        out,
        "  agent            {agent}{on}, log {}",
        s.agent_log.as_ref().map_or("-".into(), |l| l.display().to_string())
    );
    let _ = writeln!(out, "  API socket       {socket}{on}");
    for n in &s.nodes {
        let agent = n.agent.map_or_else(|| "none".to_string(), |a| format!("process {}", a.pid));
        let _ = writeln!(
            out,
            "  node {}: agent {agent}, log {}, API socket {}, netns {}",
            n.name,
            n.agent_log.as_ref().map_or("-".into(), |l| l.display().to_string()),
            n.api_socket.display(),
            n.netns
        );
    }
    if let Some(kubeconfig) = &s.kubeconfig {
        let _ = writeln!(out, "  kubeconfig       {} (the testbed's API server on 127.0.0.1)", kubeconfig.display());
        let _ = writeln!(
            out,
            "                   (kubectl get/apply/edit/delete policies there: the agents apply changes within a second)"
        );
    } else {
        let _ = writeln!(out, "  policy directory {}", s.policy_dir.display());
        let _ = writeln!(
            out,
            "                   (edit, add or remove manifests there: the agent applies changes within a second)"
        );
    }
    let _ = writeln!(out, "  pods and hosts:");
    let width = s.ends.iter().map(|e| e.name.len()).max().unwrap_or(0);
    for e in &s.ends {
        let addrs: Vec<String> =
            e.ipv4.map(|a| a.to_string()).into_iter().chain(e.ipv6.map(|a| a.to_string())).collect();
        let _ = writeln!(out, "    {:<width$}  {:<32}  netns {}", e.name, addrs.join(" "), e.netns);
    }
    let (from, to, spec) = s.example_probe.clone().unwrap_or_else(|| {
        let pod = s.ends.first().map_or("NS/POD".to_string(), |e| e.name.clone());
        (pod.clone(), pod, "PORT/TCP".into())
    });
    let (port, proto) = match spec.split_once('/') {
        Some((port, proto)) => (format!(" --port {port}"), proto.to_string()),
        None => (String::new(), spec.clone()),
    };
    let _ = writeln!(out, "use it:");
    if let Some(kubeconfig) = &s.kubeconfig {
        let _ = writeln!(out, "  kubectl --kubeconfig {} get nodes,pods -A -o wide", kubeconfig.display());
    }
    let _ = writeln!(out, "  {palisade} --socket {socket} status");
    let _ = writeln!(out, "  {palisade} --socket {socket} endpoint list");
    let _ = writeln!(out, "  {palisade} --socket {socket} observe --verdict DROPPED");
    if s.nodes.is_empty() {
        let _ = writeln!(out, "  {palisade} --socket {socket} ui");
    } else {
        let others = s.nodes.iter().fold(String::new(), |mut o, n| {
            let _ = write!(o, " --agent {}", n.api_socket.display());
            o
        });
        let _ = writeln!(out, "  {palisade} --socket {socket}{others} observe --all-nodes");
        let _ = writeln!(out, "  {palisade} --socket {socket}{others} ui");
    }
    let _ =
        writeln!(out, "  {palisade} --socket {socket} policy explain --from {from} --to {to}{port} --protocol {proto}");
    let _ = writeln!(out, "  {testbed} probe{name} {from} {to} {spec}");
    let _ = writeln!(out, "  {testbed} exec{name} {from} -- ip -brief addr");
    let _ = writeln!(out, "  {testbed} down{name}");
    out
}

/// How to run `binary` from a shell: its bare name if `PATH` finds this very file under
/// it, else its full path.
fn command_name(binary: &Path) -> String {
    let full = binary.display().to_string();
    let Some(name) = binary.file_name() else { return full };
    let same = |p: &Path| std::fs::canonicalize(p).ok() == std::fs::canonicalize(binary).ok();
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).map(|d| d.join(name)).find(|p| p.is_file()))
        .unwrap_or_default();
    match on_path {
        Some(p) if same(&p) => name.to_string_lossy().into_owned(),
        _ => full,
    }
}

/// The instance `name` and its state; an error when it is not up.
fn running(name: &str) -> Result<(PathBuf, InstanceState), SetupError> {
    instance::check_name(name)?;
    let dir = instance::state_root().join(name);
    let state = InstanceState::load(&dir)?.ok_or_else(|| SetupError::NoInstance { name: name.into() })?;
    Ok((dir, state))
}

/// `PORT/PROTO`, `PORT` (TCP), `ICMP` or ICMPv6.
pub fn parse_port_spec(spec: &str) -> Result<(Option<u16>, ProbeProtocol), String> {
    let protocol = |p: &str| match p.to_ascii_uppercase().as_str() {
        "TCP" => Ok(ProbeProtocol::TCP),
        "UDP" => Ok(ProbeProtocol::UDP),
        "SCTP" => Ok(ProbeProtocol::SCTP),
        "ICMP" => Ok(ProbeProtocol::ICMP),
        "ICMPV6" => Ok(ProbeProtocol::ICMPv6),
        _ => Err(format!("{p:?} is not TCP, UDP, SCTP, ICMP or ICMPv6")),
    };
    let port = |p: &str| {
        p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| format!("{p:?} is not a port number (1-65535)"))
    };
    match spec.split_once('/') {
        Some((p, proto)) => Ok((Some(port(p)?), protocol(proto)?)),
        None if spec.bytes().all(|b| b.is_ascii_digit()) => Ok((Some(port(spec)?), ProbeProtocol::TCP)),
        None => match protocol(spec)? {
            p if p.is_icmp() => Ok((None, p)),
            p => Err(format!("{p} needs a port: PORT/{p}")),
        },
    }
}

/// `probe`'s settings.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    pub name: String,
    pub from: String,
    pub to: String,
    pub spec: String,
    pub family: Option<IpFamily>,
    pub expect: Option<Expect>,
    pub json: bool,
}

/// `palisade-testbed probe FROM TO PORT/PROTO`: exit 0 when a verdict was observed (and
/// matches `--expect`), 1 when it does not match or the probe is an error, 2 when it could
/// not be run.
pub fn probe(opts: &ProbeOptions) -> ExitCode {
    let (port, protocol) = match parse_port_spec(&opts.spec) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("palisade-testbed: {e}");
            return ExitCode::from(EXIT_SETUP);
        }
    };
    let result = running(&opts.name).and_then(|(dir, state)| {
        if !state.holder.alive() {
            return Err(SetupError::InstanceGone { name: opts.name.clone() });
        }
        let req = ProbeRequest { from: opts.from.clone(), to: opts.to.clone(), port, protocol, family: opts.family };
        match instance::request(&dir, &Request::Probe(req), PROBE_REQUEST_TIMEOUT)? {
            Response::Probe(o) => Ok(o),
            Response::Error(e) => Err(SetupError::Holder(e)),
            Response::Down => Err(SetupError::Holder("the instance is going down".into())),
        }
    });
    let o = match result {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&o).expect("serializes"));
    } else {
        print!("{}", probe_line(&o));
    }
    let matches = match opts.expect {
        Some(e) => o.observed == e.as_str(),
        None => o.observed != "error",
    };
    ExitCode::from(if matches { EXIT_OK } else { EXIT_MISMATCH })
}

fn probe_line(o: &ProbeOutcome) -> String {
    let spec = match o.port {
        Some(p) => format!("{p}/{}", o.protocol),
        None => o.protocol.clone(),
    };
    let v6 = if o.family == IpFamily::IPv6 { " (IPv6)" } else { "" };
    let mut why = o.detail.clone().unwrap_or_else(|| o.decided_by.clone());
    if let Some(on) = &o.judged_on {
        why = format!("{why} [judged on: {on}]");
    }
    format!("{} -> {} {spec}{v6}: {} ({} ms)\n  {why}\n", o.from, o.to, o.observed, o.ms)
}

/// `palisade-testbed exec TARGET -- CMD...`: runs CMD in TARGET's network namespace (only
/// the network namespace is entered: the mount namespace, /sys included, is the caller's).
/// Replaces this process: CMD's exit status is the command's.
pub fn exec(name: &str, target: &str, command: &[String]) -> ExitCode {
    let (_, state) = match running(name) {
        Ok(v) => v,
        Err(e) => return fail(e),
    };
    let Some(end) = state.end(target) else {
        let known: Vec<&str> = state.ends.iter().map(|e| e.name.as_str()).collect();
        return fail(SetupError::UnknownEnd { name: target.into(), known: known.join(", ") });
    };
    let path = Path::new(NETNS_DIR).join(&end.netns);
    let ns = match File::open(&path) {
        Ok(f) => f,
        Err(e) => return fail(SetupError::Io { what: format!("opening {}", path.display()), source: e }),
    };
    if let Err(e) = nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET) {
        return fail(SetupError::Io { what: format!("entering {}", path.display()), source: e.into() });
    }
    drop(ns);
    let Some((program, args)) = command.split_first() else {
        eprintln!("palisade-testbed: exec needs a command: exec {target} -- CMD [ARGS...]");
        return ExitCode::from(EXIT_SETUP);
    };
    let err = Command::new(program).args(args).exec();
    eprintln!("palisade-testbed: cannot run {program}: {err}");
    ExitCode::from(if err.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 })
}

/// `palisade-testbed down`: asks the holder to take everything down and waits for it; if
/// the holder is gone (or does not answer), removes what the state file lists itself.
pub fn down(name: &str) -> ExitCode {
    if let Err(e) = instance::check_name(name) {
        return fail(e);
    }
    let dir = instance::state_root().join(name);
    if !dir.exists() {
        println!("no testbed instance {name:?} is up: nothing to take down");
        return ExitCode::from(EXIT_OK);
    }
    let state = InstanceState::load(&dir).ok().flatten();
    if let Some(holder) = instance::holder_of(&dir, state.as_ref()).filter(ProcRef::alive) {
        let asked = match &state {
            Some(_) => match instance::request(&dir, &Request::Down, DOWN_TIMEOUT) {
                Ok(Response::Down) => true,
                Ok(other) => {
                    eprintln!("palisade-testbed: unexpected answer to down: {other:?}");
                    false
                }
                Err(e) => {
                    eprintln!("palisade-testbed: {e}; stopping the testbed process {} instead", holder.pid);
                    false
                }
            },
            None => false,
        };
        // Asked: it exits right after answering. Otherwise SIGTERM: its guards remove
        // everything it made.
        let exited = asked && holder.wait_gone(Duration::from_secs(10));
        if !exited && !holder.stop(DOWN_TIMEOUT) {
            eprintln!("palisade-testbed: the testbed process {} does not exit", holder.pid);
        }
    }
    let (removed, failed) = instance::sweep(&dir, state.as_ref());
    for r in &removed {
        println!("removed {r} (left behind)");
    }
    for f in &failed {
        eprintln!("palisade-testbed: could not remove {f}");
    }
    if failed.is_empty() {
        println!("testbed instance {name:?} is down");
        ExitCode::from(EXIT_OK)
    } else {
        ExitCode::from(EXIT_SETUP)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_specs() {
        assert_eq!(parse_port_spec("8080/TCP").unwrap(), (Some(8080), ProbeProtocol::TCP));
        assert_eq!(parse_port_spec("53/udp").unwrap(), (Some(53), ProbeProtocol::UDP));
        assert_eq!(parse_port_spec("80").unwrap(), (Some(80), ProbeProtocol::TCP));
        assert_eq!(parse_port_spec("ICMP").unwrap(), (None, ProbeProtocol::ICMP));
        assert_eq!(parse_port_spec("icmpv6").unwrap(), (None, ProbeProtocol::ICMPv6));
        assert!(parse_port_spec("TCP").is_err());
        assert!(parse_port_spec("0/TCP").is_err());
        assert!(parse_port_spec("80/HTTP").is_err());
    }
}
