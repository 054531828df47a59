use std::collections::BTreeMap;

use super::*;
use crate::synth::accepted_policies;

struct World {
    identities: IdentityAllocator,
    endpoints: Vec<EndpointView>,
}

impl World {
    fn new() -> World {
        World { identities: IdentityAllocator::new(), endpoints: Vec::new() }
    }

    /// Adds a pod; returns its identity.
    fn pod(&mut self, id: u16, ns: &str, labels: &[(&str, &str)], ports: &[(&str, u16, Protocol)]) -> u32 {
        let labels: BTreeMap<String, String> = labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let labels = LabelSet::for_pod(ns, &BTreeMap::new(), &labels, "default", "default");
        let identity = self.identities.allocate(&labels);
        self.endpoints.push(EndpointView {
            id,
            namespace: ns.to_owned(),
            identity,
            labels,
            named_ports: ports
                .iter()
                .map(|(name, port, protocol)| NamedPort { name: (*name).to_owned(), port: *port, protocol: *protocol })
                .collect(),
        });
        identity
    }

    fn resolve(&self, yaml: &str) -> DesiredState {
        resolve(&accepted_policies(yaml, "t.yaml"), &self.endpoints, &self.identities)
    }
}

/// Entries of one endpoint as `key => allow|deny`.
fn shown(state: &DesiredState, ep: u16) -> Vec<String> {
    state.endpoints[&ep]
        .entries
        .iter()
        .map(|(k, v)| format!("{k} => {}", if v.deny { "deny" } else { "allow" }))
        .collect()
}

fn cnp(ns: &str, spec: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p, namespace: {ns}}}\nspec:\n{spec}"
    )
}

#[test]
fn seed_allows_frontend_to_backend_only_in_the_namespace() {
    let mut w = World::new();
    let fe = w.pod(1, "default", &[("app", "frontend")], &[]);
    w.pod(2, "default", &[("app", "backend")], &[]);
    w.pod(3, "prod", &[("app", "frontend")], &[]);
    let s = w.resolve(&cnp(
        "default",
        "  endpointSelector: {matchLabels: {app: backend}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: frontend}}]\n    toPorts: [{ports: [{port: \"8080\", protocol: TCP}]}]\n",
    ));
    assert_eq!(fe, 256);
    let backend = &s.endpoints[&2];
    assert!(backend.ingress_enforced && !backend.egress_enforced);
    assert_eq!(shown(&s, 2), ["ingress from 256 TCP/8080 => allow"]);
    let origin = backend.entries.values().next().unwrap().origins.iter().next().unwrap();
    assert_eq!(origin.to_string(), "CiliumNetworkPolicy default/p spec.ingress[0]");
    for other in [1, 3] {
        assert_eq!(*s.endpoints[&other], EndpointPolicy::default(), "endpoint {other} is not selected");
    }
}

#[test]
fn empty_peer_selector_means_the_namespace_not_the_world() {
    let mut w = World::new();
    let a = w.pod(1, "default", &[("app", "a")], &[]);
    let b = w.pod(2, "default", &[("app", "b")], &[]);
    w.pod(3, "prod", &[("app", "a")], &[]);
    let s = w.resolve(&cnp("default", "  endpointSelector: {}\n  ingress: [{fromEndpoints: [{}]}]\n"));
    let want = [format!("ingress from {a} * => allow"), format!("ingress from {b} * => allow")];
    assert_eq!(shown(&s, 1), want);
    assert_eq!(shown(&s, 2), want);
    assert!(!s.endpoints[&3].ingress_enforced);
}

#[test]
fn empty_item_isolates_and_l4_only_allows_any_peer() {
    let mut w = World::new();
    w.pod(1, "default", &[], &[]);
    let s = w.resolve(&cnp(
        "default",
        "  endpointSelector: {}\n  ingress: [{}]\n  egress: [{toPorts: [{ports: [{port: \"53\", protocol: ANY}]}]}]\n",
    ));
    let ep = &s.endpoints[&1];
    assert!(ep.ingress_enforced && ep.egress_enforced);
    assert_eq!(
        shown(&s, 1),
        ["egress to any TCP/53 => allow", "egress to any UDP/53 => allow", "egress to any SCTP/53 => allow",],
        "ANY with a port is one entry per protocol with ports"
    );
}

