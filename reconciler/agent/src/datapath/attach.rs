//! Attaching both programs to a pod's host-side interface, and detaching them.
//!
//! With tcx (kernel >= 6.6) each attachment is a bpf link pinned at
//! `<pin_dir>/links/<ifname>/<program>`, so it stays after the agent exits; attaching again
//! (same or a later agent) swaps the program inside the pinned link atomically
//! (`BPF_LINK_UPDATE`), so enforcement never stops. With clsact (fallback) the filters have
//! a fixed priority and handle, so attaching again replaces them in place.
use std::{
    fmt, fs,
    path::{Path, PathBuf},
};

use aya::{
    programs::{
        LinkOrder, SchedClassifier,
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    },
    util::KernelVersion,
};

use super::{
    Datapath, DatapathError, Hook,
    loader::{program_mut, remove_dir, remove_file},
    sys,
};

/// Directory under the pin directory that holds the link pins, one folder per interface.
pub(crate) const LINKS_DIR: &str = "links";
/// Priority of the clsact filters (runs before filters with larger numbers).
pub const CLSACT_PRIORITY: u16 = 1;
/// Handle of the clsact filters, so a later attach finds and replaces them.
pub const CLSACT_HANDLE: TcHandle = TcHandle::new(0, 0x5a1);

/// `BPF_TCX_INGRESS` / `BPF_TCX_EGRESS` from linux/bpf.h.
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;
const ENOTSUPP: i32 = 524;

/// How the programs are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttachMode {
    /// tcx bpf links (kernel >= 6.6), pinned.
    Tcx,
    /// `cls_bpf` filters on a clsact qdisc.
    Clsact,
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachMode::Tcx => "tcx",
            AttachMode::Clsact => "clsact",
        })
    }
}

impl AttachMode {
    /// tcx where the kernel has it (6.6 and later), else clsact.
    pub fn detect() -> AttachMode {
        match KernelVersion::current() {
            Ok(v) if v >= KernelVersion::new(6, 6, 0) => AttachMode::Tcx,
            _ => AttachMode::Clsact,
        }
    }
}

/// The link pins of one interface.
pub(crate) struct TcxLinkPins {
    dir: PathBuf,
}

impl TcxLinkPins {
    pub(crate) fn new(pin_dir: &Path, ifname: &str) -> TcxLinkPins {
        TcxLinkPins { dir: pin_dir.join(LINKS_DIR).join(ifname) }
    }

    pub(crate) fn at(dir: PathBuf) -> TcxLinkPins {
        TcxLinkPins { dir }
    }

    pub(crate) fn path(&self, hook: Hook) -> PathBuf {
        self.dir.join(hook.program_name())
    }

    /// Detaches the links, removes their pins and the folder.
    pub(crate) fn remove(&self) -> Result<(), DatapathError> {
        for hook in Hook::BOTH {
            detach_and_unpin(&self.path(hook))?;
        }
        remove_dir(&self.dir)
    }
}

impl Datapath {
    /// How programs are attached (tcx unless the kernel lacks it or it failed).
    pub fn attach_mode(&self) -> AttachMode {
        self.mode
    }

    /// Forces an attach mode for later attachments (tests; kernels with a broken tcx).
    pub fn set_attach_mode(&mut self, mode: AttachMode) {
        self.mode = mode;
    }

    /// Interfaces this process attached (name, ifindex).
    pub fn attached(&self) -> impl Iterator<Item = (&str, u32)> {
        self.attached.iter().map(|(n, i)| (n.as_str(), *i))
    }

