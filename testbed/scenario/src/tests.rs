//! Parsing and validation, without root.
use std::path::Path;

use super::*;

const BASE: &str = r"
name: t
namespaces:
  default: {}
  prod: {env: prod}
pods:
  - name: frontend
    namespace: default
    labels: {app: frontend}
  - name: backend
    namespace: default
    labels: {app: backend}
    ip: 10.200.1.20
    ports:
      - {port: 8080, protocol: TCP, name: http}
      - {port: 9090, protocol: TCP}
      - {port: 53, protocol: UDP}
policies:
  - apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: allow, namespace: default}
    spec:
      endpointSelector: {matchLabels: {app: backend}}
probes:
  - {from: default/frontend, to: default/backend, port: 8080, protocol: TCP, expect: allow}
";

fn load(text: &str) -> Result<Plan, ScenarioError> {
    load_str(text, Path::new("t.yaml"))
}

fn issues(text: &str) -> Vec<Issue> {
    match load(text) {
        Err(ScenarioError::Invalid { issues, .. }) => issues,
        other => panic!("expected validation issues, got {other:?}"),
    }
}

fn syntax(text: &str) -> (String, String) {
    match load(text) {
        Err(ScenarioError::Syntax { path, message, .. }) => (path, message),
        other => panic!("expected a syntax error, got {other:?}"),
    }
}

#[test]
fn base_scenario_resolves() {
    let plan = load(BASE).unwrap();
    assert_eq!(plan.name, "t");
    assert_eq!(plan.ip_families, vec![IpFamily::IPv4]);
    assert_eq!(plan.pods.len(), 2);
    assert_eq!(plan.pods[1].ipv4.unwrap().to_string(), "10.200.1.20");
    assert_eq!(plan.pods[0].service_account, "default");
    assert_eq!(plan.probes[0].from, HostRef::Pod(0));
    assert_eq!(plan.probes[0].to, HostRef::Pod(1));
    assert_eq!(plan.namespaces["prod"]["env"], "prod");
    assert!(plan.pods.iter().all(|p| p.host_interface.len() <= 15 && p.host_interface.starts_with("lxc")));
    assert_ne!(plan.pods[0].host_interface, plan.pods[1].host_interface);
}

#[test]
fn the_seed_fixture_is_valid() {
    let file =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/scenarios/seed-allow-frontend-to-backend.yaml");
    let plan = super::load(&file).unwrap();
    assert_eq!(plan.pods.len(), 6);
    assert_eq!(plan.policies.len(), 2);
    assert!(plan.probes.iter().any(|p| p.protocol == ProbeProtocol::ICMP));
}

#[test]
fn unknown_key_is_an_error_naming_its_path() {
    let (path, message) = syntax(&BASE.replace("labels: {app: frontend}", "labels: {app: frontend}\n    lables: {}"));
    assert_eq!(path, "pods[0].lables");
    assert!(message.contains("unknown field `lables`"), "{message}");
    for (from, to, path) in [
        ("name: t\n", "name: t\nfoo: 1\n", "foo"),
        ("expect: allow}", "expect: allow, colour: red}", "probes[0].colour"),
        ("name: http}", "name: http, hostPort: 1}", "pods[1].ports[0].hostPort"),
    ] {
        assert_eq!(syntax(&BASE.replace(from, to)).0, path);
    }
}

#[test]
fn error_message_names_file_path_and_line() {
    let err = load(&BASE.replace("name: t\n", "name: t\nfoo: 1\n")).unwrap_err().to_string();
    assert!(err.starts_with("t.yaml: foo: unknown field `foo`"), "{err}");
    assert!(err.contains("line 3"), "{err}");
}

#[test]
fn bad_values_name_their_path() {
    let (path, message) = syntax(&BASE.replace("protocol: TCP, expect", "protocol: TCPX, expect"));
    assert_eq!(path, "probes[0].protocol");
    assert!(message.contains("TCPX"), "{message}");
    let (path, _) = syntax(&BASE.replace("expect: allow}", "expect: maybe}"));
    assert_eq!(path, "probes[0].expect");
    let (path, message) =
        syntax(&BASE.replace("port: 8080, protocol: TCP, expect", "port: 70000, protocol: TCP, expect"));
    assert_eq!(path, "probes[0].port");
    assert!(message.contains("out of range"), "{message}");
    let (path, _) = syntax(&BASE.replace("ip: 10.200.1.20", "ip: 10.200.1.300"));
    assert_eq!(path, "pods[1].ip");
}

