//! Datapath against the alternatives: the same traffic through the same veth pair with no
//! filter, palisade, palisade's hooks alone (a diagnostic), iptables (legacy and `nf_tables`
//! backends) and nftables, at several rule counts, each figure also as a ratio to the
//! no-filter baseline of the same size.
//!
//! Per size, every mode gets namespaces of its own, built once and kept for all rounds of
//! that size, so no state (conntrack tables, netfilter hooks, which stay registered in a
//! namespace once a rule needed them) leaks from one mode to another. The rounds are short
//! and interleave the modes (rotated order, reversed every other round), so the baseline
//! and each filter are measured seconds apart. Each ratio is the median over rounds of the
//! ratio to the baseline of the same round (paired rounds), reported with its spread: the
//! minimum, the maximum and a distribution-free 95% interval of the median. A slow drift of
//! a shared machine hits both halves of a pair alike and cancels in the ratio.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use super::filters::{self, Installed, Mode, PORT};
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
                rounds: 3,
                rr_warmup: 100,
                rr_count: 500,
                crr_warmup: 20,
                crr_count: 50,
                stream: Duration::from_millis(150),
            },
            Size::Full => Params {
                rounds: 20,
                rr_warmup: 500,
                rr_count: 2_000,
                crr_warmup: 50,
                crr_count: 300,
                stream: Duration::from_millis(300),
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

/// Metrics (indexes into [`METRICS`]) whose ratio is also reported with its spread.
const SPREAD: [usize; 3] = [0, 2, 4];

/// Spread figures of a ratio.
const SPREAD_SUFFIXES: [&str; 4] = ["lo", "hi", "min", "max"];

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
                for i in SPREAD {
                    for s in SPREAD_SUFFIXES {
                        v.push(format!("{}.{}_ratio_{s}", key(mode, n), METRICS[i].0));
                    }
                }
            }
        }
        v.push(format!("datapath.n{n}.tcp_crr_p50_iptables_over_palisade"));
    }
    v
}

/// One mode of one size, in place for all rounds of the size.
struct Setup {
    mode: Mode,
    net: BenchNet,
    installed: Installed,
    install_ms: f64,
}

impl Setup {
    fn build(mode: Mode, n: usize, tag: &str) -> Result<Setup, String> {
        let prefix = format!("pt{}-{tag}", std::process::id());
        let net = BenchNet::build(&prefix, filters::client_addr(n)).map_err(|e| e.to_string())?;
        let (installed, install) = filters::install(mode, &net, &filters::rules(n), tag)?;
        Ok(Setup { mode, net, installed, install_ms: install.as_secs_f64() * 1e3 })
    }

    fn server(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.net.server_addr, PORT)
    }

    /// Unmeasured traffic of both kinds, so that the first round does not pay for cold caches
    /// and the first neighbour resolution.
    fn warm_up(&self, p: &Params) -> Result<(), String> {
        {
            let _echo = traffic::udp_echo(&self.net.server, PORT)?;
            traffic::udp_rr(&self.net.client, self.server(), p.rr_warmup, 0)?;
        }
        let _tcp = traffic::tcp_echo(&self.net.server, PORT)?;
        traffic::tcp_crr(&self.net.client, self.server(), p.crr_warmup, 0)?;
        Ok(())
    }

    /// One round: UDP request/response, TCP connect-request-close, UDP stream.
    fn measure(&self, p: &Params) -> Result<[f64; 5], String> {
        let rr = {
            let _echo = traffic::udp_echo(&self.net.server, PORT)?;
            traffic::udp_rr(&self.net.client, self.server(), 0, p.rr_count)?
        };
        let crr = {
            let _tcp = traffic::tcp_echo(&self.net.server, PORT)?;
            traffic::tcp_crr(&self.net.client, self.server(), 0, p.crr_count)?
        };
        let stream = {
            let sink = traffic::udp_sink(&self.net.server, PORT)?;
            traffic::udp_stream(&self.net.client, &sink, self.server(), p.stream)?
        };
        Ok([rr.p(50.0), rr.p(99.0), crr.p(50.0), crr.p(99.0), stream.received_pps])
    }
}

/// The palisade numbers are only palisade's if its programs saw the packets and passed
/// them as the mode says (by policy for `palisade`, unenforced for `palisade_hook`) and
/// dropped none: check the counters.
fn check_palisade_saw_traffic(f: &filters::PalisadeFilter, mode: Mode) -> Result<(), String> {
    let maps = f.maps.as_ref().ok_or("no maps")?;
    let totals = maps.sum_counters().map_err(|e| e.to_string())?;
    let (why, what) = if mode == Mode::PalisadeHook {
        (palisade_common::reason::ALLOWED_NOT_ENFORCED, "unenforced")
    } else {
        (palisade_common::reason::ALLOWED_BY_POLICY, "by policy")
    };
    let allowed = totals.get(why, palisade_common::direction::INGRESS);
    if allowed.packets == 0 {
        return Err(format!("palisade's programs allowed no packet {what}: they were not in the path"));
    }
    if totals.dropped_packets() != 0 {
        return Err(format!("palisade dropped {} packets of allowed traffic", totals.dropped_packets()));
    }
    Ok(())
}

