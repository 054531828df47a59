//! Helpers shared by the testbed's integration tests: running the binary, finding what a
//! run left behind.
#![allow(dead_code, reason = "each test crate uses a different part")]
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_palisade-testbed");

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/scenarios").join(name)
}

/// The agent binary the tests run: $PALISADE_AGENT, else the one built beside the testbed.
pub fn agent_binary() -> PathBuf {
    std::env::var_os("PALISADE_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(BIN).with_file_name("palisade-agent"))
}

/// Starts `palisade-testbed ARGS...` with piped output.
pub fn spawn(args: &[&str]) -> Child {
    Command::new(BIN).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("palisade-testbed starts")
}

/// Runs `palisade-testbed ARGS...`; returns its PID (the run's names derive from it) and output.
pub fn run(args: &[&str]) -> (u32, Output) {
    let child = spawn(args);
    let pid = child.id();
    (pid, child.wait_with_output().expect("palisade-testbed runs"))
}

/// Everything named after run `pid` that still exists: network namespaces `pt<pid>-*`,
/// bpffs pin directories and temporary directories `palisade-testbed-<pid>-*`.
pub fn leftovers(pid: u32) -> Vec<String> {
    let mut left = Vec::new();
    let ns_prefix = format!("pt{pid}-");
    let dir_prefix = format!("palisade-testbed-{pid}-");
    for (dir, prefix) in [
        (PathBuf::from("/var/run/netns"), &ns_prefix),
        (PathBuf::from("/sys/fs/bpf"), &dir_prefix),
        (std::env::temp_dir(), &dir_prefix),
    ] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(prefix.as_str()) {
                    left.push(dir.join(name).display().to_string());
                }
            }
        }
    }
    left
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// What [`probe_continuously`] saw.
#[derive(Default, Debug)]
pub struct Tally {
    pub rounds: usize,
    pub allowed_ok: usize,
    pub denied_ok: usize,
    pub wrong: Vec<String>,
}

/// Probes server:80 (must connect) and server:81 (must get no answer) from the namespace
/// `ns` until `stop`, at most `max_rounds` rounds and `max_time`.
pub fn probe_continuously(
    ns: std::fs::File,
    server: std::net::IpAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    max_rounds: usize,
    max_time: std::time::Duration,
) -> Tally {
    use palisade_testbed::probe::{self, Attempt};
    use std::net::SocketAddr;
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};
    palisade_testbed::netns::run_in(ns, move || {
        let mut t = Tally::default();
        let start = Instant::now();
        while !stop.load(Ordering::Relaxed) && t.rounds < max_rounds && start.elapsed() < max_time {
            t.rounds += 1;
            let allowed = probe::tcp(SocketAddr::new(server, 80), Duration::from_millis(1000));
            match allowed.attempt {
                Attempt::Answered => t.allowed_ok += 1,
                other => t.wrong.push(format!("round {}: port 80 (allowed): {other:?}", t.rounds)),
            }
            let denied = probe::tcp(SocketAddr::new(server, 81), Duration::from_millis(150));
            match denied.attempt {
                Attempt::NoAnswer => t.denied_ok += 1,
                other => t.wrong.push(format!("round {}: port 81 (denied): {other:?}", t.rounds)),
            }
        }
        t
    })
    .expect("probing runs in the client's namespace")
}