#[test]
fn missing_required_key_is_an_error() {
    let (path, message) = syntax(&BASE.replace(", expect: allow}", "}"));
    assert_eq!(path, "probes[0]");
    assert!(message.contains("missing field `expect`"), "{message}");
}

#[test]
fn probe_port_must_be_listed_by_the_destination() {
    let i = issues(&BASE.replace("port: 8080, protocol: TCP, expect", "port: 8081, protocol: TCP, expect"));
    assert_eq!(i.len(), 1);
    assert_eq!(i[0].path, "probes[0].port");
    assert!(i[0].message.contains("does not list 8081/TCP"), "{}", i[0].message);
    assert!(i[0].message.contains("8080/TCP, 9090/TCP, 53/UDP"), "{}", i[0].message);
    // Right port, wrong protocol.
    let i = issues(&BASE.replace("port: 8080, protocol: TCP, expect", "port: 8080, protocol: UDP, expect"));
    assert_eq!(i[0].path, "probes[0].port");
}

#[test]
fn port_as_string_is_accepted() {
    let plan =
        load(&BASE.replace("port: 8080, protocol: TCP, expect", "port: \"8080\", protocol: TCP, expect")).unwrap();
    assert_eq!(plan.probes[0].port, Some(8080));
}

#[test]
fn icmp_probes_have_no_port_and_default_to_echo() {
    let plan = load(&BASE.replace("port: 8080, protocol: TCP, expect", "protocol: ICMP, expect")).unwrap();
    assert_eq!(plan.probes[0].icmp_type, Some(8));
    assert_eq!(plan.probes[0].port, None);
    let i = issues(&BASE.replace("protocol: TCP, expect", "protocol: ICMP, expect"));
    assert_eq!(i[0].path, "probes[0].port");
    let i = issues(&BASE.replace("port: 8080, protocol: TCP, expect", "protocol: TCP, expect"));
    assert_eq!(i[0].path, "probes[0].port");
}

#[test]
fn namespaces_must_be_listed() {
    let i = issues(&BASE.replace(
        "    namespace: default\n    labels: {app: frontend}",
        "    namespace: dev\n    labels: {app: frontend}",
    ));
    assert_eq!(i[0].path, "pods[0].namespace");
    assert!(i[0].message.contains("\"dev\""));
    let i =
        issues(&BASE.replace("metadata: {name: allow, namespace: default}", "metadata: {name: allow, namespace: qa}"));
    assert_eq!(i[0].path, "policies[0].metadata.namespace");
}

#[test]
fn unknown_pod_and_bad_reference() {
    let i = issues(&BASE.replace("to: default/backend", "to: default/nope"));
    assert_eq!(i[0].path, "probes[0].to");
    assert!(i[0].message.contains("no pod \"default/nope\""));
    let i = issues(&BASE.replace("to: default/backend", "to: backend"));
    assert_eq!(i[0].path, "probes[0].to");
    let i = issues(&BASE.replace("to: default/backend", "to: entity:moon"));
    assert!(i[0].message.contains("unknown entity"));
    let i = issues(&BASE.replace("to: default/backend", "to: 10.200.1.20"));
    assert!(i[0].message.contains("is the address of pod default/backend"), "{}", i[0].message);
}

#[test]
fn names_must_be_unique() {
    let dup = BASE.replace("  - name: backend\n", "  - name: frontend\n");
    let i = issues(&dup.replace("to: default/backend", "to: default/frontend"));
    assert!(i.iter().any(|i| i.path == "pods[1].name" && i.message.contains("already defined at pods[0]")), "{i:?}");
    let i = issues(&BASE.replace("{port: 9090, protocol: TCP}", "{port: 8080, protocol: TCP}"));
    assert!(i.iter().any(|i| i.path == "pods[1].ports[1].port"), "{i:?}");
    let i = issues(&BASE.replace("{port: 9090, protocol: TCP}", "{port: 9090, protocol: TCP, name: http}"));
    assert!(i.iter().any(|i| i.path == "pods[1].ports[1].name"), "{i:?}");
}