    /// Interfaces that have tcx link pins (attached by this or an earlier agent).
    pub fn pinned_interfaces(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(self.pin_dir.join(LINKS_DIR)) else {
            return Vec::new();
        };
        let mut names: Vec<String> =
            entries.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned())).collect();
        names.sort();
        names
    }

    /// Attaches both programs to the host-side interface `ifname` and returns its index.
    /// Idempotent: an earlier palisade attachment on the interface (from this or an earlier
    /// agent) gets the current programs, atomically where the kernel allows.
    pub fn attach(&mut self, ifname: &str) -> Result<u32, DatapathError> {
        let ifindex = sys::ifindex(ifname).ok_or_else(|| DatapathError::InterfaceNotFound { ifname: ifname.into() })?;
        match self.mode {
            AttachMode::Tcx => match self.attach_tcx(ifname, ifindex) {
                Ok(()) => remove_clsact_filters(ifname),
                Err(e) if tcx_unsupported(&e) => {
                    tracing::warn!(interface = ifname, error = %e, "tcx attachment is not supported here; falling back to clsact");
                    self.mode = AttachMode::Clsact;
                    self.attach_clsact(ifname)?;
                }
                Err(e) => return Err(e),
            },
            AttachMode::Clsact => {
                self.attach_clsact(ifname)?;
                // tcx links of an earlier agent would run in addition.
                TcxLinkPins::new(&self.pin_dir, ifname).remove()?;
            }
        }
        self.attached.insert(ifname.to_string(), ifindex);
        tracing::debug!(interface = ifname, ifindex, mode = %self.mode, "programs attached");
        Ok(ifindex)
    }

    /// Detaches both programs from `ifname` and removes the link pins. Fine when the
    /// interface is gone (its links are then defunct; their pins are removed).
    pub fn detach(&mut self, ifname: &str) -> Result<(), DatapathError> {
        TcxLinkPins::new(&self.pin_dir, ifname).remove()?;
        if sys::ifindex(ifname).is_some() {
            remove_clsact_filters(ifname);
        }
        self.attached.remove(ifname);
        tracing::debug!(interface = ifname, "programs detached");
        Ok(())
    }

    /// Removes the pins of links whose interface is gone (left by pods deleted while no
    /// agent ran); returns the interface names.
    pub fn prune_stale_links(&mut self) -> Result<Vec<String>, DatapathError> {
        let mut pruned = Vec::new();
        for ifname in self.pinned_interfaces() {
            let pins = TcxLinkPins::new(&self.pin_dir, &ifname);
            let current = sys::ifindex(&ifname);
            let stale = Hook::BOTH.iter().any(|h| match sys::pinned_link_facts(&pins.path(*h)) {
                Ok(f) => f.ifindex == 0 || Some(f.ifindex) != current,
                Err(_) => true,
            });
            if stale {
                pins.remove()?;
                pruned.push(ifname);
            }
        }
        Ok(pruned)
    }

    fn attach_tcx(&mut self, ifname: &str, ifindex: u32) -> Result<(), DatapathError> {
        let pins = TcxLinkPins::new(&self.pin_dir, ifname);
        fs::create_dir_all(&pins.dir).map_err(|e| DatapathError::io("create", &pins.dir, e))?;
        for hook in Hook::BOTH {
            let program = hook.program_name();
            let path = pins.path(hook);
            let prog = program_mut(&mut self.ebpf, program)?;
            if path.exists() {
                match adopt_tcx_link(prog, &path, ifindex, hook) {
                    Ok(()) => continue,
                    Err(why) => {
                        tracing::info!(interface = ifname, program, why, "replacing a stale pinned link");
                        detach_and_unpin(&path)?;
                    }
                }
            }
            let attach_err = |e| DatapathError::Attach {
                ifname: ifname.into(),
                program,
                mode: AttachMode::Tcx,
                source: Box::new(e),
            };
            let id = prog
                .attach_with_options(ifname, hook.tc_attach_type(), TcAttachOptions::TcxOrder(LinkOrder::first()))
                .map_err(attach_err)?;
            let link = prog.take_link(id).map_err(attach_err)?;
            let pin_err = |e: Box<dyn std::error::Error + Send + Sync>| DatapathError::PinLink {
                ifname: ifname.into(),
                program,
                path: path.clone(),
                source: e,
            };
            let fd_link = FdLink::try_from(link).map_err(|e| pin_err(Box::new(e)))?;
            // Dropping the returned PinnedLink closes our descriptor; the pin keeps the link.
            fd_link.pin(&path).map_err(|e| pin_err(Box::new(e)))?;
        }
        Ok(())
    }

    fn attach_clsact(&mut self, ifname: &str) -> Result<(), DatapathError> {
        // Fails harmlessly when the interface has a clsact qdisc already.
        let _ = tc::qdisc_add_clsact(ifname);
        for hook in Hook::BOTH {
            let program = hook.program_name();
            let prog = program_mut(&mut self.ebpf, program)?;
            let attach_err = |e| DatapathError::Attach {
                ifname: ifname.into(),
                program,
                mode: AttachMode::Clsact,
                source: Box::new(e),
            };
            let opts = NlOptions { priority: CLSACT_PRIORITY, handle: CLSACT_HANDLE, classid: None };
            let id = match prog.attach_with_options(ifname, hook.tc_attach_type(), TcAttachOptions::Netlink(opts)) {
                Ok(id) => id,
                Err(create_err) => {
                    // Our filter exists (earlier attach): put the current program in it.
                    let existing = SchedClassifierLink::attached(
                        ifname,
                        hook.tc_attach_type(),
                        CLSACT_PRIORITY,
                        CLSACT_HANDLE,
                        None,
                    )
                    .map_err(|_| attach_err(create_err))?;
                    prog.attach_to_link(existing).map_err(attach_err)?
                }
            };
            // The filter must outlive this process: dropping the link would delete it.
            std::mem::forget(prog.take_link(id).map_err(attach_err)?);
        }
        Ok(())
    }
}