#[test]
fn any_protocol_without_port_is_one_wildcard_entry() {
    let mut w = World::new();
    w.pod(1, "default", &[], &[]);
    let s = w.resolve(&cnp("default", "  endpointSelector: {}\n  egress: [{toPorts: [{ports: [{protocol: ANY}]}]}, {toPorts: [{ports: [{protocol: UDP}]}]}]\n"));
    assert_eq!(shown(&s, 1), ["egress to any * => allow", "egress to any UDP/* => allow"]);
}

#[test]
fn port_ranges_become_prefix_blocks() {
    let mut w = World::new();
    w.pod(1, "default", &[], &[]);
    let s = w.resolve(&cnp(
        "default",
        "  endpointSelector: {}\n  egress: [{toPorts: [{ports: [{port: \"8000\", endPort: 8008, protocol: TCP}]}]}]\n",
    ));
    assert_eq!(shown(&s, 1), ["egress to any TCP/8000-8007 => allow", "egress to any TCP/8008 => allow"]);
}

#[test]
fn reserved_identities_only_by_reserved_labels() {
    let mut w = World::new();
    w.pod(1, "default", &[], &[]);
    let s = w.resolve(&cnp(
        "default",
        "  endpointSelector: {}\n  ingress: [{fromEndpoints: [{matchLabels: {reserved:host: \"\"}}, {matchLabels: {reserved:world: \"\"}}]}]\n",
    ));
    assert_eq!(
        shown(&s, 1),
        [
            "ingress from 1 * => allow",
            "ingress from 2 * => allow",
            "ingress from 9 * => allow",
            "ingress from 10 * => allow"
        ],
        "world selects world, world-ipv4 and world-ipv6; not scoped to the namespace"
    );
    let s = w.resolve(&cnp(
        "default",
        "  endpointSelector: {}\n  ingress: [{fromEndpoints: [{matchExpressions: [{key: app, operator: DoesNotExist}]}]}]\n",
    ));
    assert_eq!(shown(&s, 1), ["ingress from 256 * => allow"], "negative selectors do not reach reserved identities");
}

#[test]
fn deny_wins_over_allow() {
    let mut w = World::new();
    let fe = w.pod(1, "default", &[("app", "frontend")], &[]);
    let other = w.pod(2, "default", &[("app", "other")], &[]);
    w.pod(3, "default", &[("app", "backend")], &[]);
    let allow = "  - fromEndpoints: [{}]\n    toPorts: [{ports: [{port: \"80\", protocol: TCP}, {port: \"81\", protocol: TCP}]}]\n  - fromEndpoints: [{matchLabels: {app: other}}]\n";
    // A broader deny for one identity drops that identity's narrower allows.
    let s = w.resolve(&cnp(
        "default",
        &format!("  endpointSelector: {{matchLabels: {{app: backend}}}}\n  ingress:\n{allow}  ingressDeny:\n  - fromEndpoints: [{{matchLabels: {{app: frontend}}}}]\n"),
    ));
    assert_eq!(
        shown(&s, 3),
        [
            format!("ingress from {fe} * => deny"),
            format!("ingress from {other} * => allow"),
            format!("ingress from {other} TCP/80 => allow"),
            format!("ingress from {other} TCP/81 => allow"),
            "ingress from 258 TCP/80 => allow".to_owned(),
            "ingress from 258 TCP/81 => allow".to_owned(),
        ]
    );
    // A deny for any peer on one port drops every allow it covers, and wins on equal keys.
    let s = w.resolve(&cnp(
        "default",
        &format!("  endpointSelector: {{matchLabels: {{app: backend}}}}\n  ingress:\n{allow}  ingressDeny:\n  - toPorts: [{{ports: [{{port: \"80\", protocol: TCP}}]}}]\n"),
    ));
    assert_eq!(
        shown(&s, 3),
        [
            "ingress from any TCP/80 => deny".to_owned(),
            format!("ingress from {fe} TCP/81 => allow"),
            format!("ingress from {other} * => allow"),
            format!("ingress from {other} TCP/81 => allow"),
            "ingress from 258 TCP/81 => allow".to_owned(),
        ],
        "the allow for {other} on every port stays: the datapath checks the any-peer deny too"
    );
}

