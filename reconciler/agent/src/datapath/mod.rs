//! The datapath, user side: loading the eBPF object with its maps pinned in bpffs (and
//! adopting them after a restart), attaching the two tc programs to pod interfaces (tcx,
//! clsact as fallback), typed map access for the map writer behind [`MapBackend`] (the
//! kernel's maps, or [`FakeMaps`] in memory), the ordered applier of plans, and the verdict
//! event reader.
//!
//! The map layouts and constants are in `palisade_common`; the programs in `ebpf/programs`.
mod applier;
mod attach;
mod backend;
pub mod bulk;
mod error;
mod events;
pub mod fake;
mod loader;
mod maps;
mod sys;
mod upgrade;

pub use applier::{apply_plan, map_limits, read_maps, read_state};
pub use attach::{AttachMode, CLSACT_HANDLE, CLSACT_PRIORITY};
pub use backend::{MapBackend, Programs, WriteMode};
pub use error::DatapathError;
pub use events::{EventReader, MAX_BATCH};
pub use fake::{FakeMaps, FakePrograms};
pub use loader::{Datapath, DatapathConfig, Hook, TestRunOutcome};
pub use maps::{CounterTotals, MAP_NAMES, MapSet, MapSizes, RESIZABLE, pinned_map_fill};
pub use sys::PartialWrite;

pub use crate::mapstate::WritableMap;

/// The eBPF object built by build.rs, 8-byte aligned as aya requires.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/palisade-ebpf.o"));

/// The index of interface `ifname` in this thread's network namespace, if it exists.
pub fn ifindex(ifname: &str) -> Option<u32> {
    sys::ifindex(ifname)
}

#[cfg(test)]
mod tests {
    /// The map writer may live on another thread than the one that loaded the datapath.
    #[test]
    fn handles_are_send() {
        fn send<T: Send>() {}
        send::<super::Datapath>();
        send::<super::MapSet>();
        send::<super::EventReader>();
    }
}
