//! palisade's network-namespace testbed: builds a scenario's pods out of network
//! namespaces on one machine, runs the real agent binary against them, sends real packets,
//! and checks every verdict against the scenario (see docs/scenario-format.md).
//!
//! Modules, in the order a run uses them:
//! - [`scenario`]: the file format, parsing with key paths, validation, the resolved plan
//!   (the `palisade-scenario` crate, shared with `palisade policy explain --scenario`);
//! - [`cleanup`]: removal of everything a run creates, on any exit (guards + signals);
//! - [`netns`], [`topology`]: namespaces, veth pairs, routes;
//! - [`listen`]: what hosts listen on (and SCTP captures); [`probe`]: TCP, UDP, ICMP,
//!   ICMPv6 and SCTP probes;
//! - [`agent`]: the agent process and what it is told; [`events`]: its verdict events;
//!   [`explain_check`]: every probe's verdict compared with the agent's `policy explain`;
//! - [`session`]: a scenario brought up, probed (concurrently), edited, taken down;
//! - [`runner`]: one scenario end to end; [`report`]: truth tables and JSON; [`cli`];
//! - [`instance`], [`hold`]: a scenario kept up between commands (`up`, `probe`, `exec`,
//!   `down`): its state file and the process that holds it;
//! - [`stale`]: leftovers of runs that were killed outright;
//! - [`bench`]: `palisade-bench`, palisade beside iptables and nftables, memory, control plane.
pub mod agent;
pub mod bench;
pub mod cleanup;
pub mod cli;
pub mod error;
pub mod events;
pub mod explain_check;
pub mod flow_check;
pub mod hold;
pub mod instance;
pub mod interactive;
pub mod kubeapi;
pub mod kvstore;
pub mod listen;
pub mod netns;
pub mod probe;
pub mod report;
pub mod runner;
pub mod session;
pub mod stale;
pub mod topology;

pub use palisade_scenario as scenario;

use std::process::ExitCode;

use clap::Parser;

/// The whole program: parse the command line, run, clean up, exit code.
pub fn main() -> ExitCode {
    let args = cli::Cli::parse();
    // `exec` becomes the command it runs: no signal handling or threads of its own.
    if let cli::Command::Exec(a) = &args.command {
        return interactive::exec(&a.instance.name, &a.target, &a.command);
    }
    // Before any other thread exists, so that every thread inherits the blocked signals.
    if let Err(e) = cleanup::install_signal_handler() {
        eprintln!("palisade-testbed: cannot install the signal handler: {e}");
        return ExitCode::from(cli::EXIT_SETUP);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PALISADE_TESTBED_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let code = match &args.command {
        cli::Command::Run(a) => cli::run(a),
        cli::Command::Check(a) => cli::check(a),
        cli::Command::Up(a) => cli::up(a),
        cli::Command::Probe(a) => cli::probe(a),
        cli::Command::Exec(_) => unreachable!("handled above"),
        cli::Command::Down(a) => interactive::down(&a.name),
        cli::Command::Cleanup => cli::cleanup(),
        cli::Command::Hold(a) => cli::hold(a),
    };
    cleanup::finish();
    code
}
