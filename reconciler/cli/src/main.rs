//! `palisade`: the operator's CLI over the agent's local API.
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};
use palisade_api::Client;
use palisade_api::types::{ExplainRequest, Explanation, MonitorEvent, SideDecision};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(name = "palisade", version, about = "Inspect a running palisade agent")]
struct Cli {
    /// The agent's API socket.
    #[arg(long, global = true, default_value = "/run/palisade/agent.sock", env = "PALISADE_SOCKET")]
    socket: PathBuf,
    /// The other nodes' agents (API sockets), for `observe --all-nodes` and `ui`; repeat it,
    /// or list them comma-separated in `PALISADE_AGENTS`.
    #[arg(long = "agent", global = true, value_name = "SOCKET", env = "PALISADE_AGENTS", value_delimiter = ',')]
    agents: Vec<PathBuf>,
    /// Output format (default: `table`; for `observe`, `compact`).
    #[arg(long, short, global = true, value_enum)]
    output: Option<Output>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Json,
    /// One line per flow (`observe`; other commands print a table).
    Compact,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The agent: revision, realized revision, counts, warnings.
    Status,
    /// Waits until a revision (default: the current one) is realized in the kernel; exits
    /// non-zero on timeout. Scripts and tests wait with this instead of sleeping.
    Wait {
        /// The revision to wait for (an `Ack` or `status` revision).
        #[arg(long)]
        revision: Option<u64>,
        #[arg(long, default_value_t = 30)]
        timeout_secs: u64,
    },
    /// Local endpoints.
    Endpoint {
        #[command(subcommand)]
        command: ListGet,
    },
    /// Security identities.
    Identity {
        #[command(subcommand)]
        command: ListGet,
    },
    /// Policy manifests: whether they are enforced; offline validation.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// The kernel's ipcache: address or prefix -> identity, with the identity's labels.
    Ipcache {
        #[command(subcommand)]
        command: IpcacheCommand,
    },
    /// What is loaded in the kernel's maps, decoded.
    Bpf {
        #[command(subcommand)]
        command: BpfCommand,
    },
    /// Flow records of the agent's flow buffer, with both ends named and the policy that
    /// decided (the flags of `hubble observe`; `-o json` uses Hubble's field names).
    Observe(Box<palisade_cli::observe::ObserveArgs>),
    /// A web page on a loopback address: the service map of the observed flows (edges
    /// coloured by verdict, with counts, live), the flow table with the `observe` filters,
    /// a pod's identity, labels, policies and kernel entries, and the explanation of a drop.
    Ui {
        /// Where to serve it: a loopback address only (port 0: any free port; the address
        /// is printed).
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: std::net::SocketAddr,
    },
    /// Live raw verdict events of the datapath (identities as numbers; for debugging the
    /// datapath: `observe --follow` is the everyday view).
    Monitor {
        /// Only events of this endpoint (`namespace/name`).
        #[arg(long)]
        pod: Option<String>,
        /// Only this verdict (`allow` or `drop`).
        #[arg(long)]
        verdict: Option<String>,
        /// Only this direction (`ingress` or `egress`).
        #[arg(long)]
        direction: Option<String>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// All policy manifests the agent has seen.
    List,
    /// One policy, by `name` or `namespace/name`.
    Get { name: String },
    /// Why a flow passes or is dropped: the source's egress and the destination's ingress,
    /// with the rules that decide each. Asks the running agent, or, with --scenario and/or
    /// --policies, works offline (no agent, no root) on the state an agent would hold.
    Explain {
        /// A pod (`namespace/name`), an address, or a label set (`namespace:key=value,...`).
        #[arg(long)]
        from: String,
        /// Same forms as --from.
        #[arg(long)]
        to: String,
        /// Destination port (ICMP: the type; default echo request).
        #[arg(long)]
        port: Option<u16>,
        /// TCP, UDP, SCTP, ICMP or ICMPv6.
        #[arg(long, default_value = "TCP")]
        protocol: String,
        /// Offline: the pods (namespaces, labels, service accounts, named ports, addresses
        /// as the testbed assigns them) and, without --policies, the policies of this
        /// testbed scenario file.
        #[arg(long, value_name = "FILE")]
        scenario: Option<PathBuf>,
        /// Offline: the policy manifests of this directory (read as the agent reads its
        /// policy directory), instead of the scenario's.
        #[arg(long, value_name = "DIR")]
        policies: Option<PathBuf>,
        /// Offline: the cluster name (default: the scenario's, else `default`).
        #[arg(long)]
        cluster: Option<String>,
        /// Offline, a scenario with several nodes: explain as this node's agent does (its
        /// pods local, the other nodes' remote). Without it every pod counts as local.
        #[arg(long, value_name = "NAME", requires = "scenario")]
        node: Option<String>,
    },
    /// Checks manifests offline (no agent, no root): exit 0 when all are valid, 1 with one
    /// line per error otherwise.
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum IpcacheCommand {
    /// Every entry, read back from the kernel maps.
    List,
}

#[derive(Subcommand, Debug)]
enum BpfCommand {
    /// The POLICY map.
    Policy {
        #[command(subcommand)]
        command: BpfPolicyCommand,
    },
}

#[derive(Subcommand, Debug)]
enum BpfPolicyCommand {
    /// The entries loaded for one endpoint (`namespace/name` or id): direction, peer
    /// identity and its labels, protocol, port or range, allow or deny, and the rules each
    /// entry comes from.
    Get { endpoint: String },
}

#[derive(Subcommand, Debug)]
enum ListGet {
    /// All of them.
    List,
    /// One, by name (`namespace/name`) or number.
    Get { name: String },
}

fn print_json<T: Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("API types serialize"));
}

fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(std::string::ToString::to_string).collect());
    for r in rows {
        line(r);
    }
}

/// Labels for a table: the pod's own labels as `key=value`, its namespace as `ns=...`,
/// service account as `sa=...`; the namespace's labels, the cluster and the
/// `kubernetes.io/metadata.name` namespace label (which repeats `ns`) are left out.
/// Reserved, CIDR and other labels keep their `source:`. `-o json` has the full labels.
fn short_labels(labels: &[String]) -> String {
    let mut out = Vec::new();
    for l in labels {
        let Some(rest) = l.strip_prefix("k8s:") else {
            out.push(l.clone());
            continue;
        };
        if let Some(ns) = rest.strip_prefix("io.kubernetes.pod.namespace=") {
            out.insert(0, format!("ns={ns}"));
        } else if let Some(sa) = rest.strip_prefix("io.cilium.k8s.policy.serviceaccount=") {
            out.push(format!("sa={sa}"));
        } else if !rest.starts_with("io.cilium.k8s.namespace.labels.")
            && !rest.starts_with("io.cilium.k8s.policy.cluster=")
        {
            out.push(rest.to_string());
        }
    }
    out.join(" ")
}

fn print_explanation(e: &Explanation) {
    println!(
        "{} (identity {}) -> {} (identity {}) {}/{}: {}",
        e.from,
        e.from_identity,
        e.to,
        e.to_identity,
        e.port,
        e.protocol,
        e.verdict.to_uppercase()
    );
    let show = |what: &str, s: &SideDecision| {
        let who = s.endpoint.clone().unwrap_or_else(|| "(not a local pod)".into());
        let entry = s.entry.as_ref().map(|x| format!(" by entry `{x}`")).unwrap_or_default();
        println!("  {what:<8} of {who}: {}{entry}", s.decision);
        for r in &s.rules {
            println!("           rule {r}");
        }
        for t in &s.tiers {
            println!("           tier {t}");
        }
        for p in &s.default_deny_by {
            println!("           default deny by {p} (it selects {who} for {what}; no rule allows the flow)");
        }
        if let Some(n) = &s.nearest_rule {
            println!("           nearest rule {n}");
        }
    };
    show("egress", &e.egress);
    show("ingress", &e.ingress);
}

