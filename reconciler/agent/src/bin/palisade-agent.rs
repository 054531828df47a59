//! `palisade-agent`: the node agent. Loads the datapath, starts the actors and serves the
//! local API. SIGTERM/SIGINT stop the agent but leave the datapath (pinned maps and
//! program links) in place, so enforcement continues across restarts (a rolling update);
//! the next agent adopts the pins, restores its endpoints from `--state-dir`, applies
//! nothing until the policy directory is read and the endpoints are restored, and then
//! writes only the difference. `palisade-agent uninstall` removes programs, links, pins
//! and state.
//!
//! Every flag can also be set through the environment (`PALISADE_*`, shown in `--help`),
//! which is how the DaemonSet's ConfigMap configures it. `--kubernetes` adds the
//! Kubernetes source (kubeconfig or in-cluster configuration, as kube-rs finds it).
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use palisade_agent::actors::{Agent, AgentConfig};

#[derive(Parser, Debug)]
#[command(name = "palisade-agent", version, about = "palisade node agent: network policy enforced by eBPF")]
struct Args {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Directory where the endpoint registry and reserved addresses are saved, so that a
    /// restarted agent restores them.
    #[arg(long, env = "PALISADE_STATE_DIR", default_value = palisade_agent::state::StateDir::DEFAULT, global = true)]
    state_dir: PathBuf,
    /// Directory in bpffs where maps and program links are pinned.
    #[arg(long, env = "PALISADE_BPFFS", default_value = "/sys/fs/bpf/palisade", global = true)]
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
    /// environment), e.g. POLICY=524288. Maps: ENDPOINTS, `IPCACHE_V4`, `IPCACHE_V6`,
    /// `IPCACHE_HOST_V4`, `IPCACHE_HOST_V6`, POLICY, `POLICY_LENGTHS`, CONNTRACK, FRAGMENTS.
    #[arg(long = "map-size", env = "PALISADE_MAP_SIZES", value_delimiter = ',')]
    map_sizes: Vec<String>,
    /// How the programs are attached to pod interfaces: `tcx` (bpf links, kernel 6.6 and
    /// later), `clsact` (tc filters), or `auto` (tcx where the kernel has it). A new tcx
    /// link costs the kernel an RCU grace period under the RTNL lock (about 13 ms per hook
    /// here, clsact 0.1 ms): clsact attaches a node full of new pods faster.
    #[arg(long, env = "PALISADE_ATTACH_MODE", default_value = "auto", value_parser = ["auto", "tcx", "clsact"])]
    attach_mode: String,
    /// Seconds between re-reads of the policy directory (besides inotify).
    #[arg(long, env = "PALISADE_POLICY_RESCAN_SECS", default_value_t = 2)]
    policy_rescan_secs: u64,
    /// Watch CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, NetworkPolicy, Namespaces
    /// and Pods in the Kubernetes API (kubeconfig, or the in-cluster service account).
    #[arg(long, env = "PALISADE_KUBERNETES")]
    kubernetes: bool,
    /// Enter this network namespace (a file such as /var/run/netns/NAME or /proc/PID/ns/net)
    /// before anything else: the node's namespace when the agent's container does not run
    /// in it (the testbed's containerized agent). The default is the process's own.
    #[arg(long)]
    netns: Option<std::path::PathBuf>,
    /// Kubeconfig file for Kubernetes mode (default: as kube-rs finds it: $KUBECONFIG,
    /// ~/.kube/config, or the in-cluster service account).
    #[arg(long)]
    kubeconfig: Option<std::path::PathBuf>,
    /// This node's name, as in the pods' spec.nodeName (Kubernetes mode).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Seconds between full reconcile passes of the Kubernetes source.
    #[arg(long, env = "PALISADE_KUBE_RESYNC_SECS", default_value_t = 5)]
    kube_resync_secs: u64,
    /// Address of /metrics (Prometheus), /healthz and /readyz, or `off`. Loopback by
    /// default: only the node itself (kubelet probes, a node-local scraper) reaches it.
    #[arg(long, env = "PALISADE_METRICS_ADDRESS", default_value = palisade_agent::metrics::DEFAULT_ADDRESS)]
    metrics_address: palisade_agent::metrics::ListenAddress,
    /// Kubernetes mode: apply anyway after this many seconds if some list never completes
    /// (e.g. a CRD is not installed).
    #[arg(long, env = "PALISADE_KUBE_SYNC_TIMEOUT_SECS", default_value_t = 60)]
    kube_sync_timeout_secs: u64,
    /// Milliseconds between checks that every endpoint's interface still exists.
    #[arg(long, env = "PALISADE_INTERFACE_CHECK_MS", default_value_t = 1000)]
    interface_check_ms: u64,
    /// A JSON file of the other nodes' pods with their labels (a cluster without a shared
    /// store: the testbed's file mode), re-read when it changes; their addresses get the
    /// identities of their label sets. See docs/cluster.md.
    #[arg(long, env = "PALISADE_REMOTE_ENDPOINTS")]
    remote_endpoints: Option<PathBuf>,
    /// Milliseconds between reads of --remote-endpoints.
    #[arg(long, env = "PALISADE_REMOTE_ENDPOINTS_POLL_MS", default_value_t = 200)]
    remote_endpoints_poll_ms: u64,
    /// Share identities, pod addresses and nodes with the other agents of the cluster
    /// through a kvstore: `etcd` (Cilium's layout; see docs/cluster.md). Needs
    /// --kvstore-endpoints, --node-name and --node-address.
    #[arg(long, env = "PALISADE_KVSTORE", value_parser = ["etcd"])]
    kvstore: Option<String>,
    /// etcd client URLs, comma-separated (`http://10.0.0.5:2379,http://10.0.0.6:2379`).
    #[arg(long, env = "PALISADE_KVSTORE_ENDPOINTS", value_delimiter = ',')]
    kvstore_endpoints: Vec<String>,
    /// Seconds a node's lease lives without keep-alives: its pods, its identity references
    /// and its node entry vanish from the store this long after the agent is gone.
    #[arg(long, env = "PALISADE_KVSTORE_LEASE_TTL", default_value_t = 15)]
    kvstore_lease_ttl: u64,
    /// This node's addresses, comma-separated (kvstore mode: the host address of its pods
    /// and its node entry; the first is the pods' host address).
    #[arg(long, env = "PALISADE_NODE_ADDRESS", value_delimiter = ',')]
    node_address: Vec<std::net::IpAddr>,
    /// Flow records kept for `palisade observe` (the oldest are overwritten; a reader that
    /// asks for overwritten ones is told how many it missed).
    #[arg(long, env = "PALISADE_FLOW_BUFFER_SIZE", default_value_t = palisade_agent::flows::DEFAULT_BUFFER_SIZE)]
    flow_buffer_size: usize,
    /// When endpoints are default-deny: `default` (once a policy selects them, per
    /// direction), `always` (every endpoint, in both directions, selected or not; the node
    /// may still reach its pods), `never` (nothing is enforced or audited).
    #[arg(long, env = "PALISADE_POLICY_ENFORCEMENT", default_value = "default")]
    policy_enforcement: palisade_agent::actors::resolver::Enforcement,
    /// Audit mode for every endpoint: what policy would drop passes and is reported as an
    /// AUDIT flow (drops that are not policy's, such as spoofed sources, stay).
    #[arg(long, env = "PALISADE_POLICY_AUDIT_MODE")]
    policy_audit_mode: bool,
    /// Tests only: enables `POST /v1/debug/panic/{actor}`, which makes an actor panic.
    #[arg(long, hide = true)]
    fault_injection: bool,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Removes what the agent installed: detaches the programs from every interface
    /// (tcx links and clsact filters), removes the map and link pins under --bpffs and the
    /// state directory. Stop the agent first (it would install everything again).
    Uninstall,
}

