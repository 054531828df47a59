//! `palisade-bench`: palisade set beside what a node would run instead, measured in one run
//! on one machine, entirely inside the testbed's own network namespaces.
//!
//! - [`datapath`] — real traffic through a client — node — server chain of namespaces with no
//!   filter, palisade's tc programs, iptables (legacy and `nf_tables` backends) and nftables
//!   (a set), at 10, 1,000 and 10,000 rules ([`net`], [`traffic`], [`filters`]);
//! - [`memory`] — the real agent's resident memory at idle and the kernel memory of its maps;
//! - [`control`] — the control plane at scale and the resolution scaling curve;
//! - [`cluster`] — several nodes with their agents sharing etcd: a pod's way to every
//!   node, identity allocations, etcd operations, agent memory, cross-node traffic;
//! - [`svg`] — the plot for docs/benchmarks.md.
//!
//! Every figure is a [`Figure`] (name, value, unit, context); the run prints them as a table
//! and writes them as JSON ([`Report`]). [`expected_figures`] names every figure a run of a
//! given [`Size`] must produce (the CI test checks the JSON against it).
pub mod cluster;
pub mod control;
pub mod datapath;
pub mod filters;
pub mod memory;
pub mod net;
pub mod svg;
pub mod traffic;

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// How big a run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    /// CI: every figure, small counts, well under 5 minutes.
    Quick,
    /// By hand: the sizes of the issue, more samples, several rounds.
    Full,
}

/// One measured number.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    /// Dotted name, stable across runs (`datapath.palisade.n1000.tcp_crr_p99_ratio`).
    pub name: String,
    pub value: f64,
    pub unit: String,
    /// What was measured, how much of it, and how.
    pub context: String,
}

/// The machine a run was on.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    pub nproc: usize,
    pub kernel: String,
    pub cpu: String,
    /// /proc/loadavg at the start and at the end of the run (the machine is shared).
    pub loadavg_start: String,
    pub loadavg_end: String,
}

impl Machine {
    pub fn probe() -> Machine {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("model name"))
                    .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
            })
            .unwrap_or_default();
        Machine {
            nproc: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string(),
            cpu,
            loadavg_start: loadavg(),
            loadavg_end: String::new(),
        }
    }
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Everything a run produced.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub size: Size,
    pub started_unix: u64,
    pub seconds: f64,
    pub machine: Machine,
    pub figures: Vec<Figure>,
    /// Parts that could not run, with why (the run still writes what it has).
    pub failures: Vec<String>,
}

impl Report {
    pub fn new(size: Size) -> Report {
        Report {
            size,
            started_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            seconds: 0.0,
            machine: Machine::probe(),
            figures: Vec::new(),
            failures: Vec::new(),
        }
    }

    pub fn push(&mut self, name: impl Into<String>, value: f64, unit: &str, context: impl Into<String>) {
        let f = Figure { name: name.into(), value, unit: unit.into(), context: context.into() };
        println!("  {:<58} {:>14} {}", f.name, fmt_value(f.value), f.unit);
        self.figures.push(f);
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.figures.iter().find(|f| f.name == name).map(|f| f.value)
    }

    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, text + "\n")
    }

    /// Every figure as a table, grouped by the first part of its name.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let width = self.figures.iter().map(|f| f.name.len()).max().unwrap_or(10);
        for f in &self.figures {
            let _ = writeln!(out, "{:<width$}  {:>14}  {}", f.name, fmt_value(f.value), f.unit);
        }
        out
    }
}

pub fn fmt_value(v: f64) -> String {
    if v.is_nan() {
        "n/a".into()
    } else if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// The name of every figure a run of `size` writes.
pub fn expected_figures(size: Size) -> Vec<String> {
    let mut v = datapath::figure_names(size);
    v.extend(memory::figure_names());
    v.extend(control::figure_names(size));
    v.extend(cluster::figure_names(size));
    v
}

/// p-th percentile (0..=100) of sorted samples, nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { f64::midpoint(v[n / 2 - 1], v[n / 2]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::float_cmp, reason = "nearest-rank percentiles pick one of the inputs, exactly")]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn figure_names_are_unique() {
        for size in [Size::Quick, Size::Full] {
            let names = expected_figures(size);
            let set: std::collections::BTreeSet<_> = names.iter().collect();
            assert_eq!(set.len(), names.len());
        }
    }
}
