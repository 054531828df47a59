//! Loading the eBPF object: maps pinned under the pin directory (and reused when already
//! there, so a restarted agent adopts the enforced state), both programs loaded and
//! verified, and removal of everything pinned.
use std::{
    collections::HashMap,
    fs, io,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapInfo, RingBuf},
    programs::{SchedClassifier, TcAttachType, TestRun, TestRunOptions, tc},
};
use palisade_common::{map_names, program_names};

use super::{
    AttachMode, DatapathError, EBPF_OBJECT, EventReader, MapSet,
    attach::{LINKS_DIR, TcxLinkPins},
    maps::{MAP_SPECS, MapSizes, MapSpec},
    sys,
};

/// Where the datapath lives in bpffs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatapathConfig {
    /// Directory (on bpffs) for the map pins and, under `links/`, the link pins; created if
    /// missing. Usually `/sys/fs/bpf/palisade`.
    pub pin_dir: PathBuf,
}

impl DatapathConfig {
    /// The usual pin directory.
    pub const DEFAULT_PIN_DIR: &'static str = "/sys/fs/bpf/palisade";
}

impl Default for DatapathConfig {
    fn default() -> Self {
        DatapathConfig { pin_dir: PathBuf::from(Self::DEFAULT_PIN_DIR) }
    }
}

/// Which program of the pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    /// `palisade_from_pod`, host-side tc ingress: what the pod sends (pod egress).
    FromPod,
    /// `palisade_to_pod`, host-side tc egress: what the pod receives (pod ingress).
    ToPod,
}

impl Hook {
    pub const BOTH: [Hook; 2] = [Hook::FromPod, Hook::ToPod];

    pub const fn program_name(self) -> &'static str {
        match self {
            Hook::FromPod => program_names::FROM_POD,
            Hook::ToPod => program_names::TO_POD,
        }
    }

    pub(crate) const fn tc_attach_type(self) -> TcAttachType {
        match self {
            Hook::FromPod => TcAttachType::Ingress,
            Hook::ToPod => TcAttachType::Egress,
        }
    }
}

/// The result of one `BPF_PROG_TEST_RUN`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestRunOutcome {
    /// What the program returned: -1 (`TC_ACT_UNSPEC`, pass) or 2 (`TC_ACT_SHOT`, drop).
    pub action: i32,
    /// The kernel's average time per run.
    pub duration: Duration,
}

impl TestRunOutcome {
    pub const TC_ACT_UNSPEC: i32 = -1;
    pub const TC_ACT_SHOT: i32 = 2;

    pub fn passed(&self) -> bool {
        self.action == Self::TC_ACT_UNSPEC
    }

    pub fn dropped(&self) -> bool {
        self.action == Self::TC_ACT_SHOT
    }
}

/// The loaded datapath: both programs, the maps not yet taken, and the attachments.
pub struct Datapath {
    pub(crate) ebpf: Ebpf,
    pub(crate) pin_dir: PathBuf,
    pub(crate) mode: AttachMode,
    /// Interfaces attached by this process (name -> ifindex).
    pub(crate) attached: HashMap<String, u32>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("pin_dir", &self.pin_dir)
            .field("mode", &self.mode)
            .field("attached", &self.attached)
            .finish_non_exhaustive()
    }
}

impl Datapath {
    /// Loads the eBPF object with its maps pinned under `cfg.pin_dir` (reusing maps already
    /// pinned there), and loads both programs into the kernel. Maps have the sizes the
    /// programs declare.
    pub fn load(cfg: &DatapathConfig) -> Result<Datapath, DatapathError> {
        Self::load_with_sizes(cfg, &MapSizes::default())
    }

    /// [`Datapath::load`] with the maps created at `sizes`. Maps already pinned must have
    /// these sizes (a pinned map cannot be resized in place).
    pub fn load_with_sizes(cfg: &DatapathConfig, sizes: &MapSizes) -> Result<Datapath, DatapathError> {
        Self::load_object(cfg, sizes, EBPF_OBJECT)
    }

