//! `palisade-agent-container --docker-host H --label K=V --image I --netns P [--mount DIR]...
//! -- AGENT ARGS`: the agent image run in a container as its DaemonSet runs it, on the test's
//! Docker engine, through testcontainers (see the library). The container tests have the
//! testbed start it in place of the agent binary: SIGTERM stops the container, and it exits
//! with the agent's exit code.
use std::process::ExitCode;

use palisade_agent_container::{LaunchArgs, connect, run_agent, serve_api_version_proxy};

fn main() -> ExitCode {
    let args = match LaunchArgs::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("palisade-agent-container: {e}");
            return ExitCode::from(2);
        }
    };
    let engine = std::path::PathBuf::from(args.docker_host.trim_start_matches("unix://"));
    let proxy = engine.with_file_name(format!("testcontainers-{}.sock", std::process::id()));
    // testcontainers finds its engine through DOCKER_HOST: the proxy in front of ours.
    // SAFETY: no other thread exists yet (the runtime is built below).
    unsafe { std::env::set_var("DOCKER_HOST", format!("unix://{}", proxy.display())) };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("palisade-agent-container: starting a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = rt.block_on(async {
        let version = connect(&args.docker_host).await?.client_version().to_string();
        let _ = std::fs::remove_file(&proxy);
        let listener =
            tokio::net::UnixListener::bind(&proxy).map_err(|e| format!("listening on {}: {e}", proxy.display()))?;
        tokio::spawn(serve_api_version_proxy(listener, engine, version));
        run_agent(&args).await
    });
    let _ = std::fs::remove_file(&proxy);
    match outcome {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("palisade-agent-container: {e}");
            ExitCode::FAILURE
        }
    }
}
