//! Datapath against the alternatives: the same traffic through the same veth pair with no
//! filter, palisade, iptables (legacy and nf_tables backends) and nftables, at several rule
//! counts, each figure also as a ratio to the no-filter baseline of the same size.
//!
//! Every (mode, size) gets a fresh set of namespaces, so no state (conntrack tables,
//! netfilter hooks, which stay registered in a namespace once a rule needed them) carries
//! from one mode to the next. Rounds run the modes in rotated order, and each figure is the
//! median over rounds, so slow drift of a shared machine spreads over all modes.
use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use super::filters::{self, Mode, PORT};
use super::net::BenchNet;
use super::traffic;
use super::{Report, Size, median};

/// Rule counts (peers) of the comparison.
pub const SIZES: [usize; 3] = [10, 1_000, 10_000];

/// Counts and durations of one size of run.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    pub rounds: usize,
    pub rr_warmup: usize,
    pub rr_count: usize,
    pub crr_warmup: usize,
    pub crr_count: usize,
    pub stream: Duration,
}

impl Params {
    pub fn of(size: Size) -> Params {
        match size {
            Size::Quick => Params {
                rounds: 1,
                rr_warmup: 100,
                rr_count: 1_000,
                crr_warmup: 20,
                crr_count: 150,
                stream: Duration::from_millis(500),
            },
            Size::Full => Params {
                rounds: 3,
                rr_warmup: 500,
                rr_count: 10_000,
                crr_warmup: 100,
                crr_count: 1_500,
                stream: Duration::from_secs(2),
            },
        }
    }
}

/// The measured quantities, in figure-name order.
const METRICS: [(&str, &str); 6] = [
    ("udp_rr_p50", "us"),
    ("udp_rr_p99", "us"),
    ("tcp_crr_p50", "us"),
    ("tcp_crr_p99", "us"),
    ("udp_stream_pps", "packets/s"),
    ("install_ms", "ms"),
];

fn key(mode: Mode, n: usize) -> String {
    format!("datapath.{}.n{n}", mode.name())
}

/// Every figure name of this part.
pub fn figure_names(_size: Size) -> Vec<String> {
    let mut v = Vec::new();
    for n in SIZES {
        for mode in Mode::ALL {
            for (m, _) in METRICS {
                v.push(format!("{}.{m}", key(mode, n)));
            }
            if mode != Mode::Baseline {
                for (m, _) in &METRICS[..5] {
                    v.push(format!("{}.{m}_ratio", key(mode, n)));
                }
            }
        }
        v.push(format!("datapath.n{n}.tcp_crr_p50_iptables_over_palisade"));
    }
    v
}

/// One (mode, size) measured once.
#[derive(Clone, Copy, Debug)]
struct Sample {
    values: [f64; 6],
}

fn measure_once(mode: Mode, n: usize, p: &Params, tag: &str) -> Result<Sample, String> {
    let prefix = format!("pt{}-{tag}", std::process::id());
    let net = BenchNet::build(&prefix, filters::client_addr(n)).map_err(|e| e.to_string())?;
    let allows = filters::rules(n);
    let (installed, install) = filters::install(mode, &net, &allows, tag)?;
    let install_ms = install.as_secs_f64() * 1e3;
    let server = SocketAddrV4::new(net.server_addr, PORT);

    let rr = {
        let _echo = traffic::udp_echo(&net.server, PORT)?;
        traffic::udp_rr(&net.client, server, p.rr_warmup, p.rr_count)?
    };
    let crr = {
        let _tcp = traffic::tcp_echo(&net.server, PORT)?;
        traffic::tcp_crr(&net.client, server, p.crr_warmup, p.crr_count)?
    };
    let stream = {
        let sink = traffic::udp_sink(&net.server, PORT)?;
        traffic::udp_stream(&net.client, &sink, server, p.stream)?
    };
    if let filters::Installed::Palisade(f) = &installed {
        check_palisade_saw_traffic(f)?;
    }
    drop(installed);
    drop(net);
    Ok(Sample { values: [rr.p(50.0), rr.p(99.0), crr.p(50.0), crr.p(99.0), stream.received_pps, install_ms] })
}

