//! Network namespaces the testbed owns: creation and removal (netns-rs, which keeps them
//! where `ip netns` does, so they show up in `ip netns list` and interoperate with other
//! tools), running code inside one, and netlink inside one ([`Netns::netlink`]: links,
//! addresses and routes, with the CNI plugin's rtnetlink handle).
//!
//! Code runs "inside" a namespace on a fresh thread that `setns`'d into it: that thread's
//! sockets belong to the namespace for good, even when they are used from other threads
//! afterwards, and its writes to `/proc/sys/net` change that namespace's settings.
use std::fs::File;
use std::os::fd::AsFd;
use std::path::PathBuf;

use nix::sched::{CloneFlags, setns};
pub use palisade_cni::netlink::{Link, Netlink, NetlinkError, Via};

use crate::cleanup;
use crate::error::SetupError;

/// Where `ip netns` keeps its namespace handles.
pub const NETNS_DIR: &str = "/var/run/netns";

/// A network namespace created by this run; removed when dropped (an [`Netns::alias`]
/// only names it).
#[derive(Debug)]
pub struct Netns {
    name: String,
    guard: Option<cleanup::Guard>,
}

impl Netns {
    /// Creates the namespace `name`, with its loopback up. Fails if it already exists
    /// (never adopts or removes a namespace this run did not create).
    pub fn create(name: &str) -> Result<Netns, SetupError> {
        let path = PathBuf::from(NETNS_DIR).join(name);
        if path.exists() {
            return Err(SetupError::NetnsExists { name: name.to_string() });
        }
        let owned = name.to_string();
        let guard = cleanup::register(format!("network namespace {name}"), move || {
            let _ = delete(&owned);
        })?;
        if let Err(e) = netns_rs::NetNs::new(name) {
            // Whatever is there under that name now is not ours to remove.
            guard.disarm();
            return Err(SetupError::Io {
                what: format!("creating network namespace {name}"),
                source: std::io::Error::other(e.to_string()),
            });
        }
        let ns = Netns { name: name.to_string(), guard: Some(guard) };
        ns.netlink(|nl| nl.set_up(&nl.existing_link("lo")?, "lo"))?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Another handle on the same namespace that does not remove it when dropped (a
    /// host-network pod's namespace is its node's).
    #[must_use]
    pub fn alias(&self) -> Netns {
        Netns { name: self.name.clone(), guard: None }
    }

    /// Whether this handle is an [`Netns::alias`].
    pub fn is_alias(&self) -> bool {
        self.guard.is_none()
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.name)
    }

    /// An open handle on the namespace (for `setns`).
    pub fn open(&self) -> Result<File, SetupError> {
        File::open(self.path())
            .map_err(|source| SetupError::Io { what: format!("opening {}", self.path().display()), source })
    }

    /// Runs `f` on a new thread inside this namespace and returns its result.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, SetupError> {
        run_in(self.open()?, f)
    }

    /// Runs `f` with a netlink handle opened inside this namespace (on a thread there).
    pub fn netlink<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Netlink) -> Result<T, NetlinkError> + Send + 'static,
    ) -> Result<T, SetupError> {
        let name = self.name.clone();
        self.run(move || Netlink::open().and_then(|nl| f(&nl)))?
            .map_err(|e| SetupError::Io { what: format!("in network namespace {name}: {}", e.what), source: e.source })
    }

    /// Writes sysctls (`net/ipv4/ip_forward` style keys under /proc/sys) in this namespace.
    pub fn sysctls(&self, settings: &[(&str, &str)]) -> Result<(), SetupError> {
        let settings: Vec<(String, String)> = settings.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let name = self.name.clone();
        self.run(move || {
            for (key, value) in settings {
                let path = format!("/proc/sys/{key}");
                std::fs::write(&path, &value).map_err(|source| SetupError::Io {
                    what: format!("setting {key}={value} in network namespace {name}"),
                    source,
                })?;
            }
            Ok(())
        })?
    }
}

/// Prepares `cmd` so that its child, between fork and exec, unblocks every signal (the
/// testbed blocks its stop signals, see `cleanup`; the child must get them), joins the
/// network namespace behind `ns_fd`, and gets `death_signal` when the testbed dies; the
/// spawn fails if the testbed already exited (`what` names the child in that error).
/// `ns_fd` must stay open until `spawn` returns.
pub(crate) fn enter_on_spawn(
    cmd: &mut std::process::Command,
    ns_fd: std::os::fd::RawFd,
    death_signal: libc::c_int,
    what: &'static str,
) {
    use std::os::unix::process::CommandExt as _;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe calls (sigemptyset, sigprocmask, setns, prctl, getppid); the caller
    // keeps `ns_fd` open until `spawn` returns.
    unsafe {
        cmd.pre_exec(move || {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&raw mut none);
            if libc::sigprocmask(libc::SIG_SETMASK, &raw const none, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // If the testbed is killed outright (no cleanup possible), the child goes too.
            if libc::prctl(libc::PR_SET_PDEATHSIG, death_signal) != 0 || libc::getppid() != parent {
                return Err(std::io::Error::other(what));
            }
            Ok(())
        });
    }
}

/// Runs `f` on a new thread that first joins the network namespace behind `ns`.
pub fn run_in<T: Send + 'static>(ns: File, f: impl FnOnce() -> T + Send + 'static) -> Result<T, SetupError> {
    let handle = std::thread::Builder::new()
        .name("in-netns".into())
        .spawn(move || {
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)?;
            drop(ns);
            Ok::<T, nix::Error>(f())
        })
        .map_err(|source| SetupError::Io { what: "starting a thread".into(), source })?;
    match handle.join() {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(errno)) => {
            Err(SetupError::Io { what: "entering a network namespace (setns)".into(), source: errno.into() })
        }
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Removes the namespace `name` (as `ip netns delete` does: unmounts and removes its
/// handle; the namespace goes when nothing uses it any more).
pub fn delete(name: &str) -> Result<(), SetupError> {
    let err = |e: netns_rs::Error| SetupError::Io {
        what: format!("removing network namespace {name}"),
        source: std::io::Error::other(e.to_string()),
    };
    netns_rs::NetNs::get(name).map_err(err)?.remove().map_err(err)
}

/// Names of the namespaces in `ip netns list` that start with `prefix`.
pub fn list_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else { return Vec::new() };
    let mut names: Vec<String> = dir
        .filter_map(std::result::Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}