#[test]
fn addresses_are_checked_and_assigned_around_explicit_ones() {
    let i = issues(&BASE.replace("ip: 10.200.1.20", "ip: 10.200.0.1"));
    assert_eq!(i[0].path, "pods[1].ip");
    let i = issues(&BASE.replace("ip: 10.200.1.20", "ip: 127.0.0.1"));
    assert_eq!(i[0].path, "pods[1].ip");
    let plan = load(&BASE.replace("ip: 10.200.1.20", "ip: 10.200.1.10")).unwrap();
    assert_eq!(plan.pods[1].ipv4.unwrap().to_string(), "10.200.1.10");
    assert_eq!(plan.pods[0].ipv4.unwrap().to_string(), "10.200.1.11");
    let two = BASE.replace(
        "  - name: frontend\n    namespace: default\n    labels: {app: frontend}",
        "  - name: frontend\n    namespace: default\n    ip: 10.200.1.20\n    labels: {app: frontend}",
    );
    let i = issues(&two);
    assert!(i.iter().any(|i| i.path == "pods[1].ip" && i.message.contains("pods[0]")), "{i:?}");
}

#[test]
fn every_issue_is_reported_not_only_the_first() {
    let text = BASE
        .replace("to: default/backend, port: 8080", "to: default/backend, port: 1234")
        .replace("namespace: default}", "namespace: qa}");
    let i = issues(&text);
    assert_eq!(i.len(), 2, "{i:?}");
}

#[test]
fn expect_rejected_is_taken_out_of_the_manifest() {
    let text =
        BASE.replace("  - apiVersion: cilium.io/v2\n", "  - apiVersion: cilium.io/v2\n    expectRejected: true\n");
    let plan = load(&text).unwrap();
    assert!(plan.policies[0].expect_rejected);
    assert!(plan.policies[0].manifest.get("expectRejected").is_none());
    assert_eq!(plan.policies[0].label(), "CiliumNetworkPolicy/default/allow");
    let i =
        issues(&BASE.replace(
            "  - apiVersion: cilium.io/v2\n",
            "  - apiVersion: cilium.io/v2\n    expectRejected: yes please\n",
        ));
    assert_eq!(i[0].path, "policies[0].expectRejected");
}

#[test]
fn a_manifest_expected_to_be_rejected_is_not_judged_by_the_testbed() {
    // Unlisted namespace, unknown kind: that is for the agent to reject.
    let text = BASE.replace(
        "  - apiVersion: cilium.io/v2\n    kind: CiliumNetworkPolicy\n    metadata: {name: allow, namespace: default}",
        "  - apiVersion: cilium.io/v2\n    expectRejected: true\n    kind: Nonsense\n    metadata: {name: allow, namespace: nowhere}",
    );
    assert!(load(&text).is_ok());
}

#[test]
fn not_yet_supported_parts_say_so() {
    let i = issues(&BASE.replace("port: 8080, protocol: TCP, expect", "protocol: ICMP, icmp_type: 13, expect"));
    let hit = i.iter().find(|i| i.path == "probes[0].icmp_type").unwrap_or_else(|| panic!("{i:?}"));
    assert!(hit.unsupported, "{hit:?}");
    assert!(hit.to_string().contains("not supported yet by this testbed version"));
}

#[test]
fn world_hosts_and_entities_become_hosts_with_the_ports_probes_use() {
    let text = BASE.replace(
        "probes:\n",
        "probes:\n  - {from: default/frontend, to: 192.0.2.1, port: 443, protocol: TCP, expect: allow}\n  - {from: default/frontend, to: 192.0.2.1, port: 53, protocol: UDP, expect: allow}\n  - {from: entity:remote-node, to: default/backend, port: 8080, protocol: SCTP, expect: deny}\n  - {from: default/frontend, to: entity:host, protocol: ICMP, expect: allow}\n",
    ).replace("{port: 53, protocol: UDP}", "{port: 53, protocol: UDP}\n      - {port: 8080, protocol: SCTP}");
    let plan = load(&text).unwrap();
    assert_eq!(plan.hosts.len(), 3);
    let world = &plan.hosts[0];
    assert_eq!(world.host, HostRef::World("192.0.2.1".parse().unwrap()));
    assert_eq!((world.ipv4, world.ipv6), (Some("192.0.2.1".parse().unwrap()), None));
    assert_eq!(world.ports.len(), 2);
    assert_eq!(plan.hosts[1].host, HostRef::Entity(Entity::RemoteNode));
    assert_eq!(plan.hosts[1].ipv4, Some(REMOTE_NODE_IPV4));
    assert!(plan.hosts[1].ports.is_empty());
    assert!(plan.hosts[2].is_node());
    assert_eq!(plan.host_key(&HostRef::Entity(Entity::Host)), Some(plan.pods.len() + 2));
    // Testbed addresses are not world hosts.
    let i = issues(&BASE.replace("to: default/backend, port: 8080", "to: 10.200.0.2, port: 8080"));
    assert_eq!(i[0].path, "probes[0].to");
}