/// The palisade numbers are only palisade's if its programs saw the packets and allowed
/// them by policy: check the counters.
fn check_palisade_saw_traffic(f: &filters::PalisadeFilter) -> Result<(), String> {
    let maps = f.maps.as_ref().ok_or("no maps")?;
    let totals = maps.sum_counters().map_err(|e| e.to_string())?;
    let allowed = totals.get(palisade_common::reason::ALLOWED_BY_POLICY, palisade_common::direction::INGRESS);
    if allowed.packets == 0 {
        return Err("palisade's programs allowed no packet by policy: they were not in the path".into());
    }
    if totals.dropped_packets() != 0 {
        return Err(format!("palisade dropped {} packets of allowed traffic", totals.dropped_packets()));
    }
    Ok(())
}

/// Runs the comparison and adds its figures to `report`.
pub fn run(report: &mut Report, size: Size) {
    let p = Params::of(size);
    println!(
        "datapath: {} rounds x sizes {:?} x {} modes (UDP RR {} requests, TCP CRR {} connections, stream {:?})",
        p.rounds,
        SIZES,
        Mode::ALL.len(),
        p.rr_count,
        p.crr_count,
        p.stream
    );
    let mut samples: BTreeMap<(usize, Mode), Vec<Sample>> = BTreeMap::new();
    let mut k = 0;
    for round in 0..p.rounds {
        for n in SIZES {
            for i in 0..Mode::ALL.len() {
                let mode = Mode::ALL[(i + round) % Mode::ALL.len()];
                k += 1;
                let t = Instant::now();
                match measure_once(mode, n, &p, &format!("b{k}")) {
                    Ok(s) => {
                        eprintln!(
                            "  round {} n={n:<6} {:<13} rr p50 {:>7.1} us  crr p50 {:>7.1} us  stream {:>8.0} pps  ({:.1} s)",
                            round + 1,
                            mode.name(),
                            s.values[0],
                            s.values[2],
                            s.values[4],
                            t.elapsed().as_secs_f64()
                        );
                        samples.entry((n, mode)).or_default().push(s);
                    }
                    Err(e) => report.failures.push(format!("datapath {} n={n} round {}: {e}", mode.name(), round + 1)),
                }
            }
        }
    }
    let ctx = |m: &str, n: usize| {
        let what = match m {
            "udp_rr_p50" | "udp_rr_p99" => format!(
                "UDP request/response round trip, {} B, one flow, {} requests after {} warm-up",
                traffic::MESSAGE,
                p.rr_count,
                p.rr_warmup
            ),
            "tcp_crr_p50" | "tcp_crr_p99" => format!(
                "TCP connect + {} B request + response + close, a new flow each, {} connections after {} warm-up",
                traffic::MESSAGE,
                p.crr_count,
                p.crr_warmup
            ),
            "udp_stream_pps" => format!(
                "UDP datagrams of {} B received by the server per second, one sender thread, {:?} stream",
                traffic::MESSAGE,
                p.stream
            ),
            _ => "time to put the rule set in place: palisade's map writes (programs already loaded), the whole iptables-restore or nft -f".to_string(),
        };
        format!("{what}; {n} peers in the rule set, client last; median of {} rounds", p.rounds)
    };
    let med = |n: usize, mode: Mode, i: usize| -> f64 {
        samples.get(&(n, mode)).map(|v| median(&v.iter().map(|s| s.values[i]).collect::<Vec<_>>())).unwrap_or(f64::NAN)
    };
    for n in SIZES {
        for mode in Mode::ALL {
            if !samples.contains_key(&(n, mode)) {
                continue;
            }
            for (i, (m, unit)) in METRICS.iter().enumerate() {
                report.push(format!("{}.{m}", key(mode, n)), med(n, mode, i), unit, ctx(m, n));
            }
            if mode != Mode::Baseline && samples.contains_key(&(n, Mode::Baseline)) {
                for (i, (m, _)) in METRICS[..5].iter().enumerate() {
                    let r = med(n, mode, i) / med(n, Mode::Baseline, i);
                    let dir = if i == 4 { "below 1 is slower" } else { "above 1 is slower" };
                    report.push(
                        format!("{}.{m}_ratio", key(mode, n)),
                        r,
                        "x baseline",
                        format!("{} over the no-filter baseline of the same size ({dir}); {}", mode.name(), ctx(m, n)),
                    );
                }
            }
        }
        if samples.contains_key(&(n, Mode::Iptables)) && samples.contains_key(&(n, Mode::Palisade)) {
            report.push(
                format!("datapath.n{n}.tcp_crr_p50_iptables_over_palisade"),
                med(n, Mode::Iptables, 2) / med(n, Mode::Palisade, 2),
                "x",
                format!(
                    "iptables (legacy) TCP CRR p50 over palisade's; above 1: palisade ahead; {}",
                    ctx("tcp_crr_p50", n)
                ),
            );
        }
    }
}