fn uninstall(bpffs: &std::path::Path, state_dir: &std::path::Path) -> std::process::ExitCode {
    let mut ok = true;
    match palisade_agent::datapath::Datapath::uninstall(bpffs) {
        Ok(()) => println!("removed programs, links and pins under {}", bpffs.display()),
        Err(e) => {
            eprintln!("palisade-agent uninstall: {e}");
            ok = false;
        }
    }
    match palisade_agent::state::StateDir::new(state_dir).remove() {
        Ok(()) => println!("removed the state in {}", state_dir.display()),
        Err(e) => {
            eprintln!("palisade-agent uninstall: state directory {}: {e}", state_dir.display());
            ok = false;
        }
    }
    if ok { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE }
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
    if let Some(Cmd::Uninstall) = args.command {
        return uninstall(&args.bpffs, &args.state_dir);
    }
    // Before any thread exists: every thread the agent starts inherits the namespace.
    if let Some(path) = &args.netns {
        let entered = std::fs::File::open(path)
            .and_then(|f| nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from));
        if let Err(e) = entered {
            eprintln!("palisade-agent: cannot enter the network namespace {}: {e}", path.display());
            return std::process::ExitCode::FAILURE;
        }
    }
    let map_sizes = match palisade_agent::datapath::MapSizes::with_overrides(&args.map_sizes) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("palisade-agent: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let kvstore = match kvstore_options(&args, &args.cluster) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("palisade-agent: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let defaults = AgentConfig::new(PathBuf::new(), PathBuf::new(), PathBuf::new());
    let config = AgentConfig {
        bpffs: args.bpffs,
        policy_dir: args.policy_dir,
        state_dir: args.state_dir,
        cluster: args.cluster,
        repair_interval: Duration::from_secs(args.repair_interval_secs),
        policy_rescan_interval: Duration::from_secs(args.policy_rescan_secs.max(1)),
        interface_check_interval: Duration::from_millis(args.interface_check_ms.max(50)),
        external_sources: args.kubernetes,
        fault_injection: args.fault_injection,
        map_sizes,
        attach_mode: match args.attach_mode.as_str() {
            "tcx" => Some(palisade_agent::datapath::AttachMode::Tcx),
            "clsact" => Some(palisade_agent::datapath::AttachMode::Clsact),
            _ => None,
        },
        flow_buffer_size: args.flow_buffer_size.max(1),
        node_name: args.node_name.clone().unwrap_or(defaults.node_name),
        policy_mode: palisade_agent::actors::resolver::PolicyMode {
            enforcement: args.policy_enforcement,
            audit_all: args.policy_audit_mode,
        },
    };
    let kube_sync_timeout = Duration::from_secs(args.kube_sync_timeout_secs.max(1));
    let socket = args.api_socket;
    let remote_file = args.remote_endpoints.map(|path| palisade_agent::remote_file::RemoteFileOptions {
        path,
        cluster: config.cluster.clone(),
        poll: Duration::from_millis(args.remote_endpoints_poll_ms.max(20)),
    });
    let kubeconfig = args.kubeconfig;
    let metrics_address = args.metrics_address;
    let kube = match (args.kubernetes, args.node_name) {
        (false, _) => None,
        (true, Some(node)) if !node.is_empty() => Some(palisade_agent::k8s::KubeOptions {
            node_name: node,
            cluster: config.cluster.clone(),
            resync: Duration::from_secs(args.kube_resync_secs.max(1)),
            remote_pods: kvstore.is_none(),
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
            Err(e) => return Err(e.to_string()),
        };
        if kube.is_some() {
            // Not ready before the Kubernetes source's first complete sync (ops).
            palisade_agent::metrics::readiness().expect_source(palisade_agent::metrics::SOURCE_KUBERNETES);
        }
        let metrics = match metrics_address {
            palisade_agent::metrics::ListenAddress::Off => None,
            palisade_agent::metrics::ListenAddress::On(addr) => {
                let agent = agent.clone();
                Some((addr, tokio::spawn(async move { palisade_agent::metrics::serve(agent, addr).await })))
            }
        };
        if let Some(opts) = kvstore {
            // Not ready before the first complete list of the store (the other nodes' pods).
            palisade_agent::metrics::readiness().expect_source(palisade_agent::metrics::SOURCE_KVSTORE);
            let kv = palisade_agent::kvstore::Kv::connect(&opts.endpoints, &opts.node, opts.op_timeout)
                .await
                .map_err(|e| e.to_string())?;
            let kv = std::sync::Arc::new(kv);
            // Before the API answers: no registration gets a node-local number.
            agent
                .identities
                .send(palisade_agent::actors::identity::UseKvstore(kv.clone()))
                .await
                .map_err(|e| e.to_string())?;
            // What the store taught before a restart, before the other sources start: an
            // agent restarted while etcd is away keeps the other nodes' pods.
            let restored = palisade_agent::kvstore::sync::restore(&agent, &opts).await;
            actix_rt::spawn(palisade_agent::kvstore::sync::run_restored(agent.clone(), kv, opts, restored));
        }
        if let Some(opts) = remote_file {
            actix_rt::spawn(palisade_agent::remote_file::run(agent.clone(), opts));
        }
        if let Some(opts) = kube {
            let a = agent.clone();
            actix_rt::spawn(async move {
                tokio::time::sleep(kube_sync_timeout).await;
                // A no-op when the Kubernetes source synced already (it resynced then).
                if a.resolver.send(palisade_agent::actors::resolver::IsSynced).await == Ok(false) {
                    tracing::warn!("the Kubernetes lists did not all complete in time; applying what is known");
                    a.external.mark_listed();
                    let _ = a.resync().await;
                }
            });
            let client = kube_client(kubeconfig.as_deref()).await?;
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
            (addr, r) = async move {
                match metrics {
                    Some((addr, task)) => (addr, task.await),
                    None => std::future::pending().await,
                }
            } => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("metrics and health listener on {addr}: {e}")),
                Err(e) => Err(format!("metrics task: {e}")),
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
            // Out at once: dropping the actor system after its runtime has stopped only adds
            // panics to the log. The datapath stays loaded, as on any exit.
            std::process::exit(1)
        }
    }
}

