//! A real etcd for tests (Debian's `etcd-server`, installed by `ci/setup.sh`): one member,
//! its own data directory, listening only where the caller says (127.0.0.1 by default),
//! stopped by its PID and its directory removed when the guard is dropped. It can be
//! stopped and started again on the same data (etcd down) or on an empty one (etcd wiped).
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a starting etcd may take to accept connections.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A running (or stopped) etcd member.
pub struct Etcd {
    child: Option<Child>,
    dir: PathBuf,
    client: SocketAddr,
    peer: SocketAddr,
    /// Runs on the command before it is spawned (e.g. to enter a network namespace).
    prepare: Box<dyn Fn(&mut Command) + Send + Sync>,
}

/// A free TCP port on 127.0.0.1 (bound and released: another process could take it first,
/// which a test then sees as etcd failing to start).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Whether the `etcd` binary is installed.
pub fn installed() -> bool {
    Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Etcd {
    /// An etcd on 127.0.0.1 with free ports, in a new directory under the temp dir.
    pub fn start_local() -> std::io::Result<Etcd> {
        let client = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let peer = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let dir = std::env::temp_dir().join(format!("palisade-etcd-{}-{}", std::process::id(), client.port()));
        Etcd::start(dir, client, peer, Box::new(|_| {}), true)
    }

    /// An etcd in `dir` (created; removed on drop) on these addresses, the command passed
    /// through `prepare` first. With `wait`, returns once it accepts connections (where
    /// the caller can connect to `client` from its own namespace).
    pub fn start(
        dir: PathBuf,
        client: SocketAddr,
        peer: SocketAddr,
        prepare: Box<dyn Fn(&mut Command) + Send + Sync>,
        wait: bool,
    ) -> std::io::Result<Etcd> {
        std::fs::create_dir_all(&dir)?;
        let mut e = Etcd { child: None, dir, client, peer, prepare };
        e.spawn()?;
        if wait {
            e.wait_ready(START_TIMEOUT)?;
        }
        Ok(e)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("etcd.log"))?;
        let client = format!("http://{}", self.client);
        let peer = format!("http://{}", self.peer);
        let mut cmd = Command::new("etcd");
        cmd.arg("--name")
            .arg("palisade-test")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("palisade-test={peer}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        (self.prepare)(&mut cmd);
        self.child = Some(cmd.spawn()?);
        Ok(())
    }

    /// Waits until etcd accepts TCP connections on its client address.
    pub fn wait_ready(&mut self, timeout: Duration) -> std::io::Result<()> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                return Err(std::io::Error::other(format!(
                    "etcd exited at start ({status}); see {}",
                    self.log().display()
                )));
            }
            if TcpStream::connect_timeout(&self.client, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(std::io::Error::other(format!(
            "etcd not listening on {} after {timeout:?}; see {}",
            self.client,
            self.log().display()
        )))
    }

    /// `http://ADDR:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.client)
    }

    pub fn client_addr(&self) -> SocketAddr {
        self.client
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("etcd.log")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops etcd (SIGKILL to its PID) and reaps it; the data stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same data (after [`Etcd::stop`]).
    pub fn restart(&mut self, wait: bool) -> std::io::Result<()> {
        self.stop();
        self.spawn()?;
        if wait {
            self.wait_ready(START_TIMEOUT)?;
        }
        Ok(())
    }

    /// Stops it, removes its data and starts it empty.
    pub fn wipe(&mut self, wait: bool) -> std::io::Result<()> {
        self.stop();
        std::fs::remove_dir_all(self.data_dir())?;
        self.restart(wait)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
