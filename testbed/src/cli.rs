//! The `palisade-testbed` command line: `run` (build, probe, report), `check` (validate
//! scenario files only), `up` / `probe` / `exec` / `down` (a scenario kept up between
//! commands, see [`crate::interactive`]) and `cleanup`. Exit codes: 0 every probe matched,
//! 1 some did not, 2 invalid scenario, unexpected manifest rejection or setup failure.
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::report::{self, ScenarioReport};
use crate::runner::{self, RunNames, RunOptions};
use crate::scenario::{self, Expect, IpFamily, Plan};

#[derive(Parser, Debug)]
#[command(
    name = "palisade-testbed",
    version,
    about = "Runs policy scenarios against the real palisade agent in network namespaces"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Build each scenario out of network namespaces, run the agent, probe, report.
    Run(RunArgs),
    /// Only parse and validate scenario files.
    Check(CheckArgs),
    /// Bring a scenario up and keep it (agent, pods, listeners) for `probe`, `exec`, the
    /// `palisade` CLI and policy edits, until `down`.
    Up(UpArgs),
    /// Probe a flow of the instance that is up: FROM TO PORT/PROTO (e.g. `default/frontend
    /// default/backend 8080/TCP`; `ICMP` or `ICMPv6` without a port).
    Probe(ProbeArgs),
    /// Run a command inside the network namespace of a pod (`NS/POD`) or host (`node`,
    /// `entity:NAME`, a world host's address) of the instance that is up.
    Exec(ExecArgs),
    /// Take the instance down: stop its agent and remove every namespace, pin and directory
    /// (also when the process that brought it up is gone).
    Down(NameArgs),
    /// Remove what runs killed outright (SIGKILL) left behind: namespaces `pt<pid>-*` and
    /// directories `palisade-testbed-<pid>-*` of processes that no longer exist, and
    /// instances whose testbed process is gone.
    Cleanup,
    /// The process that holds an instance up (started by `up`).
    #[command(hide = true)]
    Hold(HoldArgs),
}

#[derive(Args, Debug)]
pub struct NameArgs {
    /// The instance (several can be up at once under different names).
    #[arg(long, default_value = crate::instance::DEFAULT_NAME)]
    pub name: String,
}

#[derive(Args, Debug)]
pub struct UpArgs {
    #[command(flatten)]
    pub instance: NameArgs,
    /// How long a probe waits for its answer, in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..=30_000))]
    pub timeout_ms: u64,
    /// The agent binary (default: palisade-agent next to this executable).
    #[arg(long, env = "PALISADE_AGENT")]
    pub agent: Option<PathBuf>,
    /// Kvstore mode: start an etcd in the testbed (in the first node's namespace, on its
    /// address) and run every agent with `--kvstore etcd`: identities, pods and nodes are
    /// shared through it instead of the remote endpoints files. See docs/cluster.md.
    #[arg(long)]
    pub kvstore: bool,
    /// Kubernetes mode: the agents read the scenario from the testbed's API server, which
    /// also listens on 127.0.0.1 of this machine for `kubectl` (`up` prints the
    /// kubeconfig). See docs/kubernetes.md.
    #[arg(long)]
    pub kubernetes: bool,
    /// The scenario file.
    pub file: PathBuf,
}

