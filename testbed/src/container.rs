//! The agent in a container, as its DaemonSet runs it: a Docker engine the testbed starts
//! by itself ([`Dockerd`]: its own state folders and socket, no bridge, no firewall
//! changes, stopped by PID), an image built `FROM scratch` out of the locally built agent
//! and the libraries it links ([`Dockerd::build_agent_image`], recipe
//! `deploy/Containerfile.scratch`: no registry is needed), and a launcher script
//! ([`Dockerd::agent_launcher`]) that the testbed starts in place of the agent binary. The
//! launcher runs `docker run` with the host paths the DaemonSet mounts (bpffs, the node's
//! state, the network namespaces) and the capabilities it needs named (all but
//! CAP_SYS_RESOURCE, never `--privileged`); the agent enters the testbed's node namespace
//! itself (`--netns`). SIGTERM to the launcher reaches the agent (docker's signal proxy);
//! [`Dockerd::kill_agents`] is the SIGKILL of a node losing its pod.
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The recipe of the test image (relative to the repository root).
pub const RECIPE: &str = "deploy/Containerfile.scratch";

/// A Docker engine started by the testbed; stopped (by its PID) and its folders removed
/// on drop.
pub struct Dockerd {
    child: Option<Child>,
    dir: PathBuf,
    /// `unix://...` of its socket.
    pub host: String,
    label: String,
}

impl Dockerd {
    /// Starts `dockerd` with its state under `$TMPDIR/palisade-testbed-<pid>-docker<n>`.
    /// `Err` says why a Docker engine cannot run here (for a test to skip with that reason).
    pub fn start() -> Result<Dockerd, String> {
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let pid = std::process::id();
        let dockerd = which("dockerd").ok_or("dockerd is not installed (ci/setup.sh installs docker.io)")?;
        which("docker").ok_or("the docker client is not installed")?;
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
            if d.docker(&["version", "--format", "{{.Server.Version}}"]).is_ok() {
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

    /// Runs the docker client against this engine; its stdout, or the error.
    pub fn docker(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("docker")
            .args(["-H", &self.host])
            .args(args)
            .env("DOCKER_BUILDKIT", "0")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running docker: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!("docker {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
        }
    }

    /// Builds image `tag` from [`RECIPE`]: `agent`, the shared libraries it links (as `ldd`
    /// lists them, at the same paths) and the CA bundle, nothing else.
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
        let ctx_s = ctx.display().to_string();
        self.docker(&["build", "-q", "-t", tag, "-f", &format!("{ctx_s}/Containerfile"), &ctx_s])?;
        Ok(())
    }

    /// Writes the launcher that runs image `image` as the DaemonSet would, inside the
    /// testbed node namespace `node_netns`, with `state_dirs` (the agent's socket, policy
    /// and state folders) mounted at the same paths. The testbed starts it in place of the
    /// agent binary; arguments are passed on to the agent.
    pub fn agent_launcher(&self, image: &str, node_netns: &str, state_dirs: &[&Path]) -> Result<PathBuf, String> {
        let mut mounts = String::new();
        for d in state_dirs {
            let d = d.display();
            mounts.push_str(&format!(" -v '{d}:{d}'"));
        }
        let script = format!(
            "#!/bin/sh\n# Generated by palisade-testbed: the agent as its DaemonSet runs it, in a container.\n\
             exec docker -H '{host}' run --rm --label '{label}' --network none \\\n  \
             --cap-add ALL --cap-drop SYS_RESOURCE --security-opt seccomp=unconfined \\\n  \
             -v /sys/fs/bpf:/sys/fs/bpf -v /var/run/netns:/var/run/netns{mounts} \\\n  \
             -e NO_COLOR=1 '{image}' --netns '/var/run/netns/{node_netns}' \"$@\"\n",
            host = self.host,
            label = self.label,
        );
        let path = self.dir.join("agent-in-container.sh");
        std::fs::write(&path, script).map_err(|e| e.to_string())?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
        Ok(path)
    }

    /// The IDs of the running agent containers this testbed started.
    pub fn agent_containers(&self) -> Vec<String> {
        self.docker(&["ps", "-q", "--filter", &format!("label={}", self.label)])
            .map(|out| out.split_whitespace().map(String::from).collect())
            .unwrap_or_default()
    }

    /// SIGKILL to every agent container this testbed started (a node losing the pod
    /// outright); returns how many there were.
    pub fn kill_agents(&self) -> usize {
        let ids = self.agent_containers();
        for id in &ids {
            let _ = self.docker(&["kill", "--signal", "KILL", id]);
        }
        ids.len()
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        for id in self.agent_containers() {
            let _ = self.docker(&["rm", "-f", &id]);
        }
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
        }
        unmount_under(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
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
