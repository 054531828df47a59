//! The launcher's work: run the agent image in a container as the DaemonSet does, through
//! testcontainers, pass SIGTERM on, and end when the container ends, with its exit code.
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use testcontainers::core::Mount;
use testcontainers::core::logs::LogFrame;
use testcontainers::runners::AsyncRunner;
use testcontainers::{GenericImage, ImageExt};

/// What the launcher is told (its command line).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LaunchArgs {
    /// `unix://...` of the engine.
    pub docker_host: String,
    /// `key=value` put on the container (how the test finds its containers).
    pub label: String,
    /// `name:tag` of the image.
    pub image: String,
    /// The node's network namespace, which the agent enters (`--netns`).
    pub netns: String,
    /// Host folders mounted at the same path (the agent's socket, policy and state folders).
    pub mounts: Vec<PathBuf>,
    /// The agent's own arguments.
    pub agent_args: Vec<String>,
}

impl LaunchArgs {
    /// `--docker-host H --label K=V --image I --netns P [--mount DIR]... -- AGENT ARGS...`
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<LaunchArgs, String> {
        let mut out = LaunchArgs::default();
        let mut it = args.into_iter();
        while let Some(flag) = it.next() {
            if flag == "--" {
                out.agent_args = it.collect();
                break;
            }
            let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            match flag.as_str() {
                "--docker-host" => out.docker_host = value,
                "--label" => out.label = value,
                "--image" => out.image = value,
                "--netns" => out.netns = value,
                "--mount" => out.mounts.push(value.into()),
                other => return Err(format!("unknown option {other}")),
            }
        }
        for (what, v) in [("--docker-host", &out.docker_host), ("--image", &out.image), ("--netns", &out.netns)] {
            if v.is_empty() {
                return Err(format!("{what} is required"));
            }
        }
        Ok(out)
    }
}

fn print(frame: &LogFrame) {
    let _ = match frame {
        LogFrame::StdOut(b) => std::io::stdout().write_all(b),
        LogFrame::StdErr(b) => std::io::stderr().write_all(b),
    };
}

/// Runs the container until it exits, or until SIGTERM (then it is stopped: SIGTERM to the
/// agent, SIGKILL after 20 s, as `docker stop` does); answers the agent's exit code.
/// testcontainers must already point at the engine (`DOCKER_HOST`).
pub async fn run_agent(args: &LaunchArgs) -> Result<i64, String> {
    let (name, tag) = args.image.rsplit_once(':').unwrap_or((&args.image, "latest"));
    let (key, value) = args.label.split_once('=').unwrap_or((&args.label, ""));
    let mut cmd = vec!["--netns".to_string(), args.netns.clone()];
    cmd.extend(args.agent_args.iter().cloned());
    let mut request = GenericImage::new(name, tag)
        .with_network("none")
        .with_label(key, value)
        // What the DaemonSet asks for; `--privileged` cannot be applied on these machines
        // (CAP_SYS_RESOURCE is not in the bounding set). CAP_SYS_ADMIN permits bpf().
        .with_cap_add("ALL")
        .with_cap_drop("SYS_RESOURCE")
        .with_security_opt("seccomp=unconfined")
        .with_mount(Mount::bind_mount("/sys/fs/bpf", "/sys/fs/bpf"))
        .with_mount(Mount::bind_mount("/var/run/netns", "/var/run/netns"))
        .with_env_var("NO_COLOR", "1")
        .with_cmd(cmd)
        .with_startup_timeout(Duration::from_mins(1))
        .with_log_consumer(print);
    for m in &args.mounts {
        let m = m.display().to_string();
        request = request.with_mount(Mount::bind_mount(m.clone(), m));
    }
    let container = request.start().await.map_err(|e| format!("starting the agent container: {e}"))?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("catching SIGTERM: {e}"))?;
    loop {
        tokio::select! {
            _ = term.recv() => {
                container.stop_with_timeout(Some(20)).await.map_err(|e| format!("stopping the agent container: {e}"))?;
                break;
            }
            () = tokio::time::sleep(Duration::from_millis(200)) => {
                if !container.is_running().await.unwrap_or(false) {
                    break;
                }
            }
        }
    }
    let code = container.exit_code().await.ok().flatten().unwrap_or(-1);
    // Drops it too: the container is removed.
    let _ = container.rm().await;
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_parses_and_names_what_is_missing() {
        let a = LaunchArgs::parse(
            ["--docker-host", "unix:///d.sock", "--label", "k=v", "--image", "img:t", "--netns", "/n", "--mount", "/a"]
                .into_iter()
                .chain(["--", "--bpffs", "/b"])
                .map(String::from),
        )
        .unwrap();
        assert_eq!(a.mounts, vec![PathBuf::from("/a")]);
        assert_eq!(a.agent_args, vec!["--bpffs".to_string(), "/b".to_string()]);
        let e = LaunchArgs::parse(["--image", "i"].into_iter().map(String::from)).unwrap_err();
        assert!(e.contains("--docker-host is required"), "{e}");
        assert!(LaunchArgs::parse(["--nope", "x"].into_iter().map(String::from)).is_err());
    }
}