#[test]
fn ipv6_addresses_are_assigned_and_the_family_follows_world_literals() {
    let dual = BASE.replace("name: t\n", "name: t\nipFamilies: [IPv4, IPv6]\n");
    let plan = load(&dual).unwrap();
    assert_eq!(plan.pods[0].ipv6.unwrap().to_string(), "fd00:10:200::1:10");
    assert!(plan.pods[0].ipv4.is_some());
    let v6 = BASE.replace("name: t\n", "name: t\nipFamilies: [IPv6]\n").replace("    ip: 10.200.1.20\n", "");
    let plan =
        load(&v6.replace("port: 8080, protocol: TCP, expect", "port: 8080, protocol: TCP, family: IPv6, expect"))
            .unwrap();
    assert_eq!(plan.pods[1].ipv4, None);
    let world = v6.replace("to: default/backend, port: 8080", "to: 2001:db8::7, port: 8080");
    let plan = load(&world).unwrap();
    assert_eq!(plan.probes[0].family, IpFamily::IPv6);
    let i = issues(&v6.replace("ipv6: x", ""));
    assert!(i.iter().any(|i| i.path == "probes[0].family"), "{i:?}");
    let i = issues(&dual.replace("ip: 10.200.1.20", "ip: 10.200.1.20\n    ipv6: fe80::5"));
    assert_eq!(i[0].path, "pods[1].ipv6");
}

#[test]
fn family_must_fit_protocol_and_scenario() {
    let i = issues(&BASE.replace("protocol: TCP, expect", "protocol: TCP, family: IPv6, expect"));
    assert!(i.iter().any(|i| i.path == "probes[0].family" && !i.unsupported), "{i:?}");
    let i = issues(&BASE.replace("ip: 10.200.1.20", "ip: 10.200.1.20\n    ipv6: fd00::1"));
    assert_eq!(i[0].path, "pods[1].ipv6");
}

#[test]
fn at_least_one_end_is_a_pod() {
    let i = issues(&BASE.replace("from: default/frontend, to: default/backend", "from: 192.0.2.1, to: entity:host"));
    assert!(i.iter().any(|i| !i.unsupported && i.message.contains("at least one end")), "{i:?}");
}

#[test]
fn host_interface_names_fit_the_kernel_limit() {
    let a = host_interface_name("default", "frontend", 0);
    assert_eq!(a.len(), 15);
    assert_eq!(a, host_interface_name("default", "frontend", 0));
    assert_ne!(a, host_interface_name("default", "frontend", 1));
}

#[test]
fn namespace_labels_may_be_null() {
    let plan = load(&BASE.replace("  default: {}", "  default:")).unwrap();
    assert!(plan.namespaces["default"].is_empty());
}

#[test]
fn extra_probes_use_the_scenarios_pods_and_hosts_only() {
    let text = r"
name: x
namespaces: {default: {}}
pods:
  - {name: a, namespace: default}
  - {name: b, namespace: default, ports: [{port: 80}]}
probes:
  - {from: default/a, to: 203.0.113.7, port: 443, protocol: TCP, expect: deny}
";
    let plan = load_str(text, Path::new("x.yaml")).unwrap();
    let raw = |from: &str, to: &str, port: Option<u16>| RawProbe {
        from: from.into(),
        to: to.into(),
        port,
        protocol: ProbeProtocol::TCP,
        icmp_type: None,
        family: None,
        expect: Expect::Allow,
    };
    let p = plan.extra_probe(&raw("default/a", "default/b", Some(80)), 7).unwrap();
    assert_eq!((p.from, p.to, p.port, p.index), (HostRef::Pod(0), HostRef::Pod(1), Some(80), 7));
    assert!(plan.extra_probe(&raw("default/a", "203.0.113.7", Some(443)), 8).is_ok());
    let e = plan.extra_probe(&raw("default/a", "default/b", Some(81)), 9).unwrap_err();
    assert_eq!(e[0].path, "port", "{e:?}");
    let e = plan.extra_probe(&raw("default/a", "198.51.100.1", Some(443)), 9).unwrap_err();
    assert!(e[0].to_string().starts_with("to: 198.51.100.1 is not a host of this scenario"), "{e:?}");
    let e = plan.extra_probe(&raw("default/a", "203.0.113.7", Some(80)), 9).unwrap_err();
    assert!(e[0].message.contains("(443/TCP)"), "{e:?}");
    // The node exists in every scenario, but listens only where probes aim at it.
    assert!(plan.extra_probe(&raw("entity:host", "default/b", Some(80)), 9).is_ok());
    assert!(plan.extra_probe(&raw("default/a", "entity:host", Some(80)), 9).is_err());
    let e = plan.extra_probe(&raw("default/zz", "default/b", Some(80)), 9).unwrap_err();
    assert_eq!(e[0].path, "from", "{e:?}");
}

