//! Leftovers of runs that could not clean up (killed with SIGKILL, machine reset): network
//! namespaces `pt<pid>-*` and directories `palisade-testbed-<pid>-*` (bpffs, temporary)
//! whose `<pid>` is no running process. Nothing of a live run is ever touched.
use std::path::{Path, PathBuf};

use crate::agent::BPFFS;
use crate::netns;

/// Something a dead run left behind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Leftover {
    Netns(String),
    Dir(PathBuf),
}

impl std::fmt::Display for Leftover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Leftover::Netns(n) => write!(f, "network namespace {n}"),
            Leftover::Dir(p) => write!(f, "directory {}", p.display()),
        }
    }
}

/// The PID a testbed name carries: `pt<pid>-...` or `palisade-testbed-<pid>-...`.
pub fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("palisade-testbed-").or_else(|| name.strip_prefix("pt"))?;
    let (digits, _) = rest.split_once('-')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn dead(pid: u32) -> bool {
    pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists()
}

/// What dead runs left behind.
pub fn find() -> Vec<Leftover> {
    let mut out = Vec::new();
    for name in netns::list_with_prefix("pt") {
        if owner_pid(&name).is_some_and(dead) {
            out.push(Leftover::Netns(name));
        }
    }
    for dir in [PathBuf::from(BPFFS), std::env::temp_dir()] {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("palisade-testbed-") && owner_pid(&name).is_some_and(dead) {
                out.push(Leftover::Dir(dir.join(name)));
            }
        }
    }
    out
}

/// Removes `leftovers`; returns what could not be removed, with why.
pub fn remove(leftovers: &[Leftover]) -> Vec<(Leftover, String)> {
    let mut failed = Vec::new();
    for l in leftovers {
        let r = match l {
            Leftover::Netns(name) => netns::delete(name).map_err(|e| e.to_string()),
            Leftover::Dir(path) => std::fs::remove_dir_all(path).map_err(|e| e.to_string()),
        };
        if let Err(e) = r {
            failed.push((l.clone(), e));
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_owner_pid_of_testbed_names_only() {
        assert_eq!(owner_pid("pt1234-node"), Some(1234));
        assert_eq!(owner_pid("pt1234-p7"), Some(1234));
        assert_eq!(owner_pid("palisade-testbed-99-0"), Some(99));
        assert_eq!(owner_pid("ptx-node"), None);
        assert_eq!(owner_pid("pt-node"), None);
        assert_eq!(owner_pid("prod"), None);
        assert_eq!(owner_pid("pt1234"), None);
    }
}
