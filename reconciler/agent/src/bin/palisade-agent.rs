//! `palisade-agent`: the node agent. Loads the datapath, starts the actors and serves the
//! local API. SIGTERM/SIGINT stop the agent but leave the datapath (pinned maps and
//! program links) in place, so enforcement continues across restarts.
//!
//! Every flag can also be set through the environment (`PALISADE_*`, shown in `--help`),
//! which is how the DaemonSet's ConfigMap configures it. `--kubernetes` adds the
//! Kubernetes source (kubeconfig or in-cluster configuration, as kube-rs finds it).
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use palisade_agent::actors::{Agent, AgentConfig};

#[derive(Parser, Debug)]
#[command(name = "palisade-agent", version, about = "palisade node agent: network policy enforced by eBPF")]
struct Args {
    /// Directory in bpffs where maps and program links are pinned.
    #[arg(long, env = "PALISADE_BPFFS", default_value = "/sys/fs/bpf/palisade")]
    bpffs: PathBuf,
    /// Directory of policy manifests (YAML or JSON), re-read when a file changes.
    #[arg(long, env = "PALISADE_POLICY_DIR", default_value = "/etc/palisade/policies")]
    policy_dir: PathBuf,
    /// Unix socket of the local API (created with mode 0600).
    #[arg(long, env = "PALISADE_API_SOCKET", default_value = "/run/palisade/agent.sock")]
    api_socket: PathBuf,
    /// Cluster name (label io.cilium.k8s.policy.cluster of every pod).
    #[arg(long, env = "PALISADE_CLUSTER", default_value = "default")]
    cluster: String,
    /// Seconds between full compares of the kernel maps against what the agent applied
    /// (repairing what changed behind its back); 0 turns the check off.
    #[arg(long, env = "PALISADE_REPAIR_INTERVAL_SECS", default_value_t = 10)]
    repair_interval_secs: u64,
    /// Size of an eBPF map, NAME=ENTRIES (repeatable, or comma-separated in the
    /// environment), e.g. POLICY=524288. Maps: ENDPOINTS, IPCACHE_V4, IPCACHE_V6,
    /// IPCACHE_HOST_V4, IPCACHE_HOST_V6, POLICY, POLICY_LENGTHS, CONNTRACK, FRAGMENTS.
    #[arg(long = "map-size", env = "PALISADE_MAP_SIZES", value_delimiter = ',')]
    map_sizes: Vec<String>,
    /// Seconds between re-reads of the policy directory (besides inotify).
    #[arg(long, env = "PALISADE_POLICY_RESCAN_SECS", default_value_t = 2)]
    policy_rescan_secs: u64,
    /// Watch CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, NetworkPolicy, Namespaces
    /// and Pods in the Kubernetes API (kubeconfig, or the in-cluster service account).
    #[arg(long, env = "PALISADE_KUBERNETES")]
    kubernetes: bool,
    /// This node's name, as in the pods' spec.nodeName (Kubernetes mode).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Seconds between full reconcile passes of the Kubernetes source.
    #[arg(long, env = "PALISADE_KUBE_RESYNC_SECS", default_value_t = 5)]
    kube_resync_secs: u64,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PALISADE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let map_sizes = match palisade_agent::datapath::MapSizes::with_overrides(&args.map_sizes) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("palisade-agent: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let config = AgentConfig {
        bpffs: args.bpffs,
        policy_dir: args.policy_dir,
        cluster: args.cluster,
        repair_interval: Duration::from_secs(args.repair_interval_secs),
        policy_rescan_interval: Duration::from_secs(args.policy_rescan_secs.max(1)),
        map_sizes,
    };
    let socket = args.api_socket;
    let kube = match (args.kubernetes, args.node_name) {
        (false, _) => None,
        (true, Some(node)) if !node.is_empty() => Some(palisade_agent::k8s::KubeOptions {
            node_name: node,
            cluster: config.cluster.clone(),
            resync: Duration::from_secs(args.kube_resync_secs.max(1)),
        }),
        (true, _) => {
            eprintln!(
                "palisade-agent: --kubernetes needs this node's name: pass --node-name or set NODE_NAME (in a DaemonSet, from the downward API spec.nodeName)"
            );
            return std::process::ExitCode::FAILURE;
        }
    };
    let system = actix_rt::System::new();
    let result = system.block_on(async move {
        let agent = match Agent::start(config) {
            Ok(a) => a,
            Err(e) => return Err(format!("cannot start the datapath: {e}")),
        };
        if let Some(opts) = kube {
            let client = kube::Client::try_default().await.map_err(|e| {
                format!("Kubernetes mode: no usable configuration ({e}); set KUBECONFIG or run in a pod with a service account")
            })?;
            actix_rt::spawn(palisade_agent::k8s::run(agent.clone(), client, opts));
        }
        let server = tokio::spawn({
            let socket = socket.clone();
            async move { palisade_agent::api::server::serve(agent, &socket).await }
        });
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| format!("installing the SIGTERM handler: {e}"))?;
        let outcome = tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: stopping; the datapath stays loaded"); Ok(()) }
            _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: stopping; the datapath stays loaded"); Ok(()) }
            r = server => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("local API on {}: {e}", socket.display())),
                Err(e) => Err(format!("local API task: {e}")),
            },
        };
        let _ = std::fs::remove_file(&socket);
        outcome
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("palisade-agent: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