const NODES: &str = r"
name: cluster
nodes:
  - name: node-a
  - name: node-b
    labels: {zone: b}
namespaces:
  default: {}
pods:
  - {name: frontend, labels: {app: frontend}, node: node-a}
  - name: backend
    node: node-b
    labels: {app: backend}
    ports: [{port: 8080}, {port: 9090}]
  - {name: other, labels: {app: other}}
  - name: agent
    node: node-b
    hostNetwork: true
    ports: [{port: 7070}]
probes:
  - {from: default/frontend, to: default/backend, port: 8080, expect: allow}
  - {from: node:node-a, to: default/backend, port: 8080, expect: deny}
  - {from: node:node-b, to: default/backend, port: 9090, expect: allow}
  - {from: entity:host, to: default/backend, port: 9090, expect: allow}
  - {from: default/frontend, to: default/agent, port: 7070, expect: allow}
  - {from: default/frontend, to: node:node-b, port: 7070, expect: allow}
";

#[test]
fn nodes_pods_on_nodes_and_node_probes_resolve() {
    let plan = load(NODES).unwrap();
    assert!(plan.nodes_listed && plan.is_multi_node());
    let names: Vec<&str> = plan.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["node-a", "node-b"]);
    assert_eq!(plan.nodes[1].labels["zone"], "b");
    assert_eq!(plan.nodes[0].ipv4, Some(NODE_IPV4));
    assert_eq!(plan.nodes[1].ipv4.unwrap().to_string(), "10.201.0.1");
    // pods[].node, defaulting to the first node; addresses from the node's range.
    assert_eq!(plan.pods.iter().map(|p| p.node).collect::<Vec<_>>(), [0, 1, 0, 1]);
    assert_eq!(plan.pods[0].ipv4.unwrap().to_string(), "10.200.1.10");
    assert_eq!(plan.pods[1].ipv4.unwrap().to_string(), "10.201.1.10");
    assert_eq!(plan.pods[2].ipv4.unwrap().to_string(), "10.200.1.11");
    assert_eq!(node_pod_cidrs(1).0, ("10.201.0.0".parse().unwrap(), 16));
    // A host-network pod has its node's address and is no endpoint.
    let agent = &plan.pods[3];
    assert!(agent.host_network);
    assert_eq!(agent.ipv4, plan.nodes[1].ipv4);
    assert!(plan.endpoint_pod(&HostRef::Pod(3)).is_none());
    // node:NAME, and entity:host as the node of the other end's pod.
    assert_eq!(plan.probes[1].from, HostRef::Node(0));
    assert_eq!(plan.probes[2].from, HostRef::Node(1));
    assert_eq!(plan.probes[3].from, HostRef::Node(1));
    // The node serves its host-network pods' ports; probes to either share its listeners.
    let node_b = plan.hosts.iter().find(|h| h.host == HostRef::Node(1)).unwrap();
    assert!(node_b.is_node());
    assert_eq!(node_b.ports.iter().map(|p| p.port).collect::<Vec<_>>(), [7070]);
    assert_eq!(plan.host_key(&HostRef::Pod(3)), plan.host_key(&HostRef::Node(1)));
    assert_eq!(plan.node_of(&plan.probes[0].to), 1);
}