#[test]
fn a_narrower_deny_keeps_the_broader_allow() {
    let mut w = World::new();
    let fe = w.pod(1, "default", &[("app", "frontend")], &[]);
    w.pod(2, "default", &[("app", "backend")], &[]);
    let s = w.resolve(&cnp(
        "default",
        "  endpointSelector: {matchLabels: {app: backend}}\n  ingress: [{fromEndpoints: [{matchLabels: {app: frontend}}]}]\n  ingressDeny: [{fromEndpoints: [{matchLabels: {app: frontend}}], toPorts: [{ports: [{port: \"22\", protocol: TCP}]}]}]\n",
    ));
    assert_eq!(shown(&s, 2), [format!("ingress from {fe} * => allow"), format!("ingress from {fe} TCP/22 => deny")]);
}

#[test]
fn deny_range_covers_single_ports_of_the_same_protocol_only() {
    let mut w = World::new();
    w.pod(1, "default", &[], &[]);
    let s = w.resolve(&cnp(
        "default",
        "  endpointSelector: {}\n  egress: [{toPorts: [{ports: [{port: \"8002\", protocol: TCP}, {port: \"8002\", protocol: UDP}, {port: \"8004\", protocol: TCP}]}]}]\n  egressDeny: [{toPorts: [{ports: [{port: \"8000\", endPort: 8003, protocol: TCP}]}]}]\n",
    ));
    assert_eq!(
        shown(&s, 1),
        ["egress to any TCP/8000-8003 => deny", "egress to any TCP/8004 => allow", "egress to any UDP/8002 => allow"]
    );
}

#[test]
fn origins_are_merged_across_policies() {
    let mut w = World::new();
    w.pod(1, "default", &[], &[]);
    let one =
        cnp("default", "  endpointSelector: {}\n  egress: [{toPorts: [{ports: [{port: \"53\", protocol: UDP}]}]}]\n");
    let two = one.replace("name: p,", "name: q,");
    let s = w.resolve(&format!("{one}---\n{two}"));
    let origins: Vec<String> =
        s.endpoints[&1].entries.values().next().unwrap().origins.iter().map(ToString::to_string).collect();
    assert_eq!(
        origins,
        ["CiliumNetworkPolicy default/p spec.egress[0]", "CiliumNetworkPolicy default/q spec.egress[0]"]
    );
}

#[test]
fn named_ports_resolve_on_the_destination() {
    let mut w = World::new();
    let client = w.pod(1, "default", &[("app", "client")], &[]);
    let web = w.pod(2, "default", &[("app", "web")], &[("http", 8080, Protocol::Tcp), ("dns", 53, Protocol::Udp)]);
    let s = w.resolve(&cnp(
        "default",
        "  endpointSelector: {matchLabels: {app: web}}\n  ingress: [{fromEndpoints: [{matchLabels: {app: client}}], toPorts: [{ports: [{port: http}, {port: dns, protocol: TCP}]}]}]\n",
    ));
    assert_eq!(shown(&s, 2), [format!("ingress from {client} TCP/8080 => allow")], "dns is UDP, the rule says TCP");
    let s = w.resolve(&cnp(
        "default",
        "  endpointSelector: {matchLabels: {app: client}}\n  egress: [{toEndpoints: [{matchLabels: {app: web}}], toPorts: [{ports: [{port: http}, {port: missing}]}]}]\n",
    ));
    assert_eq!(shown(&s, 1), [format!("egress to {web} TCP/8080 => allow")]);
}