fn monitor_line(e: &MonitorEvent) -> String {
    let ep = e.endpoint.clone().unwrap_or_else(|| format!("ep{}", e.endpoint_id));
    let decided = if e.policies.is_empty() { String::new() } else { format!(" by {}", e.policies.join(", ")) };
    format!(
        "{:<5} {:<7} {ep} {}:{} -> {}:{} {} identity={} reason={} match={}{decided}",
        e.verdict,
        e.direction,
        e.src,
        e.src_port,
        e.dst,
        e.dst_port,
        e.protocol,
        e.peer_identity,
        e.reason,
        e.match_kind
    )
}

async fn observe(
    c: &Client,
    a: &palisade_cli::observe::ObserveArgs,
    negated: &[String],
    output: Output,
) -> Result<(), String> {
    use palisade_api::flow::FlowsResponse;
    let query = a.query(negated, palisade_cli::observe::now_ns())?;
    let mut stream = c.flows(&query).await.map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    while let Some(r) = stream.next().await.map_err(|e| e.to_string())? {
        match (&r, output) {
            (_, Output::Json) => println!("{}", serde_json::to_string(&r).expect("serializes")),
            (FlowsResponse::LostEvents(l), _) => {
                eprintln!("EVENTS LOST: {} flow(s) ({})", l.num_events_lost, l.source);
            }
            (FlowsResponse::Flow(f), Output::Compact) => println!("{}", palisade_cli::observe::compact_line(f)),
            (FlowsResponse::Flow(f), Output::Table) if a.follow => {
                println!("{}", palisade_cli::observe::table_row(f).join("  "));
            }
            (FlowsResponse::Flow(f), Output::Table) => rows.push(palisade_cli::observe::table_row(f)),
        }
    }
    if !rows.is_empty() {
        table(&["TIME", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"], rows);
    }
    Ok(())
}

/// --socket and every --agent, each named by its socket.
fn agents_of(cli: &Cli) -> palisade_cli::ui::Agents {
    palisade_cli::ui::Agents {
        agents: std::iter::once(&cli.socket)
            .chain(&cli.agents)
            .map(|s| (s.display().to_string(), Client::new(s)))
            .collect(),
    }
}

/// Prints flows (with `rows`: table lines, printed at the end).
fn print_response(r: &palisade_api::flow::FlowsResponse, output: Output, rows: Option<&mut Vec<Vec<String>>>) {
    use palisade_api::flow::FlowsResponse;
    match (r, output) {
        (_, Output::Json) => println!("{}", serde_json::to_string(r).expect("serializes")),
        (FlowsResponse::LostEvents(l), _) => eprintln!("EVENTS LOST: {} flow(s) ({})", l.num_events_lost, l.source),
        (FlowsResponse::Flow(f), Output::Compact) => println!("{}", palisade_cli::observe::compact_line(f)),
        (FlowsResponse::Flow(f), Output::Table) => match rows {
            Some(rows) => rows.push(palisade_cli::observe::table_row(f)),
            None => println!("{}", palisade_cli::observe::table_row(f).join("  ")),
        },
    }
}

/// `observe --all-nodes`: every agent asked the same query; the answers merged by time.
/// With --follow, what the agents send in the first half second (their buffered flows)
/// is sorted before it is printed, then new flows print as they arrive.
async fn observe_all(
    agents: &palisade_cli::ui::Agents,
    a: &palisade_cli::observe::ObserveArgs,
    negated: &[String],
    output: Output,
) -> Result<(), String> {
    use palisade_api::flow::FlowsResponse;
    let query = a.query(negated, palisade_cli::observe::now_ns())?;
    if !a.follow {
        let answer = palisade_cli::ui::merged_flows(agents, &query).await;
        let mut rows = Vec::new();
        for l in answer.lost {
            print_response(&FlowsResponse::LostEvents(l), output, None);
        }
        for f in answer.flows {
            print_response(&FlowsResponse::Flow(Box::new(f)), output, Some(&mut rows));
        }
        if !rows.is_empty() {
            table(&["TIME", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"], rows);
        }
        if !answer.errors.is_empty() {
            return Err(format!("observe --all-nodes: {}", answer.errors.join("; ")));
        }
        return Ok(());
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<FlowsResponse, String>>(1024);
    for (node, c) in agents.agents.clone() {
        let tx = tx.clone();
        let query = query.clone();
        tokio::spawn(async move {
            let mut stream = match c.flows(&query).await {
                Ok(s) => s,
                Err(e) => return drop(tx.send(Err(format!("{node}: {e}"))).await),
            };
            loop {
                match stream.next().await {
                    Ok(Some(r)) => {
                        if tx.send(Ok(r)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return drop(tx.send(Err(format!("{node}: the agent closed the stream"))).await),
                    Err(e) => return drop(tx.send(Err(format!("{node}: {e}"))).await),
                }
            }
        });
    }
    drop(tx);
    let settle = tokio::time::Instant::now() + std::time::Duration::from_millis(500);
    let mut first = Vec::new();
    loop {
        match tokio::time::timeout_at(settle, rx.recv()).await {
            Ok(Some(Ok(r))) => first.push(r),
            Ok(Some(Err(e))) => return Err(e),
            Ok(None) | Err(_) => break,
        }
    }
    let time = |r: &FlowsResponse| match r {
        FlowsResponse::Flow(f) => f.time.clone(),
        FlowsResponse::LostEvents(_) => String::new(),
    };
    first.sort_by_key(time);
    for r in &first {
        print_response(r, output, None);
    }
    while let Some(r) = rx.recv().await {
        print_response(&r?, output, None);
    }
    Ok(())
}

async fn run(cli: Cli, negated: Vec<String>) -> Result<(), String> {
    let c = Client::new(&cli.socket);
    let agents = agents_of(&cli);
    let json = cli.output == Some(Output::Json);
    match cli.command {
        Command::Observe(a) if a.all_nodes => {
            if cli.agents.is_empty() {
                return Err("observe --all-nodes: name the other nodes' agents with --agent SOCKET (repeat it) or \
                            PALISADE_AGENTS=a.sock,b.sock; --socket is one of them (`palisade-testbed up` \
                            prints the node sockets of a testbed)"
                    .into());
            }
            observe_all(&agents, &a, &negated, cli.output.unwrap_or(Output::Compact)).await?;
        }
        Command::Observe(a) => observe(&c, &a, &negated, cli.output.unwrap_or(Output::Compact)).await?,
        Command::Ui { listen } => {
            palisade_cli::ui::serve(listen, agents, |addr| {
                use std::io::Write as _;
                println!("palisade ui: serving on http://{addr}/ (Ctrl-C stops it)");
                let _ = std::io::stdout().flush();
            })
            .await?;
        }
        Command::Status => {
            let s = c.status().await.map_err(|e| e.to_string())?;
            if json {
                print_json(&s);
            } else {
                println!("revision:          {}", s.revision);
                println!("realized revision: {}", s.realized_revision);
                println!("endpoints:         {}", s.endpoints);
                println!("identities:        {}", s.identities);
                println!("policies:          {} enforced, {} rejected", s.policies, s.rejected_policies);
                println!("datapath:          {} (pinned under {})", s.attach_mode, s.bpffs);
                if let Some(k) = &s.kvstore {
                    print_kvstore(k);
                }
                for w in &s.warnings {
                    println!("warning:           {w}");
                }
            }
        }
        Command::Wait { revision, timeout_secs } => {
            let timeout = std::time::Duration::from_secs(timeout_secs);
            let revision = match revision {
                Some(r) => r,
                None => c.status().await.map_err(|e| e.to_string())?.revision,
            };
            let s = c.wait_revision(revision, timeout).await.map_err(|e| e.to_string())?;
            if json {
                print_json(&s);
            } else {
                let latency = s.realized_revision_unix_ms.saturating_sub(s.realized_revision_accepted_unix_ms);
                println!(
                    "revision {revision} realized (realized revision {}, {latency} ms after it was accepted)",
                    s.realized_revision
                );
            }
        }
        Command::Endpoint { command } => {
            let mut eps = c.endpoints().await.map_err(|e| e.to_string())?;
            if let ListGet::Get { name } = &command {
                eps.retain(|e| format!("{}/{}", e.namespace, e.name) == *name || e.id.to_string() == *name);
                if eps.is_empty() {
                    return Err(format!("no endpoint {name}"));
                }
            }
            if json {
                print_json(&eps);
            } else {
                let rows = eps
                    .iter()
                    .map(|e| {
                        let enf = match (e.ingress_enforced, e.egress_enforced) {
                            (true, true) => "ingress+egress",
                            (true, false) => "ingress",
                            (false, true) => "egress",
                            (false, false) => "none",
                        };
                        vec![
                            e.id.to_string(),
                            format!("{}/{}", e.namespace, e.name),
                            e.identity.to_string(),
                            e.ipv4.map(|a| a.to_string()).unwrap_or_default(),
                            e.interface.clone(),
                            enf.to_string(),
                            e.policy_entries.to_string(),
                            e.realized_revision.to_string(),
                        ]
                    })
                    .collect();
                table(&["ID", "ENDPOINT", "IDENTITY", "IPV4", "INTERFACE", "ENFORCED", "ENTRIES", "REVISION"], rows);
            }
        }
        Command::Identity { command } => {
            let mut ids = c.identities().await.map_err(|e| e.to_string())?;
            if let ListGet::Get { name } = &command {
                ids.retain(|i| i.id.to_string() == *name);
                if ids.is_empty() {
                    return Err(format!("no identity {name}"));
                }
            }
            if json {
                print_json(&ids);
            } else {
                let rows =
                    ids.iter().map(|i| vec![i.id.to_string(), i.references.to_string(), i.labels.join(" ")]).collect();
                table(&["ID", "REFS", "LABELS"], rows);
            }
        }
        Command::Policy { command: PolicyCommand::Validate { files } } => {
            return validate(&files, json);
        }
        Command::Policy {
            command: PolicyCommand::Explain { from, to, port, protocol, scenario, policies, cluster, node },
        } => {
            let request = ExplainRequest { from, to, port, protocol };
            let e = if scenario.is_some() || policies.is_some() {
                explain_offline(
                    &request,
                    scenario.as_deref(),
                    policies.as_deref(),
                    cluster.as_deref(),
                    node.as_deref(),
                )?
            } else {
                if cluster.is_some() {
                    return Err("--cluster only applies offline (with --scenario or --policies)".into());
                }
                c.explain(&request).await.map_err(|e| e.to_string())?
            };
            if json {
                print_json(&e);
            } else {
                print_explanation(&e);
            }
        }
        Command::Policy { command } => {
            let mut ps = c.policies().await.map_err(|e| e.to_string())?;
            if let PolicyCommand::Get { name } = &command {
                ps.retain(|p| {
                    p.name == *name || p.namespace.as_ref().is_some_and(|ns| format!("{ns}/{}", p.name) == *name)
                });
                if ps.is_empty() {
                    return Err(format!("no policy {name}"));
                }
            }
            if json {
                print_json(&ps);
            } else {
                let rows = ps
                    .iter()
                    .map(|p| {
                        vec![
                            p.kind.clone(),
                            p.namespace.clone().unwrap_or_else(|| "-".into()),
                            p.name.clone(),
                            if p.enforced { "enforced".into() } else { "REJECTED".into() },
                            match (p.enforced, p.audit) {
                                (false, _) => "-".into(),
                                (true, false) => "enforce".into(),
                                (true, true) => "audit".into(),
                            },
                            p.revision.to_string(),
                            p.error.clone().unwrap_or_else(|| p.warnings.join("; ")),
                        ]
                    })
                    .collect();
                table(&["KIND", "NAMESPACE", "NAME", "STATE", "MODE", "REVISION", "DETAIL"], rows);
            }
        }
        Command::Ipcache { command: IpcacheCommand::List } => {
            let entries = c.ipcache().await.map_err(|e| e.to_string())?;
            if json {
                print_json(&entries);
            } else {
                let rows = entries
                    .iter()
                    .map(|e| {
                        vec![
                            e.prefix.clone(),
                            e.identity.to_string(),
                            e.endpoint.clone().unwrap_or_default(),
                            short_labels(&e.labels),
                        ]
                    })
                    .collect();
                table(&["PREFIX", "IDENTITY", "ENDPOINT", "LABELS"], rows);
            }
        }
        Command::Bpf { command: BpfCommand::Policy { command: BpfPolicyCommand::Get { endpoint } } } => {
            let p = c.bpf_policy(&endpoint).await.map_err(|e| e.to_string())?;
            if json {
                print_json(&p);
            } else {
                let enforced = |on: bool| if on { "enforced" } else { "not enforced" };
                if p.ifindex == 0 {
                    println!(
                        "endpoint {} (id {}): no ENDPOINTS entry in the kernel: its traffic is not enforced",
                        p.endpoint, p.endpoint_id
                    );
                } else {
                    println!(
                        "endpoint {} (id {}, identity {}, ifindex {}): ingress {}, egress {}",
                        p.endpoint,
                        p.endpoint_id,
                        p.identity,
                        p.ifindex,
                        enforced(p.ingress_enforced),
                        enforced(p.egress_enforced)
                    );
                }
                let rows = p
                    .entries
                    .iter()
                    .map(|e| {
                        let from = if e.rules.is_empty() { e.policies.join("; ") } else { e.rules.join("; ") };
                        let mut action = if e.probed { e.action.clone() } else { format!("{} (NOT PROBED)", e.action) };
                        if e.audit_view {
                            action.push_str(" (audit view)");
                        }
                        let peer = match e.identity {
                            0 => "any".to_string(),
                            n => format!("{n} {}", short_labels(&e.labels)),
                        };
                        vec![e.direction.clone(), peer, e.protocol.clone(), e.port.clone(), action, from]
                    })
                    .collect();
                table(&["DIRECTION", "PEER", "PROTO", "PORT", "ACTION", "FROM"], rows);
            }
        }
        Command::Monitor { pod, verdict, direction, count } => {
            let mut stream = c.monitor().await.map_err(|e| e.to_string())?;
            let mut seen = 0usize;
            while let Some(e) = stream.next().await.map_err(|e| e.to_string())? {
                if pod.as_ref().is_some_and(|p| e.endpoint.as_deref() != Some(p.as_str()))
                    || verdict.as_ref().is_some_and(|v| *v != e.verdict)
                    || direction.as_ref().is_some_and(|d| *d != e.direction)
                {
                    continue;
                }
                if json {
                    println!("{}", serde_json::to_string(&e).expect("serializes"));
                } else {
                    println!("{}", monitor_line(&e));
                }
                seen += 1;
                if count.is_some_and(|n| seen >= n) {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// `policy explain` without an agent: the state an agent would hold for the scenario's
/// pods and the policies (of DIR, else of the scenario), explained by the agent's own code.
fn explain_offline(
    request: &ExplainRequest,
    scenario: Option<&Path>,
    policies: Option<&Path>,
    cluster: Option<&str>,
    node: Option<&str>,
) -> Result<Explanation, String> {
    use palisade_node::explain::offline::{DEFAULT_CLUSTER, OfflineState};
    let state = match scenario {
        Some(file) => {
            let mut plan = palisade_scenario::load(file).map_err(|e| e.to_string())?;
            if let Some(c) = cluster {
                plan.cluster = Some(c.to_string());
            }
            match node {
                None => palisade_cli::offline::scenario_state(&plan, policies),
                Some(name) => {
                    let Some(k) = plan.nodes.iter().position(|n| n.name == name) else {
                        let names: Vec<&str> = plan.nodes.iter().map(|n| n.name.as_str()).collect();
                        return Err(format!(
                            "--node {name}: the scenario has no such node (nodes: {})",
                            names.join(", ")
                        ));
                    };
                    palisade_cli::offline::scenario_state_for_node(&plan, k, policies)
                }
            }
            .map_err(|e| e.to_string())?
        }
        None => OfflineState::from_policy_dir(
            policies.expect("--policies or --scenario"),
            cluster.unwrap_or(DEFAULT_CLUSTER),
        )
        .map_err(|e| e.to_string())?,
    };
    for st in state.statuses().iter().filter(|s| !s.enforced) {
        eprintln!(
            "palisade: warning: not enforced (the agent would reject it too): {}",
            st.error.as_deref().unwrap_or("?")
        );
    }
    palisade_node::explain::explain(request, &state.inputs())
}

/// Outcome of `policy validate`: invalid manifests make the exit code 1.
struct Invalid(usize);

fn validate(files: &[PathBuf], json: bool) -> Result<(), String> {
    use palisade_policy::parse::{ManifestOutcome, parse_manifests};
    let mut errors = Vec::new();
    let mut valid = 0usize;
    for f in files {
        let origin = f.display().to_string();
        let text = match std::fs::read(f) {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(t) => t,
                Err(e) => {
                    errors.push(format!(
                        "{origin}: not UTF-8 text (invalid byte at offset {})",
                        e.utf8_error().valid_up_to()
                    ));
                    continue;
                }
            },
            Err(e) => {
                errors.push(format!("{origin}: cannot read: {e}"));
                continue;
            }
        };
        match parse_manifests(&text, &origin) {
            Err(e) => errors.push(e.to_string()),
            Ok(outcomes) => {
                for o in outcomes {
                    match o {
                        ManifestOutcome::Accepted(p) => {
                            valid += 1;
                            for w in &p.warnings {
                                eprintln!("{origin}: warning: {}: {w}", p.display_name());
                            }
                        }
                        ManifestOutcome::Rejected(e) => errors.push(e.to_string()),
                    }
                }
            }
        }
    }
    if json {
        print_json(&serde_json::json!({ "valid": valid, "errors": errors }));
    } else {
        for e in &errors {
            println!("{e}");
        }
        if errors.is_empty() {
            println!("{valid} manifest(s) valid");
        }
    }
    if errors.is_empty() { Ok(()) } else { Err(Invalid(errors.len()).to_string()) }
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} invalid manifest(s)", self.0)
    }
}

fn main() -> std::process::ExitCode {
    // `observe --not FLAG VALUE`: the negated flags are parsed apart (clap has no notion of
    // "the next flag").
    let (args, negated) = match palisade_cli::observe::split_not(std::env::args().collect()) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("palisade observe: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(args);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    match rt.block_on(run(cli, negated)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("palisade: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The kvstore lines of `palisade status`.
fn print_kvstore(k: &palisade_api::types::KvstoreStatus) {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let ago = |ms: u64| format!("{:.1}s ago", now_ms.saturating_sub(ms) as f64 / 1000.0);
    let state = match k.state.as_str() {
        "failing" => {
            format!("failing since {} ({})", ago(k.failing_since_unix_ms), k.last_error.as_deref().unwrap_or("?"))
        }
        "ok" => format!("ok, lease {:x} (TTL {}s)", k.lease_id, k.lease_ttl_seconds),
        other => other.to_string(),
    };
    println!(
        "kvstore:           {} {} (node {}, cluster {}): {state}",
        k.backend,
        k.endpoints.join(","),
        k.node,
        k.cluster
    );
    println!(
        "                   published {} identities, {} addresses; knows {} remote addresses, {} remote nodes; watch at revision {}",
        k.published_identities, k.published_addresses, k.remote_addresses, k.remote_nodes, k.watch_revision
    );
    println!(
        "                   {} requests ({} failed), {} allocations ({} lost races), {} leases granted ({} lost), {} store lists",
        k.operations, k.failed_operations, k.allocations, k.lost_races, k.lease_grants, k.leases_lost, k.store_lists
    );
    if k.conflicted_identities > 0 {
        println!(
            "warning:           {} label sets have another number in etcd: their pods are not published (see the agent's log)",
            k.conflicted_identities
        );
    }
}
