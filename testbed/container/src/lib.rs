//! The agent in a container, as its DaemonSet runs it, for the testbed's container tests:
//! a Docker engine the test starts by itself ([`Dockerd`]: its own state folders and socket,
//! no bridge, no firewall changes, stopped by PID), an image built `FROM scratch` out of the
//! locally built agent and the libraries it links ([`Dockerd::build_agent_image`], recipe
//! `deploy/Containerfile.scratch`: no registry is needed), and a launcher
//! ([`Dockerd::agent_launcher`]) that the testbed starts in place of the agent binary. The
//! launcher is the `palisade-agent-container` binary of this crate: it runs the image with
//! testcontainers ([`run_agent`]) with the host paths the DaemonSet mounts (bpffs, the node's
//! state, the network namespaces) and the capabilities it needs named (all but
//! `CAP_SYS_RESOURCE`, never `--privileged`); the agent enters the testbed's node namespace
//! itself (`--netns`). SIGTERM to the launcher stops the container (SIGTERM to the agent,
//! as a rolling update does); [`Dockerd::kill_agents`] is the SIGKILL of a node losing its
//! pod.
//!
//! What testcontainers cannot do here, and the workaround (docs/kubernetes.md says the same):
//! - testcontainers 0.28 speaks Docker API 1.53 and nothing older (bollard's default
//!   version, not negotiated); the engine installable here (Debian's docker.io 20.10)
//!   answers at most 1.41 and refuses newer clients. The launcher puts a small proxy
//!   ([`serve_api_version_proxy`]) between testcontainers and the engine that rewrites the
//!   version in the request path to the engine's; nothing else is changed.
//! - its image builder always asks for `BuildKit` with a client session, which that engine
//!   cannot serve through the proxy: the image is built with the engine's classic builder,
//!   through the same Docker API client testcontainers uses (bollard), with the version
//!   negotiated.
//! - starting the engine itself is not what testcontainers does: [`Dockerd::start`] runs
//!   `dockerd`.
use std::collections::HashMap;
use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use testcontainers::bollard::Docker;
use testcontainers::bollard::query_parameters::{
    BuildImageOptionsBuilder, BuilderVersion, KillContainerOptions, ListContainersOptions, RemoveContainerOptions,
};

mod launcher;
mod proxy;

pub use launcher::{LaunchArgs, run_agent};
pub use proxy::serve_api_version_proxy;

/// The recipe of the test image (relative to the repository root).
pub const RECIPE: &str = "deploy/Containerfile.scratch";
/// The launcher binary, built beside the other binaries (`cargo build --bins`).
pub const LAUNCHER: &str = "palisade-agent-container";

/// A Docker engine started by the test; stopped (by its PID) and its folders removed on
/// drop, with every container it ran for this test.
pub struct Dockerd {
    child: Option<Child>,
    dir: PathBuf,
    /// `unix://...` of its socket.
    pub host: String,
    label: String,
}

/// A Docker API client of the engine at `host` (`unix://...`), at the API version the
/// engine speaks.
pub async fn connect(host: &str) -> Result<Docker, String> {
    let docker = Docker::connect_with_unix(host, 120, testcontainers::bollard::API_DEFAULT_VERSION)
        .map_err(|e| format!("connecting to the Docker engine at {host}: {e}"))?;
    docker.negotiate_version().await.map_err(|e| format!("asking the Docker engine at {host} its API version: {e}"))
}

/// Runs `f` on a runtime of its own, on a thread of its own (callable from inside or outside
/// another runtime, and from `Drop`).
fn blocking<T: Send + 'static>(f: impl std::future::Future<Output = T> + Send + 'static) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime").block_on(f)
    })
    .join()
    .expect("the Docker client thread does not panic")
}

