//! The few system calls aya does not expose: the interface and program of a pinned tcx link
//! (to tell whether a link left by an earlier agent still belongs to an interface), the bpffs
//! check, the memlock limit, and the map commands on raw bytes behind the kernel's
//! [`MapBackend`](super::MapBackend): by batch (`BPF_MAP_UPDATE_BATCH`,
//! `BPF_MAP_DELETE_BATCH`, `BPF_MAP_LOOKUP_BATCH`, which aya 0.14 does not offer) and the
//! single-element commands beside them for maps or kernels without batch support.
use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// `ENOTSUPP` (kernel-internal, but returned to user space by some map types).
const ENOTSUPP: i32 = 524;
/// `BPF_LINK_TYPE_TCX` from linux/bpf.h.
pub const BPF_LINK_TYPE_TCX: u32 = 11;

/// Whether `path` (which must exist) is on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    let st = nix::sys::statfs::statfs(path).map_err(io::Error::from)?;
    Ok(st.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}

/// Raises `RLIMIT_MEMLOCK` as far as allowed. Kernels since 5.11 charge BPF memory to the
/// cgroup instead, so failure only matters on older kernels and is not an error here.
pub fn raise_memlock_limit() {
    // SAFETY: plain libc calls on a local struct.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &raw mut lim) != 0 || lim.rlim_cur == libc::RLIM_INFINITY {
            return;
        }
        let want = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
        if libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const want) != 0 {
            // Without CAP_SYS_RESOURCE the hard limit cannot be raised; take what is allowed.
            let soft = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            let _ = libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const soft);
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

/// `bpf_attr` for the single-element map commands.
#[repr(C, align(8))]
struct ElemAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `bpf_attr` for the batch map commands.
#[repr(C, align(8))]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// A map write that stopped: how many elements were done before `error`.
#[derive(Debug)]
pub struct PartialWrite {
    pub done: usize,
    pub error: io::Error,
}

/// Whether `e` says the map (or kernel) has no such command: try the single-element one.
pub fn batch_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP | libc::ENOSYS))
}

/// Whether `e` says the map is full.
pub fn map_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC))
}

/// Writes `count` elements: `keys` and `values` are `count` keys of `key_size` bytes and
/// `count` values of `value_size` bytes, back to back. One `BPF_MAP_UPDATE_BATCH` call; on
/// error the kernel has written the first `done` elements.
pub fn map_update_batch(
    fd: BorrowedFd<'_>,
    keys: &[u8],
    values: &[u8],
    count: usize,
    flags: u64,
) -> Result<(), PartialWrite> {
    batch_call(BPF_MAP_UPDATE_BATCH, fd, keys, Some(values), count, flags)
}

/// Deletes `count` keys (back to back in `keys`) with one `BPF_MAP_DELETE_BATCH` call. The
/// kernel stops at the first key that is missing (ENOENT) after deleting the `done` before
/// it.
pub fn map_delete_batch(fd: BorrowedFd<'_>, keys: &[u8], count: usize) -> Result<(), PartialWrite> {
    batch_call(BPF_MAP_DELETE_BATCH, fd, keys, None, count, 0)
}

fn batch_call(
    cmd: libc::c_long,
    fd: BorrowedFd<'_>,
    keys: &[u8],
    values: Option<&[u8]>,
    count: usize,
    elem_flags: u64,
) -> Result<(), PartialWrite> {
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.map_or(0, |v| v.as_ptr() as u64),
        count: count as u32,
        map_fd: fd.as_raw_fd() as u32,
        elem_flags,
        flags: 0,
    };
    // SAFETY: `attr` points at `count` keys (and values) the caller laid out for this map;
    // the buffers outlive the call.
    let r = unsafe { bpf(cmd, (&raw mut attr).cast(), size_of::<BatchAttr>()) };
    if r < 0 {
        let error = io::Error::last_os_error();
        // The kernel reports in `count` how many elements it processed.
        return Err(PartialWrite { done: (attr.count as usize).min(count), error });
    }
    Ok(())
}

