//! Errors of the datapath: loading the eBPF object, attaching it, and map access. Every
//! variant names what it was working on (map, interface, path) and, where there is one,
//! what to do about it.
use std::{io, path::PathBuf};

use super::AttachMode;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "{path} is not on a bpf filesystem, so the maps cannot be pinned; mount one with \
         `mount -t bpf bpf /sys/fs/bpf` (ci/setup.sh does) or choose a pin directory under it"
    )]
    NotBpffs { path: PathBuf },

    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "map {map} pinned at {path} does not match this agent's datapath (pinned: {found}; \
         expected: {expected}); it was left by an incompatible version. Remove the pins with \
         `palisade uninstall` (or delete {path}) and start the agent again"
    )]
    IncompatiblePinnedMap { map: &'static str, path: PathBuf, found: String, expected: String },

    #[error(
        "map {map} pinned at {path} holds {pinned} entries, but the agent is configured for \
         {configured} (--map-size {map}={configured}); a pinned map cannot be resized in place. \
         Start with --map-size {map}={pinned}, or remove the pins (`palisade uninstall`, which \
         stops enforcement until the agent is back) and start again"
    )]
    PinnedMapSize { map: &'static str, path: PathBuf, pinned: u32, configured: u32 },

    #[error("loading the eBPF object (maps pinned under {pin_dir}) failed: {source}")]
    Load {
        pin_dir: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },

    #[error("the eBPF object has no program {program}; the agent was built with a wrong object")]
    ProgramMissing { program: &'static str },

    #[error("the kernel refused program {program}: {source}")]
    ProgramLoad {
        program: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },

    #[error("the eBPF object has no map {map}, or it was already taken")]
    MapMissing { map: &'static str },

    #[error("map {map} has an unexpected type or layout: {source}")]
    MapType {
        map: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },

    #[error("map {map}: {op} failed: {source}")]
    MapAccess {
        map: &'static str,
        op: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },

    #[error("map {map}: {op} failed after {done} of {total} entries: {source}")]
    MapWrite {
        map: &'static str,
        op: &'static str,
        done: usize,
        total: usize,
        #[source]
        source: io::Error,
    },

    #[error("map {map}: reading it failed: {source}")]
    MapRead {
        map: &'static str,
        #[source]
        source: io::Error,
    },

    #[error(
        "map {map} is full: writing {total} entries stopped after {done} ({source}); raise its size \
         with --map-size {map}=N"
    )]
    MapFull {
        map: &'static str,
        done: usize,
        total: usize,
        #[source]
        source: io::Error,
    },

    #[error("map operation failed: {0}")]
    Map(#[from] aya::maps::MapError),

    #[error("interface {ifname} does not exist (in this network namespace)")]
    InterfaceNotFound { ifname: String },

    #[error("attaching {program} to {ifname} ({mode}) failed: {source}")]
    Attach {
        ifname: String,
        program: &'static str,
        mode: AttachMode,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },

    #[error("pinning the {program} link of {ifname} at {path} failed: {source}")]
    PinLink {
        ifname: String,
        program: &'static str,
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("running {program} with BPF_PROG_TEST_RUN failed: {source}")]
    TestRun {
        program: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },

    #[error("the verdict event ring buffer cannot be read: {source}")]
    Events {
        #[source]
        source: io::Error,
    },
}

impl DatapathError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        DatapathError::Io { op, path: path.into(), source }
    }

    pub(crate) fn map_access(map: &'static str, op: &'static str, source: aya::maps::MapError) -> Self {
        DatapathError::MapAccess { map, op, source: Box::new(source) }
    }
}