/// The kvstore options of the command line, `None` without `--kvstore`.
fn kvstore_options(args: &Args, cluster: &str) -> Result<Option<palisade_agent::kvstore::KvOptions>, String> {
    if args.kvstore.is_none() {
        return Ok(None);
    }
    if args.kvstore_endpoints.is_empty() {
        return Err("--kvstore etcd needs --kvstore-endpoints URL[,URL] (e.g. http://127.0.0.1:2379)".into());
    }
    for url in &args.kvstore_endpoints {
        if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() < 10 {
            return Err(format!(
                "--kvstore-endpoints: {url:?} is not an http:// or https:// URL (e.g. http://127.0.0.1:2379)"
            ));
        }
    }
    let node = args
        .node_name
        .clone()
        .filter(|n| !n.is_empty() && !n.contains('/'))
        .ok_or("--kvstore etcd needs this node's name: --node-name NAME (or NODE_NAME), without '/'")?;
    if args.node_address.is_empty() {
        return Err("--kvstore etcd needs this node's address: --node-address IP[,IP]".into());
    }
    if args.remote_endpoints.is_some() {
        return Err("--kvstore and --remote-endpoints both say where other nodes' pods come from: choose one".into());
    }
    if !(1..=3600).contains(&args.kvstore_lease_ttl) {
        return Err(format!("--kvstore-lease-ttl {}: must be 1..=3600 seconds", args.kvstore_lease_ttl));
    }
    let ttl = Duration::from_secs(args.kvstore_lease_ttl);
    Ok(Some(palisade_agent::kvstore::KvOptions {
        endpoints: args.kvstore_endpoints.clone(),
        cluster: cluster.to_string(),
        node,
        node_addresses: args.node_address.clone(),
        lease_ttl: ttl,
        poll: Duration::from_secs(1),
        op_timeout: Duration::from_secs(2).min(ttl),
    }))
}

/// The Kubernetes client: from `path` when given, else as kube-rs finds its configuration.
async fn kube_client(path: Option<&std::path::Path>) -> Result<kube::Client, String> {
    let config = match path {
        Some(p) => {
            let file = kube::config::Kubeconfig::read_from(p)
                .map_err(|e| format!("Kubernetes mode: cannot read the kubeconfig {}: {e}", p.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| format!("Kubernetes mode: the kubeconfig {} is not usable: {e}", p.display()))?
        }
        None => kube::Config::infer().await.map_err(|e| {
            format!(
                "Kubernetes mode: no usable configuration ({e}); set KUBECONFIG or run in a pod with a service account"
            )
        })?,
    };
    kube::Client::try_from(config).map_err(|e| format!("Kubernetes mode: cannot build the API client: {e}"))
}