impl Dockerd {
    /// Starts `dockerd` with its state under `$TMPDIR/palisade-testbed-<pid>-docker<n>`.
    /// `Err` says why a Docker engine cannot run here (for a test to skip with that reason).
    pub fn start() -> Result<Dockerd, String> {
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let pid = std::process::id();
        let dockerd = which("dockerd").ok_or("dockerd is not installed (ci/setup.sh installs docker.io)")?;
        // Unique per engine: tests of one process may each start one.
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("palisade-testbed-{pid}-docker{n}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let host = format!("unix://{}", dir.join("docker.sock").display());
        let log = std::fs::File::create(dir.join("dockerd.log")).map_err(|e| e.to_string())?;
        let child = Command::new(dockerd)
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .args(["-H", &host])
            // Nothing outside the testbed changes: no bridge, no NAT, no firewall rules.
            .args(["--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-forward=false"])
            .args(["--ip-masq=false", "--userland-proxy=false", "--log-level=warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting dockerd: {e}"))?;
        let mut d = Dockerd { child: Some(child), dir, host, label: format!("palisade-testbed={pid}-{n}") };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let host = d.host.clone();
            if blocking(async move { connect(&host).await?.ping().await.map_err(|e| e.to_string()) }).is_ok() {
                return Ok(d);
            }
            if let Some(c) = d.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                return Err(format!("dockerd exited ({status}): {}", d.log_tail()));
            }
            if Instant::now() >= deadline {
                return Err(format!("dockerd did not answer within 30 s: {}", d.log_tail()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    /// Builds image `tag` (`name:tag`) from [`RECIPE`]: `agent`, the shared libraries it
    /// links (as `ldd` lists them, at the same paths) and the CA bundle, nothing else.
    pub fn build_agent_image(&self, tag: &str, agent: &Path, recipe: &Path) -> Result<(), String> {
        let ctx = self.dir.join("image");
        let rootfs = ctx.join("rootfs");
        let _ = std::fs::remove_dir_all(&ctx);
        let bin = rootfs.join("usr/local/bin");
        std::fs::create_dir_all(&bin).map_err(|e| e.to_string())?;
        std::fs::copy(agent, bin.join("palisade-agent")).map_err(|e| format!("copying {}: {e}", agent.display()))?;
        for lib in linked_libraries(agent)? {
            let to = rootfs.join(lib.strip_prefix("/").unwrap_or(&lib));
            std::fs::create_dir_all(to.parent().unwrap_or(&rootfs)).map_err(|e| e.to_string())?;
            std::fs::copy(&lib, &to).map_err(|e| format!("copying {}: {e}", lib.display()))?;
        }
        // The CA bundle, as distroless/cc has it: the API client loads the system roots.
        let ca = Path::new("/etc/ssl/certs/ca-certificates.crt");
        if ca.is_file() {
            let to = rootfs.join("etc/ssl/certs");
            std::fs::create_dir_all(&to).map_err(|e| e.to_string())?;
            std::fs::copy(ca, to.join("ca-certificates.crt")).map_err(|e| format!("copying {}: {e}", ca.display()))?;
        }
        std::fs::copy(recipe, ctx.join("Containerfile")).map_err(|e| format!("copying {}: {e}", recipe.display()))?;
        let (host, tag) = (self.host.clone(), tag.to_string());
        blocking(async move {
            let mut archive = tokio_tar::Builder::new(Vec::new());
            archive.append_dir_all(".", &ctx).await.map_err(|e| format!("packing {}: {e}", ctx.display()))?;
            let context = archive.into_inner().await.map_err(|e| format!("packing {}: {e}", ctx.display()))?;
            let docker = connect(&host).await?;
            let options = BuildImageOptionsBuilder::new()
                .dockerfile("Containerfile")
                .t(&tag)
                .rm(true)
                .version(BuilderVersion::BuilderV1)
                .build();
            let mut progress =
                docker.build_image(options, None, Some(testcontainers::bollard::body_full(context.into())));
            while let Some(step) = progress.next().await {
                let step = step.map_err(|e| format!("building image {tag}: {e}"))?;
                if let Some(e) = step.error_detail.and_then(|d| d.message) {
                    return Err(format!("building image {tag}: {e}"));
                }
            }
            Ok(())
        })
    }

    /// Writes the launcher that runs image `image` as the DaemonSet would, inside the
    /// testbed node namespace `node_netns`, with `state_dirs` (the agent's socket, policy
    /// and state folders) mounted at the same paths: a script that runs `launcher` (the
    /// [`LAUNCHER`] binary) against this engine. The testbed starts it in place of the
    /// agent binary; arguments are passed on to the agent.
    pub fn agent_launcher(
        &self,
        launcher: &Path,
        image: &str,
        node_netns: &str,
        state_dirs: &[&Path],
    ) -> Result<PathBuf, String> {
        let mut mounts = String::new();
        for d in state_dirs {
            let _ = write!(mounts, " --mount '{}'", d.display());
        }
        let script = format!(
            "#!/bin/sh\n# Generated by the container tests: the agent as its DaemonSet runs it, in a container.\n\
             exec '{launcher}' --docker-host '{host}' --label '{label}' --image '{image}' \\\n  \
             --netns '/var/run/netns/{node_netns}'{mounts} -- \"$@\"\n",
            launcher = launcher.display(),
            host = self.host,
            label = self.label,
        );
        let path = self.dir.join("agent-in-container.sh");
        std::fs::write(&path, script).map_err(|e| e.to_string())?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
        Ok(path)
    }

    /// The IDs of the running agent containers this test started.
    pub async fn agent_containers(&self) -> Vec<String> {
        let Ok(docker) = connect(&self.host).await else { return Vec::new() };
        let filters = HashMap::from([("label".to_string(), vec![self.label.clone()])]);
        let list = docker.list_containers(Some(ListContainersOptions { filters: Some(filters), ..Default::default() }));
        list.await.unwrap_or_default().into_iter().filter_map(|c| c.id).collect()
    }

    /// SIGKILL to every agent container this test started (a node losing the pod
    /// outright); returns how many there were.
    pub async fn kill_agents(&self) -> usize {
        let ids = self.agent_containers().await;
        if let Ok(docker) = connect(&self.host).await {
            for id in &ids {
                let _ = docker.kill_container(id, Some(KillContainerOptions { signal: "SIGKILL".into() })).await;
            }
        }
        ids.len()
    }
}

/// Removes every container (running or not) with `label` from the engine at `host`.
async fn remove_all(host: &str, label: &str) {
    let Ok(docker) = connect(host).await else { return };
    let filters = HashMap::from([("label".to_string(), vec![label.to_string()])]);
    let Ok(list) = docker
        .list_containers(Some(ListContainersOptions { all: true, filters: Some(filters), ..Default::default() }))
        .await
    else {
        return;
    };
    for id in list.into_iter().filter_map(|c| c.id) {
        let _ = docker.remove_container(&id, Some(RemoveContainerOptions { force: true, ..Default::default() })).await;
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let (host, label) = (self.host.clone(), self.label.clone());
        blocking(async move { remove_all(&host, &label).await });
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(100));
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
            unmount_under(&self.dir);
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Unmounts (lazily) whatever is still mounted under `dir` (an engine killed mid-way
/// leaves overlay and namespace mounts behind).
fn unmount_under(dir: &Path) {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    let mut points: Vec<PathBuf> =
        text.lines().filter_map(|l| l.split(' ').nth(4)).map(PathBuf::from).filter(|p| p.starts_with(dir)).collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// `name` on PATH.
fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// The shared libraries `binary` links, with the dynamic loader, as `ldd` resolves them.
fn linked_libraries(binary: &Path) -> Result<Vec<PathBuf>, String> {
    let out = Command::new("ldd").arg(binary).output().map_err(|e| format!("running ldd: {e}"))?;
    if !out.status.success() {
        return Err(format!("ldd {}: {}", binary.display(), String::from_utf8_lossy(&out.stderr).trim()));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = l.split("=>").nth(1).unwrap_or(l).split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}