    /// [`Datapath::load_with_sizes`] with another build of the eBPF programs than the one
    /// the agent carries (`object`: the ELF file's bytes), for benchmarks that compare two
    /// builds in one process. Its maps must have the layouts of this build's
    /// `palisade_common` ([`Datapath::take_maps`] checks the sizes).
    pub fn load_object(cfg: &DatapathConfig, sizes: &MapSizes, object: &[u8]) -> Result<Datapath, DatapathError> {
        let pin_dir = &cfg.pin_dir;
        ensure_pin_dir(pin_dir)?;
        check_pinned_maps(pin_dir, sizes)?;
        sys::raise_memlock_limit();

        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(pin_dir);
        for (name, entries) in sizes.iter() {
            loader.map_max_entries(name, entries);
        }
        let mut ebpf =
            loader.load(object).map_err(|e| DatapathError::Load { pin_dir: pin_dir.clone(), source: Box::new(e) })?;
        for hook in Hook::BOTH {
            let name = hook.program_name();
            let prog = program_mut(&mut ebpf, name)?;
            prog.load().map_err(|e| DatapathError::ProgramLoad { program: name, source: Box::new(e) })?;
            if let Ok(info) = prog.info() {
                tracing::debug!(
                    program = name,
                    id = info.id(),
                    verified_insns = info.verified_instruction_count(),
                    xlated_bytes = info.size_translated(),
                    "program loaded"
                );
            }
        }
        let mode = AttachMode::detect();
        tracing::info!(pin_dir = %pin_dir.display(), attach_mode = %mode, "datapath loaded");
        Ok(Datapath { ebpf, pin_dir: pin_dir.clone(), mode, attached: HashMap::new() })
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The kernel's id of a loaded program (what `bpftool prog` and tcx queries show).
    pub fn program_id(&self, hook: Hook) -> Result<u32, DatapathError> {
        let name = hook.program_name();
        let prog: &SchedClassifier = self
            .ebpf
            .program(name)
            .ok_or(DatapathError::ProgramMissing { program: name })?
            .try_into()
            .map_err(|e| DatapathError::ProgramLoad { program: name, source: Box::new(e) })?;
        let info = prog.info().map_err(|e| DatapathError::ProgramLoad { program: name, source: Box::new(e) })?;
        Ok(info.id())
    }

    /// Takes the typed map handles (once).
    pub fn take_maps(&mut self) -> Result<MapSet, DatapathError> {
        let ebpf = &mut self.ebpf;
        MapSet::from_maps(&mut |name| ebpf.take_map(name))
    }

    /// Takes the verdict event reader (once).
    pub fn take_events(&mut self) -> Result<EventReader, DatapathError> {
        let name = map_names::EVENTS;
        let map = self.ebpf.take_map(name).ok_or(DatapathError::MapMissing { map: name })?;
        let ring = RingBuf::try_from(map).map_err(|e| DatapathError::MapType { map: name, source: Box::new(e) })?;
        Ok(EventReader::new(ring))
    }

    /// Runs one program on `packet` (an Ethernet frame) with `BPF_PROG_TEST_RUN`. The program
    /// sees `ifindex` as the interface when given (it must exist in this thread's network
    /// namespace; the kernel refuses others), else the loopback interface (1).
    pub fn test_run(&self, hook: Hook, packet: &[u8], ifindex: Option<u32>) -> Result<TestRunOutcome, DatapathError> {
        self.run_test(hook, packet, ifindex, 1)
    }

    /// Runs one program once on `packet` (on loopback) as if it had entered the node on the
    /// interface `ingress_ifindex` (`__sk_buff.ingress_ifindex`; 0: sent by the node itself).
    pub fn test_run_from(
        &self,
        hook: Hook,
        packet: &[u8],
        ingress_ifindex: u32,
    ) -> Result<TestRunOutcome, DatapathError> {
        self.run_program_ctx(hook.program_name(), packet, None, ingress_ifindex, 1)
    }

    /// Runs one program `repeat` times on `packet` (on loopback); the outcome's duration is
    /// the kernel's average per run. Maps and counters see every run.
    pub fn test_run_repeat(&self, hook: Hook, packet: &[u8], repeat: u32) -> Result<TestRunOutcome, DatapathError> {
        self.run_test(hook, packet, None, repeat)
    }

    /// Runs the empty program (`palisade_empty`: passes every packet, touches nothing;
    /// loaded on first use) `repeat` times on `packet`: the baseline of a benchmark, i.e.
    /// what `BPF_PROG_TEST_RUN` costs by itself.
    pub fn test_run_empty(&mut self, packet: &[u8], repeat: u32) -> Result<TestRunOutcome, DatapathError> {
        let name = program_names::EMPTY;
        let prog = program_mut(&mut self.ebpf, name)?;
        if prog.fd().is_err() {
            prog.load().map_err(|e| DatapathError::ProgramLoad { program: name, source: Box::new(e) })?;
        }
        self.run_program(name, packet, None, repeat)
    }

    fn run_test(
        &self,
        hook: Hook,
        packet: &[u8],
        ifindex: Option<u32>,
        repeat: u32,
    ) -> Result<TestRunOutcome, DatapathError> {
        self.run_program(hook.program_name(), packet, ifindex, repeat)
    }

    fn run_program(
        &self,
        name: &'static str,
        packet: &[u8],
        ifindex: Option<u32>,
        repeat: u32,
    ) -> Result<TestRunOutcome, DatapathError> {
        self.run_program_ctx(name, packet, ifindex, 0, repeat)
    }

    fn run_program_ctx(
        &self,
        name: &'static str,
        packet: &[u8],
        ifindex: Option<u32>,
        ingress_ifindex: u32,
        repeat: u32,
    ) -> Result<TestRunOutcome, DatapathError> {
        let prog: &SchedClassifier = self
            .ebpf
            .program(name)
            .ok_or(DatapathError::ProgramMissing { program: name })?
            .try_into()
            .map_err(|e| DatapathError::TestRun { program: name, source: Box::new(e) })?;
        // struct __sk_buff up to and including `ifindex` (offset 40); the kernel zero-fills
        // the rest and only accepts a few fields, ifindex among them.
        let mut ctx = [0u8; 44];
        if let Some(i) = ifindex {
            ctx[40..44].copy_from_slice(&i.to_ne_bytes());
        }
        // `ingress_ifindex` (offset 36) is one of the fields the kernel accepts.
        ctx[36..40].copy_from_slice(&ingress_ifindex.to_ne_bytes());
        let opts = TestRunOptions {
            data_in: Some(packet),
            ctx_in: (ifindex.is_some() || ingress_ifindex != 0).then_some(&ctx[..]),
            repeat,
            ..TestRunOptions::default()
        };
        let r = prog.test_run(opts).map_err(|e| DatapathError::TestRun { program: name, source: Box::new(e) })?;
        Ok(TestRunOutcome { action: r.return_value as i32, duration: r.duration })
    }

    /// Removes every pin under `pin_dir` (maps and links, which detaches tcx links) and the
    /// palisade filters of clsact attachments on the interfaces of this network namespace.
    /// Missing pins are fine.
    pub fn uninstall(pin_dir: &Path) -> Result<(), DatapathError> {
        let links = pin_dir.join(LINKS_DIR);
        if links.exists() {
            let entries = fs::read_dir(&links).map_err(|e| DatapathError::io("read", &links, e))?;
            for entry in entries {
                let entry = entry.map_err(|e| DatapathError::io("read", &links, e))?;
                TcxLinkPins::at(entry.path()).remove()?;
            }
            remove_dir(&links)?;
        }
        for spec in &MAP_SPECS {
            remove_file(&pin_dir.join(spec.name))?;
        }
        for ifname in interfaces() {
            for hook in Hook::BOTH {
                let _ = tc::qdisc_detach_program(&ifname, hook.tc_attach_type(), hook.program_name());
            }
        }
        match fs::remove_dir(pin_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(DatapathError::io("remove (other pins left in it?)", pin_dir, e)),
        }
    }
}

pub(crate) fn program_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
    ebpf.program_mut(name)
        .ok_or(DatapathError::ProgramMissing { program: name })?
        .try_into()
        .map_err(|e| DatapathError::ProgramLoad { program: name, source: Box::new(e) })
}

