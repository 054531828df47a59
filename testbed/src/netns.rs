//! Network namespaces the testbed owns: creation and removal (`ip netns`, so they show up
//! in `ip netns list` and interoperate with other tools), running code inside one, and the
//! `ip` command runner the topology uses.
//!
//! Code runs "inside" a namespace on a fresh thread that `setns`'d into it: that thread's
//! sockets belong to the namespace for good, even when they are used from other threads
//! afterwards, and its writes to `/proc/sys/net` change that namespace's settings.
use std::fs::File;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::Command;

use nix::sched::{CloneFlags, setns};

use crate::cleanup;
use crate::error::SetupError;

/// Where `ip netns` keeps its namespace handles.
pub const NETNS_DIR: &str = "/var/run/netns";

/// A network namespace created by this run; removed when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
    _guard: cleanup::Guard,
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
            let _ = Command::new("ip").args(["netns", "delete", &owned]).output();
        })?;
        if let Err(e) = ip(&["netns", "add", name]) {
            // Whatever is there under that name now is not ours to remove.
            guard.disarm();
            return Err(e);
        }
        let ns = Netns { name: name.to_string(), _guard: guard };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
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

    /// Runs `ip -n <this namespace> ARGS...`.
    pub fn ip(&self, args: &[&str]) -> Result<(), SetupError> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
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

/// Runs `ip ARGS...`; a non-zero exit is an error carrying its stderr.
pub fn ip(args: &[&str]) -> Result<(), SetupError> {
    let command = format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| SetupError::Spawn { command: command.clone(), source })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(SetupError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Names of the namespaces in `ip netns list` that start with `prefix`.
pub fn list_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else { return Vec::new() };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}
