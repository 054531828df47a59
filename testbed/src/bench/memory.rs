//! Memory: the real agent's resident set at idle (started by this run in a namespace of its
//! own, nothing registered, no policy), and the kernel memory of palisade's maps, per map,
//! as the kernel accounts it (`memlock` in the map's fdinfo), both for the idle agent and
//! for a datapath holding the 10,000-peer rule set of the datapath comparison.
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use aya::maps::MapInfo;
use palisade_agent::datapath::MAP_NAMES;

use super::net::BenchNet;
use super::{Report, filters};
use crate::agent::{AgentProcess, RunDirs};
use crate::netns::Netns;

/// Every map of the datapath, by its name in the object (and in bpffs).
pub const MAPS: [&str; MAP_NAMES.len()] = MAP_NAMES;

/// Peers of the loaded-map measurement (the largest datapath size).
pub const LOADED_PEERS: usize = 10_000;

pub fn figure_names() -> Vec<String> {
    let mut v = vec![
        "memory.agent_idle_rss_mib".to_string(),
        "memory.agent_idle_peak_rss_mib".to_string(),
        "memory.maps_idle_total_mib".to_string(),
        format!("memory.maps_n{LOADED_PEERS}_total_mib"),
    ];
    for m in MAPS {
        v.push(format!("memory.map.{}_kib", m.to_ascii_lowercase()));
    }
    v
}

/// One pinned map as the kernel accounts it.
#[derive(Clone, Debug)]
pub struct MapMemory {
    pub name: String,
    pub memlock: u64,
    pub max_entries: u64,
}

/// `key:\tvalue` of an fdinfo file.
fn fdinfo_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':')?.trim().parse().ok())
}

/// The kernel memory of every map pinned under `pin_dir`.
pub fn pinned_maps(pin_dir: &Path) -> Result<Vec<MapMemory>, String> {
    let mut out = Vec::new();
    for name in MAPS {
        let info = MapInfo::from_pin(pin_dir.join(name)).map_err(|e| format!("opening map {name}: {e}"))?;
        let fd = info.fd().map_err(|e| format!("map {name}: {e}"))?;
        let path = format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd());
        let text = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
        let memlock = fdinfo_field(&text, "memlock").ok_or_else(|| format!("no memlock in {path}"))?;
        out.push(MapMemory {
            name: name.to_string(),
            memlock,
            max_entries: fdinfo_field(&text, "max_entries").unwrap_or(0),
        });
    }
    Ok(out)
}

/// `VmRSS` and `VmHWM` of `pid`, in kiB.
pub fn rss_kib(pid: u32) -> Result<(u64, u64), String> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .ok_or_else(|| format!("no {k} in {path}"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// The agent binary beside this one (same build profile), unless given.
pub fn default_agent_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("palisade-agent")))
        .unwrap_or_else(|| PathBuf::from("palisade-agent"))
}

/// How long the agent idles before it is measured.
const SETTLE: Duration = Duration::from_secs(3);

pub fn run(report: &mut Report, agent: &Path) {
    if let Err(e) = idle_agent(report, agent) {
        report.failures.push(format!("memory: idle agent: {e}"));
    }
    if let Err(e) = loaded_maps(report) {
        report.failures.push(format!("memory: maps with {LOADED_PEERS} peers: {e}"));
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn idle_agent(report: &mut Report, agent: &Path) -> Result<(), String> {
    let pid = std::process::id();
    let ns = Netns::create(&format!("pt{pid}-mem")).map_err(|e| e.to_string())?;
    let dirs = RunDirs::create(&format!("{pid}-mem"), false).map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let proc = AgentProcess::spawn(agent, ns.open().map_err(|e| e.to_string())?, &dirs, None, &[])
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        proc.wait_ready(crate::agent::READY_TIMEOUT).await?;
        crate::agent::call(
            "waiting until idle",
            Duration::from_secs(30),
            proc.client.wait_current(Duration::from_secs(20)),
        )
        .await
        .map(|_| ())
    })
    .map_err(|e| e.to_string())?;
    std::thread::sleep(SETTLE);
    proc.check_alive("while idle").map_err(|e| e.to_string())?;
    let apid = proc.pid().ok_or("the agent is gone")?;
    let (rss, hwm) = rss_kib(apid)?;
    let ctx = format!(
        "palisade-agent ({}) started in its own network namespace, no endpoint, no policy, measured {} s after it was ready",
        agent.display(),
        SETTLE.as_secs()
    );
    report.push("memory.agent_idle_rss_mib", mib(rss), "MiB", format!("VmRSS; {ctx}"));
    report.push("memory.agent_idle_peak_rss_mib", mib(hwm), "MiB", format!("VmHWM (peak RSS since start); {ctx}"));
    let maps = pinned_maps(&dirs.bpffs)?;
    let total: u64 = maps.iter().map(|m| m.memlock).sum();
    report.push(
        "memory.maps_idle_total_mib",
        total as f64 / f64::from(1 << 20),
        "MiB",
        "kernel memory of the idle agent's 12 maps (sum of memlock in each map's fdinfo)",
    );
    for m in &maps {
        report.push(
            format!("memory.map.{}_kib", m.name.to_ascii_lowercase()),
            m.memlock as f64 / 1024.0,
            "KiB",
            format!("kernel memory (memlock) of map {}, {} max entries, idle agent", m.name, m.max_entries),
        );
    }
    drop(proc);
    drop(dirs);
    drop(ns);
    Ok(())
}

fn loaded_maps(report: &mut Report) -> Result<(), String> {
    let pid = std::process::id();
    let net =
        BenchNet::build(&format!("pt{pid}-memn"), filters::client_addr(LOADED_PEERS)).map_err(|e| e.to_string())?;
    let (installed, _) = filters::install(filters::Mode::Palisade, &net, &filters::rules(LOADED_PEERS), "memmaps")?;
    let filters::Installed::Palisade(f) = &installed else { return Err("not palisade".into()) };
    let maps = pinned_maps(&f.pin_dir)?;
    let total: u64 = maps.iter().map(|m| m.memlock).sum();
    report.push(
        format!("memory.maps_n{LOADED_PEERS}_total_mib"),
        total as f64 / f64::from(1 << 20),
        "MiB",
        format!(
            "kernel memory of the 12 maps holding the datapath comparison's {LOADED_PEERS}-peer rule set ({} ipcache host entries, {} policy entries)",
            LOADED_PEERS + 1,
            LOADED_PEERS + 1
        ),
    );
    drop(installed);
    drop(net);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fdinfo_fields() {
        let t = "pos:\t0\nflags:\t02000002\nmap_type:\t1\nmax_entries:\t4096\nmemlock:\t364544\nmap_id:\t12\n";
        assert_eq!(fdinfo_field(t, "memlock"), Some(364_544));
        assert_eq!(fdinfo_field(t, "max_entries"), Some(4096));
        assert_eq!(fdinfo_field(t, "nothing"), None);
    }
}