/// Creates the pin directory after checking that it is (or will be) on bpffs.
fn ensure_pin_dir(pin_dir: &Path) -> Result<(), DatapathError> {
    let existing = pin_dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    match sys::is_bpffs(existing) {
        Ok(true) => {}
        Ok(false) => return Err(DatapathError::NotBpffs { path: pin_dir.to_path_buf() }),
        Err(e) => return Err(DatapathError::io("statfs", existing, e)),
    }
    fs::create_dir_all(pin_dir).map_err(|e| DatapathError::io("create", pin_dir, e))?;
    if !sys::is_bpffs(pin_dir).map_err(|e| DatapathError::io("statfs", pin_dir, e))? {
        return Err(DatapathError::NotBpffs { path: pin_dir.to_path_buf() });
    }
    Ok(())
}

/// Refuses maps pinned by a build whose layout differs (the programs would misread them),
/// or pinned at another size than configured.
fn check_pinned_maps(pin_dir: &Path, sizes: &MapSizes) -> Result<(), DatapathError> {
    for spec in &MAP_SPECS {
        let spec = &MapSpec { max_entries: sizes.get(spec.name), ..*spec };
        let path = pin_dir.join(spec.name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|e| DatapathError::IncompatiblePinnedMap {
            map: spec.name,
            path: path.clone(),
            found: format!("not a readable map ({e})"),
            expected: spec.to_string(),
        })?;
        let found_type = info.map_type().ok();
        let same_layout = found_type == Some(spec.map_type)
            && info.key_size() == spec.key_size
            && info.value_size() == spec.value_size;
        if same_layout && info.max_entries() != spec.max_entries {
            return Err(DatapathError::PinnedMapSize {
                map: spec.name,
                path,
                pinned: info.max_entries(),
                configured: spec.max_entries,
            });
        }
        if found_type != Some(spec.map_type)
            || info.key_size() != spec.key_size
            || info.value_size() != spec.value_size
            || info.max_entries() != spec.max_entries
        {
            return Err(DatapathError::IncompatiblePinnedMap {
                map: spec.name,
                path,
                found: format!(
                    "type {:?}, key {} B, value {} B, {} entries",
                    found_type,
                    info.key_size(),
                    info.value_size(),
                    info.max_entries()
                ),
                expected: spec.to_string(),
            });
        }
    }
    Ok(())
}

pub(crate) fn remove_file(path: &Path) -> Result<(), DatapathError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DatapathError::io("remove", path, e)),
    }
}

pub(crate) fn remove_dir(path: &Path) -> Result<(), DatapathError> {
    match fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DatapathError::io("remove", path, e)),
    }
}

/// Names of the network interfaces of this network namespace.
fn interfaces() -> Vec<String> {
    nix::net::if_::if_nameindex()
        .map(|l| l.iter().map(|i| i.name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}