#[derive(Args, Debug)]
pub struct ProbeArgs {
    #[command(flatten)]
    pub instance: NameArgs,
    /// IPv4 or IPv6 addresses of the pods (default: IPv4, or the world host's family).
    #[arg(long, value_parser = ["IPv4", "IPv6"])]
    pub family: Option<String>,
    /// Exit 1 unless the probe observes this (`allow`, `deny`, or `audit`: passed with an AUDIT verdict).
    #[arg(long, value_parser = ["allow", "deny", "audit"])]
    pub expect: Option<String>,
    /// The result as JSON.
    #[arg(long)]
    pub json: bool,
    /// `NS/POD`, `entity:NAME` or a world host's address of the scenario.
    pub from: String,
    pub to: String,
    /// `PORT/PROTO` (`8080/TCP`, `53/UDP`, `9/SCTP`), `PORT` (TCP), `ICMP` or `ICMPv6`.
    pub port: String,
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    #[command(flatten)]
    pub instance: NameArgs,
    /// `NS/POD`, `node`, `entity:NAME` or a world host's address.
    pub target: String,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct HoldArgs {
    #[arg(long)]
    pub dir: PathBuf,
    #[arg(long)]
    pub name: String,
    #[arg(long)]
    pub agent: PathBuf,
    #[arg(long)]
    pub timeout_ms: u64,
    #[arg(long)]
    pub kvstore: bool,
    #[arg(long)]
    pub kubernetes: bool,
    pub file: PathBuf,
}

#[derive(Args, Debug)]
#[allow(clippy::struct_excessive_bools, reason = "command-line switches")]
pub struct RunArgs {
    /// One JSON document on stdout instead of the truth tables.
    #[arg(long)]
    pub json: bool,
    /// How long a probe waits for its answer, in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..=30_000))]
    pub timeout_ms: u64,
    /// The agent binary (default: palisade-agent next to this executable).
    #[arg(long, env = "PALISADE_AGENT")]
    pub agent: Option<PathBuf>,
    /// Keep each scenario's temporary directory (agent log, policy files) and say where.
    #[arg(long)]
    pub keep_logs: bool,
    /// Run the agents in Kubernetes mode: the testbed serves the scenario's nodes,
    /// namespaces, pods and policies from its own API server (list/watch; reached on
    /// 127.0.0.1 in every node's namespace), each node's agent enforces the pods of its
    /// node and finds their interfaces by their routes. With --kvstore too, identities are
    /// shared through etcd; without, they are node-local. See docs/kubernetes.md.
    #[arg(long)]
    pub kubernetes: bool,
    /// With --kubernetes: plumb the pods with the palisade-cni plugin (next to the agent
    /// binary), called as a container runtime calls it, instead of wiring them directly.
    #[arg(long, requires = "kubernetes")]
    pub cni: bool,
    /// Kvstore mode: start an etcd in the testbed (in the first node's namespace, on its
    /// address) and run every agent with `--kvstore etcd`: identities, pods and nodes are
    /// shared through it instead of the remote endpoints files. See docs/cluster.md.
    #[arg(long)]
    pub kvstore: bool,
    /// Print, per probe, the flow records the agents emitted for it; the "decided by"
    /// column comes from them, and a record that disagrees with the verdict events fails
    /// the probe.
    #[arg(long, conflicts_with = "no_agent")]
    pub flows: bool,
    /// Debug the testbed's own plumbing: no agent, no policies, every probe must connect.
    #[arg(long, hide = true)]
    pub no_agent: bool,
    /// Scenario files.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Scenario files.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

pub const EXIT_OK: u8 = 0;
pub const EXIT_MISMATCH: u8 = 1;
pub const EXIT_SETUP: u8 = 2;

/// Loads every file; prints every problem. `None` if any file is invalid.
fn load_all(files: &[PathBuf]) -> Option<Vec<Plan>> {
    let mut plans = Vec::new();
    let mut ok = true;
    for f in files {
        match scenario::load(f) {
            Ok(p) => plans.push(p),
            Err(e) => {
                eprintln!("palisade-testbed: {e}");
                ok = false;
            }
        }
    }
    ok.then_some(plans)
}

pub fn check(args: &CheckArgs) -> ExitCode {
    let Some(plans) = load_all(&args.files) else { return ExitCode::from(EXIT_SETUP) };
    for p in plans {
        println!(
            "{}: {} ok ({}{} namespaces, {} pods, {} policies, {} probes)",
            p.file.display(),
            p.name,
            if p.is_multi_node() { format!("{} nodes, ", p.nodes.len()) } else { String::new() },
            p.namespaces.len(),
            p.pods.len(),
            p.policies.len(),
            p.probes.len()
        );
    }
    ExitCode::from(EXIT_OK)
}

pub fn up(args: &UpArgs) -> ExitCode {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("palisade-testbed: up needs root (network namespaces, eBPF)");
        return ExitCode::from(EXIT_SETUP);
    }
    let agent = args.agent.clone().unwrap_or_else(default_agent);
    if !agent.is_file() {
        eprintln!("palisade-testbed: {}", crate::error::SetupError::AgentMissing { path: agent });
        return ExitCode::from(EXIT_SETUP);
    }
    crate::interactive::up(&crate::interactive::UpOptions {
        name: args.instance.name.clone(),
        file: args.file.clone(),
        agent: absolute(&agent),
        timeout: Duration::from_millis(args.timeout_ms),
        kvstore: args.kvstore,
        kubernetes: args.kubernetes,
    })
}

pub fn probe(args: &ProbeArgs) -> ExitCode {
    let family = args.family.as_deref().map(|f| if f == "IPv6" { IpFamily::IPv6 } else { IpFamily::IPv4 });
    let expect = args.expect.as_deref().map(|e| match e {
        "deny" => Expect::Deny,
        "audit" => Expect::Audit,
        _ => Expect::Allow,
    });
    crate::interactive::probe(&crate::interactive::ProbeOptions {
        name: args.instance.name.clone(),
        from: args.from.clone(),
        to: args.to.clone(),
        spec: args.port.clone(),
        family,
        expect,
        json: args.json,
    })
}

pub fn hold(args: &HoldArgs) -> ExitCode {
    crate::hold::hold(&crate::hold::HoldOptions {
        dir: args.dir.clone(),
        name: args.name.clone(),
        file: args.file.clone(),
        agent: args.agent.clone(),
        timeout: Duration::from_millis(args.timeout_ms),
        kvstore: args.kvstore,
        kubernetes: args.kubernetes,
    })
}

pub fn cleanup() -> ExitCode {
    let mut code = EXIT_OK;
    for (dir, state) in crate::instance::abandoned() {
        let (removed, failed) = crate::instance::sweep(&dir, state.as_ref());
        for r in removed {
            println!("removed {r}");
        }
        for f in &failed {
            eprintln!("palisade-testbed: could not remove {f}");
            code = EXIT_SETUP;
        }
    }
    let found = crate::stale::find();
    if found.is_empty() {
        if code != EXIT_OK {
            return ExitCode::from(code);
        }
        println!("nothing left behind by earlier runs");
        return ExitCode::from(EXIT_OK);
    }
    let failed = crate::stale::remove(&found);
    for l in &found {
        if !failed.iter().any(|(f, _)| f == l) {
            println!("removed {l}");
        }
    }
    for (l, why) in &failed {
        eprintln!("palisade-testbed: could not remove {l}: {why}");
    }
    ExitCode::from(if failed.is_empty() { EXIT_OK } else { EXIT_SETUP })
}

/// The default agent: `palisade-agent` next to this executable.
fn default_agent() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("palisade-agent")))
        .unwrap_or_else(|| PathBuf::from("palisade-agent"))
}

