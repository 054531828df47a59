//! The few system calls aya does not expose: the interface and program of a pinned tcx link
//! (to tell whether a link left by an earlier agent still belongs to an interface), the bpffs
//! check, and the memlock limit.
use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_DETACH: libc::c_long = 34;
/// `BPF_LINK_TYPE_TCX` from linux/bpf.h.
pub const BPF_LINK_TYPE_TCX: u32 = 11;

/// Whether `path` (which must exist) is on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    let st = nix::sys::statfs::statfs(path).map_err(io::Error::from)?;
    Ok(st.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}

/// Raises RLIMIT_MEMLOCK as far as allowed. Kernels since 5.11 charge BPF memory to the
/// cgroup instead, so failure only matters on older kernels and is not an error here.
pub fn raise_memlock_limit() {
    // SAFETY: plain libc calls on a local struct.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) != 0 || lim.rlim_cur == libc::RLIM_INFINITY {
            return;
        }
        let want = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
        if libc::setrlimit(libc::RLIMIT_MEMLOCK, &want) != 0 {
            // Without CAP_SYS_RESOURCE the hard limit cannot be raised; take what is allowed.
            let soft = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            let _ = libc::setrlimit(libc::RLIMIT_MEMLOCK, &soft);
        }
    }
}

/// The interface index of `ifname` in this thread's network namespace.
pub fn ifindex(ifname: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(ifname).ok().filter(|i| *i != 0)
}

#[inline]
unsafe fn bpf(cmd: libc::c_long, attr: *mut u8, size: usize) -> libc::c_long {
    // SAFETY: the caller passes a valid attribute buffer of `size` bytes for `cmd`.
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) }
}

fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        pad: u32,
    }
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjGetAttr { pathname: c.as_ptr() as u64, bpf_fd: 0, file_flags: 0, path_fd: 0, pad: 0 };
    // SAFETY: `attr` is a valid BPF_OBJ_GET attribute; `c` outlives the call.
    let fd = unsafe { bpf(BPF_OBJ_GET, (&raw mut attr).cast(), size_of::<ObjGetAttr>()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// What the kernel says about a pinned link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkFacts {
    pub link_type: u32,
    pub link_id: u32,
    pub prog_id: u32,
    /// tcx links: the interface (0 once the interface is gone).
    pub ifindex: u32,
    /// tcx links: `BPF_TCX_INGRESS` (46) or `BPF_TCX_EGRESS` (47).
    pub attach_type: u32,
}

/// Reads the kernel's information about the link pinned at `path`.
pub fn pinned_link_facts(path: &Path) -> io::Result<LinkFacts> {
    #[repr(C, align(8))]
    struct LinkInfo {
        link_type: u32,
        id: u32,
        prog_id: u32,
        pad: u32,
        // The per-type union; tcx: ifindex, attach_type.
        union: [u32; 32],
    }
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let fd = obj_get(path)?;
    let mut info = LinkInfo { link_type: 0, id: 0, prog_id: 0, pad: 0, union: [0; 32] };
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<LinkInfo>() as u32,
        info: (&raw mut info) as u64,
    };
    // SAFETY: `attr` points at `info`, which is `info_len` bytes long and outlives the call.
    let r = unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, (&raw mut attr).cast(), size_of::<InfoAttr>()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(LinkFacts {
        link_type: info.link_type,
        link_id: info.id,
        prog_id: info.prog_id,
        ifindex: info.union[0],
        attach_type: info.union[1],
    })
}

/// Detaches the link pinned at `path` now (the pin itself stays). Removing the last pin of
/// a link also detaches it, but only later, from a kernel work queue. A link that is already
/// detached (its interface gone) is fine.
pub fn detach_pinned_link(path: &Path) -> io::Result<()> {
    #[repr(C)]
    struct DetachAttr {
        link_fd: u32,
    }
    let fd = obj_get(path)?;
    let mut attr = DetachAttr { link_fd: fd.as_raw_fd() as u32 };
    // SAFETY: `attr` is a valid BPF_LINK_DETACH attribute.
    let r = unsafe { bpf(BPF_LINK_DETACH, (&raw mut attr).cast(), size_of::<DetachAttr>()) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENOLINK) {
            return Err(e);
        }
    }
    Ok(())
}