/// A pod of another node is no local endpoint: its named ports come separately, by
/// identity, and egress named ports resolve on them too; when they change later, the
/// incremental update recomputes the endpoints whose rules name ports.
#[test]
fn egress_named_ports_resolve_on_other_nodes_pods() {
    let mut w = World::new();
    w.pod(1, "default", &[("app", "client")], &[]);
    let labels = LabelSet::for_pod(
        "default",
        &BTreeMap::new(),
        &BTreeMap::from([("app".to_owned(), "web".to_owned())]),
        "default",
        "default",
    );
    let web = w.identities.allocate(&labels);
    let policies = accepted_policies(
        &cnp(
            "default",
            "  endpointSelector: {matchLabels: {app: client}}\n  egress: [{toEndpoints: [{matchLabels: {app: web}}], toPorts: [{ports: [{port: http}]}]}]\n",
        ),
        "t.yaml",
    );
    let http = |port| BTreeMap::from([(web, vec![NamedPort { name: "http".into(), port, protocol: Protocol::Tcp }])]);

    let mut r = PolicyResolver::new(Options::default());
    r.set_policies(Arc::new(policies.clone()));
    r.set_endpoints(w.endpoints.clone());
    r.set_identities(Arc::new(w.identities.clone()), BTreeMap::new());
    assert!(shown(r.resolve(), 1).is_empty(), "no pod names the port yet: nothing is allowed");

    r.set_remote_named_ports(http(8080));
    let changes = r.update(Arc::new(w.identities.clone()), &[], BTreeMap::new());
    assert!(!changes.full, "{changes:?}");
    assert_eq!(shown(r.state(), 1), [format!("egress to {web} TCP/8080 => allow")]);

    r.set_remote_named_ports(http(9090));
    r.update(Arc::new(w.identities.clone()), &[], BTreeMap::new());
    assert_eq!(shown(r.state(), 1), [format!("egress to {web} TCP/9090 => allow")]);

    let full = resolve_on_node(
        &policies,
        &w.endpoints,
        &w.identities,
        &CidrIdentities::for_policies(&policies),
        &BTreeMap::new(),
        &http(9090),
    );
    assert_eq!(full.endpoints, r.state().endpoints, "the incremental result is the full one");
}

#[test]
fn enable_default_deny_false_keeps_allows_without_enforcing() {
    let mut w = World::new();
    w.pod(1, "default", &[], &[]);
    let s = w.resolve(&cnp("default", "  endpointSelector: {}\n  enableDefaultDeny: {egress: false}\n  egress: [{toPorts: [{ports: [{port: \"53\", protocol: UDP}]}]}]\n"));
    assert!(!s.endpoints[&1].egress_enforced);
    assert_eq!(shown(&s, 1), ["egress to any UDP/53 => allow"]);
}

#[test]
fn enable_default_deny_false_still_applies_deny_rules() {
    // Cilium: enableDefaultDeny only decides whether the policy puts its endpoints into
    // default deny; its deny rules apply regardless. The direction is enforced with an
    // allow for every peer, beside which the deny wins.
    let mut w = World::new();
    w.pod(1, "default", &[], &[]);
    let s = w.resolve(&cnp(
        "default",
        "  endpointSelector: {}\n  enableDefaultDeny: {ingress: false}\n  ingress: [{toPorts: [{ports: [{port: \"80\", protocol: TCP}]}]}]\n  ingressDeny: [{toPorts: [{ports: [{port: \"81\", protocol: TCP}]}]}]\n",
    ));
    assert!(s.endpoints[&1].ingress_enforced);
    assert!(!s.endpoints[&1].egress_enforced);
    assert_eq!(shown(&s, 1), ["ingress from any * => allow", "ingress from any TCP/81 => deny"]);
}

mod peers;
