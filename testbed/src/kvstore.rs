//! The testbed's etcd for `--kvstore` (kvstore mode): one etcd member inside the first
//! node's network namespace, listening on that node's address (port 2379, peers 2380), so
//! every node reaches it over the underlay and nothing listens outside the testbed. Its
//! data directory is in the run's temporary directory; the process is stopped by its PID
//! (and dies with the testbed if that is killed outright) and the directory removed when
//! the session ends. Tests stop, restart and wipe it through [`TestbedEtcd`].
use std::fs::File;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use palisade_privileged::etcd::{self, Etcd};

use crate::cleanup;
use crate::error::SetupError;
use crate::netns::Netns;

/// The client port inside the node's namespace.
pub const CLIENT_PORT: u16 = 2379;
/// Lease TTL the testbed gives every agent (short: a node gone is forgotten quickly).
pub const LEASE_TTL_SECS: u64 = 4;

/// The etcd of a session.
pub struct TestbedEtcd {
    etcd: Arc<Mutex<Option<Etcd>>>,
    netns: File,
    url: String,
    client: SocketAddr,
    _guard: cleanup::Guard,
}

impl TestbedEtcd {
    /// Starts etcd in `node`'s namespace on `address`, its data in `dir`; waits until it
    /// accepts connections there.
    pub fn start(node: &Netns, address: IpAddr, dir: PathBuf) -> Result<TestbedEtcd, SetupError> {
        if !etcd::installed() {
            return Err(SetupError::Unsupported(
                "--kvstore needs etcd (Debian's etcd-server; ci/setup.sh installs it)".into(),
            ));
        }
        let client = SocketAddr::new(address, CLIENT_PORT);
        let peer = SocketAddr::new(address, CLIENT_PORT + 1);
        let ns = Arc::new(node.open()?);
        let prepare = {
            let ns = ns.clone();
            move |cmd: &mut std::process::Command| {
                cmd.process_group(0);
                crate::netns::enter_on_spawn(
                    cmd,
                    ns.as_raw_fd(),
                    libc::SIGKILL,
                    "the testbed exited while starting etcd",
                );
            }
        };
        let slot: Arc<Mutex<Option<Etcd>>> = Arc::default();
        let guard = {
            let slot = slot.clone();
            cleanup::register(format!("etcd on {client}"), move || {
                drop(slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take());
            })?
        };
        let e = Etcd::start(dir, client, peer, Box::new(prepare), false)
            .map_err(SetupError::io(format!("starting etcd on {client}")))?;
        let log = e.log();
        *slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e);
        let netns = File::open(node.path()).map_err(SetupError::io("opening the node's namespace"))?;
        let me = TestbedEtcd { etcd: slot, netns, url: format!("http://{client}"), client, _guard: guard };
        me.wait_ready().map_err(|e| SetupError::Unsupported(format!("{e}; see {}", log.display())))?;
        Ok(me)
    }

    /// `http://ADDR:2379`, as the agents are given it.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The PID of the etcd process, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.with(|e| e.pid()).flatten()
    }

    fn with<T>(&self, f: impl FnOnce(&mut Etcd) -> T) -> Option<T> {
        self.etcd.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_mut().map(f)
    }

    /// Waits (bounded) until etcd accepts connections inside the node's namespace.
    pub fn wait_ready(&self) -> Result<(), SetupError> {
        let ns = self.netns.try_clone().map_err(SetupError::io("duplicating a namespace handle"))?;
        let client = self.client;
        let ok = crate::netns::run_in(ns, move || {
            let start = Instant::now();
            while start.elapsed() < etcd::START_TIMEOUT {
                if TcpStream::connect_timeout(&client, Duration::from_millis(200)).is_ok() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            false
        })?;
        if ok {
            Ok(())
        } else {
            Err(SetupError::Unsupported(format!("etcd not listening on {client} after {:?}", etcd::START_TIMEOUT)))
        }
    }

    /// Stops etcd (its data stays).
    pub fn stop(&self) {
        self.with(Etcd::stop);
    }

    /// Starts it again on its data and waits until it answers.
    pub fn restart(&self) -> Result<(), SetupError> {
        self.with(|e| e.restart(false)).transpose().map_err(SetupError::io("restarting etcd"))?;
        self.wait_ready()
    }

    /// Stops it, removes its data and starts it empty.
    pub fn wipe(&self) -> Result<(), SetupError> {
        self.with(|e| e.wipe(false)).transpose().map_err(SetupError::io("wiping etcd"))?;
        self.wait_ready()
    }
}