/// A distribution-free interval for the median of `values` (sorted): the order statistics
/// k and n + 1 - k (1-based) with k the largest such that P(Binomial(n, 1/2) < k) <= 2.5%,
/// which covers the median with at least 95% probability. With fewer than 6 values no such
/// k exists and the interval is the minimum and maximum.
pub fn median_interval(sorted: &[f64]) -> (f64, f64) {
    let n = sorted.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    // P(B = i) for i = 0.., accumulated.
    let mut k = 1;
    let mut cdf = 0.0;
    let mut pmf = 0.5f64.powi(n as i32);
    for i in 0..n / 2 {
        cdf += pmf;
        // cdf = P(B <= i); k = i + 1 is allowed when P(B <= i) <= 2.5%.
        if cdf > 0.025 {
            break;
        }
        k = i + 1;
        pmf = pmf * (n - i) as f64 / (i + 1) as f64;
    }
    (sorted[k - 1], sorted[n - k])
}

/// Per size and mode, one entry per round (None: that round failed).
type Samples = BTreeMap<(usize, Mode), Vec<Option<[f64; 5]>>>;

/// Runs the comparison and adds its figures to `report`.
pub fn run(report: &mut Report, size: Size) {
    let p = Params::of(size);
    println!(
        "datapath: sizes {:?} x {} modes, {} interleaved rounds per size (UDP RR {} requests, TCP CRR {} connections, stream {:?} per round)",
        SIZES,
        Mode::ALL.len(),
        p.rounds,
        p.rr_count,
        p.crr_count,
        p.stream
    );
    let mut samples: Samples = BTreeMap::new();
    let mut install: BTreeMap<(usize, Mode), f64> = BTreeMap::new();
    let mut k = 0;
    for n in SIZES {
        let t = Instant::now();
        let mut setups = Vec::new();
        for mode in Mode::ALL {
            k += 1;
            match Setup::build(mode, n, &format!("b{k}")).and_then(|s| s.warm_up(&p).map(|()| s)) {
                Ok(s) => {
                    install.insert((n, mode), s.install_ms);
                    setups.push(s);
                }
                Err(e) => report.failures.push(format!("datapath {} n={n} setup: {e}", mode.name())),
            }
        }
        eprintln!("  n={n}: {} setups in {:.1} s", setups.len(), t.elapsed().as_secs_f64());
        for round in 0..p.rounds {
            let mut order: Vec<&Setup> = setups.iter().collect();
            order.rotate_left(round % setups.len().max(1));
            if round % 2 == 1 {
                order.reverse();
            }
            let t = Instant::now();
            let mut line = format!("  n={n:<6} round {:>2}:", round + 1);
            for s in order {
                let r = s.measure(&p);
                match &r {
                    Ok(v) => {
                        let _ = write!(line, " {} {:.1}/{:.0}", s.mode.name(), v[0], v[2]);
                    }
                    Err(e) => {
                        report.failures.push(format!("datapath {} n={n} round {}: {e}", s.mode.name(), round + 1));
                    }
                }
                let v = samples.entry((n, s.mode)).or_insert_with(|| vec![None; p.rounds]);
                v[round] = r.ok();
            }
            eprintln!("{line} ({:.1} s; rr/crr p50 us)", t.elapsed().as_secs_f64());
        }
        for s in &setups {
            if let Installed::Palisade(f) = &s.installed
                && let Err(e) = check_palisade_saw_traffic(f, s.mode)
            {
                report.failures.push(format!("datapath {} n={n}: {e}", s.mode.name()));
                samples.remove(&(n, s.mode));
            }
        }
        // Namespaces, pins and rules go here, before the next size.
        drop(setups);
    }
    push_figures(report, &p, &samples, &install);
}

fn context(p: &Params, m: &str, n: usize) -> String {
    let what = match m {
        "udp_rr_p50" | "udp_rr_p99" => format!(
            "UDP request/response round trip, {} B, one flow, {} requests per round ({} warm-up once)",
            traffic::MESSAGE,
            p.rr_count,
            p.rr_warmup
        ),
        "tcp_crr_p50" | "tcp_crr_p99" => format!(
            "TCP connect + {} B request + response + close, a new flow each, {} connections per round ({} warm-up once)",
            traffic::MESSAGE,
            p.crr_count,
            p.crr_warmup
        ),
        "udp_stream_pps" => format!(
            "UDP datagrams of {} B received by the server per second, one sender thread, {:?} stream per round",
            traffic::MESSAGE,
            p.stream
        ),
        _ => "time to put the rule set in place once per size: palisade's map writes (programs already loaded), the whole iptables-restore or nft -f".to_string(),
    };
    format!("{what}; {n} peers in the rule set, client last; {} interleaved rounds", p.rounds)
}