pub fn run(args: &RunArgs) -> ExitCode {
    let mut reports: Vec<ScenarioReport> = Vec::new();
    let code = run_inner(args, &mut reports);
    if args.json {
        println!("{}", report::json(&reports));
    } else if code != EXIT_SETUP || !reports.is_empty() {
        println!("{}", report::summary(&reports));
    }
    ExitCode::from(code)
}

fn run_inner(args: &RunArgs, reports: &mut Vec<ScenarioReport>) -> u8 {
    let Some(plans) = load_all(&args.files) else { return EXIT_SETUP };
    if !nix::unistd::geteuid().is_root() {
        eprintln!("palisade-testbed: run needs root (network namespaces, eBPF)");
        return EXIT_SETUP;
    }
    let agent = if args.no_agent {
        None
    } else {
        let path = args.agent.clone().unwrap_or_else(default_agent);
        if !path.is_file() {
            eprintln!("palisade-testbed: {}", crate::error::SetupError::AgentMissing { path });
            return EXIT_SETUP;
        }
        Some(absolute(&path))
    };
    let opts = RunOptions {
        timeout: Duration::from_millis(args.timeout_ms),
        agent,
        agent_args: Vec::new(),
        keep_logs: args.keep_logs,
        kubernetes: args.kubernetes,
        cni: None,
        kvstore: args.kvstore,
        flows: args.flows,
    };
    let mut opts = opts;
    if args.cni {
        let plugin = opts.agent.as_deref().map(|a| a.with_file_name("palisade-cni"));
        match plugin {
            Some(p) if p.is_file() => opts.cni = Some(p),
            _ => {
                eprintln!("palisade-testbed: --cni needs palisade-cni next to the agent binary (cargo build --bins)");
                return EXIT_SETUP;
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("palisade-testbed: cannot start the async runtime: {e}");
            return EXIT_SETUP;
        }
    };
    let mut code = EXIT_OK;
    for (i, plan) in plans.iter().enumerate() {
        let names = RunNames::for_scenario(i);
        match runtime.block_on(runner::run_scenario(plan, &opts, &names)) {
            Ok(r) => {
                if !args.json {
                    print!("{}", report::table(&r));
                    println!();
                }
                if !r.ok() {
                    code = EXIT_MISMATCH;
                }
                reports.push(r);
            }
            Err(e) => {
                if !crate::cleanup::terminating() {
                    eprintln!("palisade-testbed: scenario {} ({}): {e}", plan.name, plan.file.display());
                }
                return EXIT_SETUP;
            }
        }
    }
    code
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}
