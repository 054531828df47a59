//! Helpers shared by the agent's kernel tests.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use palisade_agent::datapath::{Datapath, DatapathConfig};

/// A pin directory on bpffs, removed with every pin and link in it on drop (also on panic).
pub struct PinDir(pub PathBuf);

impl PinDir {
    /// `/sys/fs/bpf/palisade-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> PinDir {
        static N: AtomicU32 = AtomicU32::new(0);
        // Every test of these binaries loads eBPF programs or maps.
        palisade_privileged::require_root_for_this_binary();
        assert!(Path::new("/sys/fs/bpf").exists(), "bpffs is not mounted at /sys/fs/bpf: run ci/setup.sh (as root)");
        let n = N.fetch_add(1, Ordering::Relaxed);
        PinDir(PathBuf::from(format!("/sys/fs/bpf/palisade-{tag}-{}-{n}", std::process::id())))
    }

    pub fn config(&self) -> DatapathConfig {
        DatapathConfig { pin_dir: self.0.clone() }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = Datapath::uninstall(&self.0) {
            eprintln!("cleaning up {}: {e}", self.0.display());
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
