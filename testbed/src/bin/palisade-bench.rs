//! `palisade-bench`: palisade beside iptables and nftables, the agent's memory and the
//! control plane at scale, in one run on this machine (see docs/benchmarks.md). Run as
//! root: `sudo target/release/palisade-bench [--quick] [--json PATH] [--svg PATH]`.
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use palisade_testbed::bench::{self, Report, Size};
use palisade_testbed::cleanup;

#[derive(Parser, Debug)]
#[command(name = "palisade-bench", about = "palisade against iptables and nftables: datapath, memory, control plane")]
struct Args {
    /// CI size: every figure, small counts (well under 5 minutes).
    #[arg(long)]
    quick: bool,
    /// Where to write the figures as JSON [default: $CARGO_TARGET_DIR/palisade-bench/<size>.json,
    /// else target/palisade-bench/<size>.json].
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write the plot (SVG) here.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// The agent binary [default: palisade-agent beside this binary].
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Parts to run (comma-separated): datapath, memory, control, cluster [default: all].
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Node counts of the cluster part (comma-separated) [default: quick 2,3; full 2,5,10].
    #[arg(long, value_delimiter = ',')]
    cluster_nodes: Vec<usize>,
    /// Size of the agent-at-scale part only (quick: 100 endpoints, 1,000 identities, 100
    /// policies; full: 1,000, 10,000, 1,000) [default: the run's size].
    #[arg(long, value_parser = ["quick", "full"])]
    agent_scale: Option<String>,
    /// Only write the plot (`--svg`) of an earlier run's JSON, measure nothing.
    #[arg(long, requires = "svg")]
    plot_from: Option<PathBuf>,
    /// Internal: one step of the resolution scaling curve, in this fresh process.
    #[arg(long, hide = true)]
    resolve_step: Option<usize>,
    #[arg(long, hide = true, default_value_t = 1)]
    runs: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(k) = args.resolve_step {
        return match bench::control::resolve_step(k, args.runs) {
            Ok((ms, entries, kib)) => {
                println!("{ms} {entries} {kib}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("palisade-bench: resolve step {k}: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let (Some(from), Some(svg)) = (&args.plot_from, &args.svg) {
        let report: Result<Report, String> = std::fs::read_to_string(from)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()));
        return match report.and_then(|r| std::fs::write(svg, bench::svg::report_plot(&r)).map_err(|e| e.to_string())) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("palisade-bench: plotting {}: {e}", from.display());
                ExitCode::FAILURE
            }
        };
    }
    // Before any other thread exists: Ctrl-C and SIGTERM then remove what the run made.
    if let Err(e) = cleanup::install_signal_handler() {
        eprintln!("palisade-bench: cannot install the signal handler: {e}");
        return ExitCode::from(2);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PALISADE_BENCH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let code = run(&args);
    cleanup::finish();
    code
}

fn run(args: &Args) -> ExitCode {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("palisade-bench: needs root (network namespaces, eBPF, firewall rules inside its own namespaces)");
        return ExitCode::from(2);
    }
    let size = if args.quick { Size::Quick } else { Size::Full };
    let parts: Vec<&str> = if args.only.is_empty() {
        vec!["datapath", "memory", "control", "cluster"]
    } else {
        args.only.iter().map(String::as_str).collect()
    };
    let agent = args.agent.clone().unwrap_or_else(bench::memory::default_agent_binary);
    let json = args.json.clone().unwrap_or_else(|| {
        let base = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from);
        base.join("palisade-bench").join(format!("{}.json", if args.quick { "quick" } else { "full" }))
    });
    let start = Instant::now();
    let mut report = Report::new(size);
    println!(
        "palisade-bench ({size:?}): {} CPUs, kernel {}, load average {}",
        report.machine.nproc, report.machine.kernel, report.machine.loadavg_start
    );
    for part in &parts {
        let t = Instant::now();
        println!("== {part}");
        match *part {
            "datapath" => bench::datapath::run(&mut report, size),
            "memory" => bench::memory::run(&mut report, &agent),
            "cluster" => bench::cluster::run(&mut report, size, &agent, &args.cluster_nodes),
            "control" => {
                bench::control::scaling(&mut report, size);
                bench::control::map_writes(&mut report, size);
                let agent_size = match args.agent_scale.as_deref() {
                    Some("quick") => Size::Quick,
                    Some(_) => Size::Full,
                    None => size,
                };
                bench::control::agent_scale(&mut report, agent_size, &agent);
            }
            other => report.failures.push(format!("unknown part {other:?} (datapath, memory, control, cluster)")),
        }
        println!("   ({part}: {:.1} s)", t.elapsed().as_secs_f64());
        if cleanup::terminating() {
            break;
        }
    }
    report.seconds = start.elapsed().as_secs_f64();
    report.machine.loadavg_end = bench::loadavg();
    println!("\n{}", report.table());
    let mut code = ExitCode::SUCCESS;
    if let Err(e) = report.write_json(&json) {
        eprintln!("palisade-bench: writing {}: {e}", json.display());
        code = ExitCode::FAILURE;
    } else {
        println!("figures written to {}", json.display());
    }
    if let Some(svg) = &args.svg {
        match std::fs::write(svg, bench::svg::report_plot(&report)) {
            Ok(()) => println!("plot written to {}", svg.display()),
            Err(e) => {
                eprintln!("palisade-bench: writing {}: {e}", svg.display());
                code = ExitCode::FAILURE;
            }
        }
    }
    for f in &report.failures {
        eprintln!("palisade-bench: FAILED: {f}");
    }
    if !report.failures.is_empty() {
        code = ExitCode::FAILURE;
    }
    println!("total {:.1} s", report.seconds);
    code
}