/// Writes one element (`BPF_MAP_UPDATE_ELEM`).
pub fn map_update_elem(fd: BorrowedFd<'_>, key: &[u8], value: &[u8], flags: u64) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        pad: 0,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        flags,
    };
    // SAFETY: `key` and `value` have the map's sizes and outlive the call.
    let r = unsafe { bpf(BPF_MAP_UPDATE_ELEM, (&raw mut attr).cast(), size_of::<ElemAttr>()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Deletes one element (`BPF_MAP_DELETE_ELEM`).
pub fn map_delete_elem(fd: BorrowedFd<'_>, key: &[u8]) -> io::Result<()> {
    let mut attr = ElemAttr { map_fd: fd.as_raw_fd() as u32, pad: 0, key: key.as_ptr() as u64, value: 0, flags: 0 };
    // SAFETY: `key` has the map's key size and outlives the call.
    let r = unsafe { bpf(BPF_MAP_DELETE_ELEM, (&raw mut attr).cast(), size_of::<ElemAttr>()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads up to `count` elements with one `BPF_MAP_LOOKUP_BATCH` call into `keys` and `values`
/// (room for `count` of each), continuing after `token` (`None`: from the start). Returns
/// how many were read and whether the map is done; `token` is set for the next call.
pub fn map_lookup_batch(
    fd: BorrowedFd<'_>,
    token: &mut Option<u64>,
    keys: &mut [u8],
    values: &mut [u8],
    count: usize,
) -> Result<(usize, bool), io::Error> {
    let mut out: u64 = 0;
    let mut in_batch: u64 = token.unwrap_or(0);
    let mut attr = BatchAttr {
        in_batch: if token.is_some() { (&raw mut in_batch) as u64 } else { 0 },
        out_batch: (&raw mut out) as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: count as u32,
        map_fd: fd.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: `keys` and `values` have room for `count` elements of the map's sizes; the
    // batch tokens are 8 bytes (the kernel uses at most that for the maps read here); all
    // outlive the call.
    let r = unsafe { bpf(BPF_MAP_LOOKUP_BATCH, (&raw mut attr).cast(), size_of::<BatchAttr>()) };
    let read = (attr.count as usize).min(count);
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOENT) {
            return Ok((read, true));
        }
        return Err(e);
    }
    *token = Some(out);
    Ok((read, false))
}

/// Looks `key` up (`BPF_MAP_LOOKUP_ELEM`; an LPM trie answers its longest prefix match) into
/// `value`; `false` when there is no entry.
pub fn map_lookup_elem(fd: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        pad: 0,
        key: key.as_ptr() as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: `key` has the map's key size, `value` room for its value size; both outlive
    // the call.
    let r = unsafe { bpf(BPF_MAP_LOOKUP_ELEM, (&raw mut attr).cast(), size_of::<ElemAttr>()) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENOENT) { Ok(false) } else { Err(e) };
    }
    Ok(true)
}

/// The key after `key` (`None`: the first) into `next` (`BPF_MAP_GET_NEXT_KEY`); `false` when
/// there is none. A `key` that is not in the map gives the first key.
pub fn map_get_next_key(fd: BorrowedFd<'_>, key: Option<&[u8]>, next: &mut [u8]) -> io::Result<bool> {
    // The attribute of BPF_MAP_GET_NEXT_KEY: map_fd, key, next_key (as `ElemAttr`, with
    // `value` holding next_key).
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        pad: 0,
        key: key.map_or(0, |k| k.as_ptr() as u64),
        value: next.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: `key` (if any) and `next` have the map's key size and outlive the call.
    let r = unsafe { bpf(BPF_MAP_GET_NEXT_KEY, (&raw mut attr).cast(), size_of::<ElemAttr>()) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENOENT) { Ok(false) } else { Err(e) };
    }
    Ok(true)
}