/// Puts `prog` into the tcx link pinned at `path` if that link is attached to `ifindex` at
/// the hook's side; otherwise says why not.
fn adopt_tcx_link(prog: &mut SchedClassifier, path: &Path, ifindex: u32, hook: Hook) -> Result<(), String> {
    let facts = sys::pinned_link_facts(path).map_err(|e| format!("unreadable pin: {e}"))?;
    let want_attach = match hook {
        Hook::FromPod => BPF_TCX_INGRESS,
        Hook::ToPod => BPF_TCX_EGRESS,
    };
    if facts.link_type != sys::BPF_LINK_TYPE_TCX || facts.attach_type != want_attach {
        return Err(format!(
            "not a tcx link of this side (type {}, attach type {})",
            facts.link_type, facts.attach_type
        ));
    }
    if facts.ifindex != ifindex {
        return Err(format!("attached to ifindex {} (0: interface gone), not {ifindex}", facts.ifindex));
    }
    let pinned = PinnedLink::from_pin(path).map_err(|e| format!("cannot open pin: {e}"))?;
    let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|e| format!("not a tcx link: {e}"))?;
    let id = prog.attach_to_link(link).map_err(|e| format!("link update failed: {e}"))?;
    // Close our descriptor: the pin alone must hold the link, so that removing it detaches.
    drop(prog.take_link(id).map_err(|e| format!("{e}"))?);
    Ok(())
}

/// Detaches the link pinned at `path` at once and removes the pin; nothing there is fine.
fn detach_and_unpin(path: &Path) -> Result<(), DatapathError> {
    match sys::detach_pinned_link(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        // Not a link (or unreadable): removing the pin is all there is to do.
        Err(e) => tracing::debug!(path = %path.display(), error = %e, "cannot detach pinned link"),
    }
    remove_file(path)
}

/// Removes palisade's clsact filters from `ifname`, if any (errors only mean there were none
/// or no clsact qdisc).
fn remove_clsact_filters(ifname: &str) {
    for hook in Hook::BOTH {
        if let Err(e) = tc::qdisc_detach_program(ifname, hook.tc_attach_type(), hook.program_name()) {
            tracing::trace!(interface = ifname, program = hook.program_name(), error = %e, "no clsact filter removed");
        }
    }
}

fn tcx_unsupported(e: &DatapathError) -> bool {
    let DatapathError::Attach { mode: AttachMode::Tcx, source, .. } = e else {
        return false;
    };
    let aya::programs::ProgramError::SyscallError(s) = source.as_ref() else {
        return false;
    };
    matches!(s.io_error.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP))
}