#[test]
fn a_file_without_nodes_has_one_implicit_node() {
    let plan = load(BASE).unwrap();
    assert!(!plan.nodes_listed && !plan.is_multi_node());
    assert_eq!(plan.nodes.len(), 1);
    assert_eq!(plan.nodes[0].name, IMPLICIT_NODE);
    assert!(plan.pods.iter().all(|p| p.node == 0 && !p.host_network));
    // entity:host stays the entity of format 1.0.
    let text = BASE.replace("from: default/frontend, to: default/backend", "from: entity:host, to: default/backend");
    assert_eq!(load(&text).unwrap().probes[0].from, HostRef::Entity(Entity::Host));
}

#[test]
fn node_errors_name_the_key_and_the_nodes() {
    let i =
        issues(&NODES.replace("node: node-b\n    labels: {app: backend}", "node: node-c\n    labels: {app: backend}"));
    let hit = i.iter().find(|i| i.path == "pods[1].node").unwrap_or_else(|| panic!("{i:?}"));
    assert!(hit.message.contains("\"node-c\" is not listed under `nodes` (nodes: node-a, node-b)"), "{hit}");

    let i = issues(&NODES.replace("  - name: node-b\n", "  - name: node-a\n"));
    let hit = i.iter().find(|i| i.path == "nodes[1].name").unwrap_or_else(|| panic!("{i:?}"));
    assert!(hit.message.contains("already defined at nodes[0]"), "{hit}");

    let i = issues(&NODES.replace("from: node:node-a,", "from: node:nope,"));
    assert!(i.iter().any(|i| i.path == "probes[1].from" && i.message.contains("\"nope\"")), "{i:?}");

    // Without `nodes`, neither pods[].node nor node:NAME can name one.
    let i = issues(&BASE.replace("labels: {app: frontend}", "labels: {app: frontend}\n    node: a"));
    assert!(i.iter().any(|i| i.path == "pods[0].node" && i.message.contains("lists no `nodes`")), "{i:?}");
    let i = issues(&BASE.replace("from: default/frontend, to: default/backend", "from: node:x, to: default/backend"));
    assert!(i.iter().any(|i| i.path == "probes[0].from" && i.message.contains("use entity:host")), "{i:?}");

    let i =
        issues(&NODES.replace("nodes:\n  - name: node-a\n  - name: node-b\n    labels: {zone: b}\n", "nodes: []\n"));
    assert!(i.iter().any(|i| i.path == "nodes"), "{i:?}");
    let (path, _) = syntax(&NODES.replace("labels: {zone: b}", "lables: {zone: b}"));
    assert_eq!(path, "nodes[1].lables");
}

#[test]
fn host_network_rules() {
    // No address of its own.
    let i = issues(&NODES.replace("hostNetwork: true", "hostNetwork: true\n    ip: 10.201.1.99"));
    assert!(i.iter().any(|i| i.path == "pods[3].ip" && i.message.contains("node's addresses")), "{i:?}");
    // Two host-network pods of one node cannot serve one port.
    let text = NODES
        .replace("probes:\n", "  - {name: agent2, node: node-b, hostNetwork: true, ports: [{port: 7070}]}\nprobes:\n");
    let i = issues(&text);
    assert!(i.iter().any(|i| i.path == "pods[4].ports[0].port" && i.message.contains("already served")), "{i:?}");
    // A probe needs an enforced pod at one end.
    let text = NODES.replace("from: default/frontend, to: default/agent", "from: node:node-a, to: default/agent");
    let i = issues(&text);
    assert!(i.iter().any(|i| i.path == "probes[4].to" && i.message.contains("not host-network")), "{i:?}");
    // Each node keeps its own /24.
    let i = issues(&NODES.replace("labels: {app: other}", "labels: {app: other}, ip: 10.201.0.7"));
    assert!(i.iter().any(|i| i.path == "pods[2].ip"), "{i:?}");
    // In a file without nodes, a host-network pod is the one node's host.
    let text = BASE
        .replace("policies:\n", "  - {name: hn, hostNetwork: true, ports: [{port: 7070}]}\npolicies:\n")
        .replace("probes:\n", "probes:\n  - {from: default/frontend, to: default/hn, port: 7070, expect: allow}\n");
    let plan = load(&text).unwrap();
    let hn = plan.pods.iter().position(|p| p.name == "hn").unwrap();
    assert_eq!(plan.pods[hn].ipv4, Some(NODE_IPV4));
    assert_eq!(plan.host_key(&HostRef::Pod(hn)), plan.host_key(&HostRef::Entity(Entity::Host)));
}