fn push_figures(report: &mut Report, p: &Params, samples: &Samples, install: &BTreeMap<(usize, Mode), f64>) {
    // The value of metric `i` in every round that has one.
    let values = |n: usize, mode: Mode, i: usize| -> Vec<f64> {
        samples.get(&(n, mode)).map(|v| v.iter().flatten().map(|s| s[i]).collect()).unwrap_or_default()
    };
    // Per-round ratios a / b of metric `i`, over the rounds both have, sorted.
    let paired = |n: usize, a: Mode, b: Mode, i: usize| -> Vec<f64> {
        let (Some(x), Some(y)) = (samples.get(&(n, a)), samples.get(&(n, b))) else {
            return Vec::new();
        };
        let mut r: Vec<f64> = x
            .iter()
            .zip(y)
            .filter_map(|(x, y)| Some(x.as_ref()?[i] / y.as_ref()?[i]))
            .filter(|r| r.is_finite())
            .collect();
        r.sort_by(f64::total_cmp);
        r
    };
    for n in SIZES {
        for mode in Mode::ALL {
            if !samples.contains_key(&(n, mode)) {
                continue;
            }
            for (i, (m, unit)) in METRICS[..5].iter().enumerate() {
                report.push(
                    format!("{}.{m}", key(mode, n)),
                    median(&values(n, mode, i)),
                    unit,
                    format!("{}; median over the rounds", context(p, m, n)),
                );
            }
            report.push(
                format!("{}.install_ms", key(mode, n)),
                install.get(&(n, mode)).copied().unwrap_or(f64::NAN),
                "ms",
                context(p, "install_ms", n),
            );
            if mode == Mode::Baseline || !samples.contains_key(&(n, Mode::Baseline)) {
                continue;
            }
            for (i, (m, _)) in METRICS[..5].iter().enumerate() {
                let r = paired(n, mode, Mode::Baseline, i);
                let dir = if i == 4 { "below 1 is slower" } else { "above 1 is slower" };
                let what = format!(
                    "{} over the no-filter baseline of the same size and round ({dir}), median over {} paired rounds; {}",
                    mode.name(),
                    r.len(),
                    context(p, m, n)
                );
                report.push(format!("{}.{m}_ratio", key(mode, n)), median(&r), "x baseline", what.clone());
                if SPREAD.contains(&i) {
                    let (lo, hi) = median_interval(&r);
                    let spread = [
                        (
                            lo,
                            "lower end of the distribution-free 95% interval of the median ratio (order statistics; min when under 6 rounds)",
                        ),
                        (
                            hi,
                            "upper end of the distribution-free 95% interval of the median ratio (order statistics; max when under 6 rounds)",
                        ),
                        (r.first().copied().unwrap_or(f64::NAN), "smallest per-round ratio"),
                        (r.last().copied().unwrap_or(f64::NAN), "largest per-round ratio"),
                    ];
                    for (s, (v, about)) in SPREAD_SUFFIXES.iter().zip(spread) {
                        report.push(
                            format!("{}.{m}_ratio_{s}", key(mode, n)),
                            v,
                            "x baseline",
                            format!("{about}: {what}"),
                        );
                    }
                }
            }
        }
        if samples.contains_key(&(n, Mode::Iptables)) && samples.contains_key(&(n, Mode::Palisade)) {
            report.push(
                format!("datapath.n{n}.tcp_crr_p50_iptables_over_palisade"),
                median(&paired(n, Mode::Iptables, Mode::Palisade, 2)),
                "x",
                format!(
                    "iptables (legacy) TCP CRR p50 over palisade's of the same round, median over the rounds; above 1: palisade ahead; {}",
                    context(p, "tcp_crr_p50", n)
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_interval_by_order_statistics() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        // n = 20: P(B <= 5) = 2.1%, P(B <= 6) = 5.8%: the 6th and 15th values.
        assert_eq!(median_interval(&v), (6.0, 15.0));
        let v: Vec<f64> = (1..=5).map(f64::from).collect();
        assert_eq!(median_interval(&v), (1.0, 5.0));
        let v: Vec<f64> = (1..=6).map(f64::from).collect();
        // n = 6: P(B = 0) = 1.6%: the extremes, now with 96.9% coverage.
        assert_eq!(median_interval(&v), (1.0, 6.0));
        let v: Vec<f64> = (1..=9).map(f64::from).collect();
        // n = 9: P(B <= 1) = 2.0%, P(B <= 2) = 9.0%: the 2nd and 8th.
        assert_eq!(median_interval(&v), (2.0, 8.0));
    }
}
