//! CiliumNetworkPolicy peers beyond endpoints: entities, CIDRs, requires, ICMP, and
//! Cilium's validation rules.

use super::*;
use crate::model::{Entity, Peer, Peers, Port, PortRule, Protocol};

/// A CNP in namespace `default` with one item in `field` (YAML flow text).
fn cnp(field: &str, item: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p}}\n\
         spec:\n  endpointSelector: {{}}\n  {field}:\n  - {item}\n"
    )
}

fn accepted(field: &str, item: &str) -> Policy {
    super::tests::accepted(&cnp(field, item))
}

fn rejected(field: &str, item: &str) -> PolicyError {
    super::tests::rejected(&cnp(field, item))
}

/// Each (field, item) is rejected at its path.
fn rejected_at(cases: &[(&str, &str, &str)]) {
    for (field, item, path) in cases {
        assert_eq!(rejected(field, item).path, *path, "{field}: {item}");
    }
}

fn peers(field: &str, item: &str) -> Peers {
    let p = accepted(field, item);
    let r = &p.rules[0];
    r.ingress.first().or(r.egress.first()).unwrap().peers.clone()
}

#[test]
fn entities() {
    assert_eq!(
        peers("ingress", "{fromEntities: [world, cluster, world]}"),
        Peers::Only(vec![Peer::Entity(Entity::World), Peer::Entity(Entity::Cluster)])
    );
    assert_eq!(
        peers("egress", "{toEntities: [kube-apiserver]}"),
        Peers::Only(vec![Peer::Entity(Entity::KubeApiserver)])
    );
    for e in Entity::ALL {
        assert_eq!(Entity::parse(e.as_str()), Some(e));
    }
    let e = rejected("ingress", "{fromEntities: [World]}");
    assert_eq!(e.path, "spec.ingress[0].fromEntities[0]");
    assert!(e.hint.contains("kube-apiserver"), "{}", e.hint);
}

#[test]
fn cidrs_and_cidr_sets() {
    let Peers::Only(list) = peers("egress", "{toCIDR: [10.0.0.0/8, 192.168.1.1, \"fd00::/8\"]}") else { panic!() };
    let shown: Vec<String> = list
        .iter()
        .map(|p| match p {
            Peer::Cidr(b) => b.to_string(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(shown, ["10.0.0.0/8", "192.168.1.1/32", "fd00::/8"]);
    let Peers::Only(list) = peers("ingress", "{fromCIDRSet: [{cidr: 10.0.0.0/8, except: [10.96.0.0/12]}]}") else {
        panic!()
    };
    let Peer::Cidr(block) = &list[0] else { panic!() };
    assert_eq!(block.to_string(), "10.0.0.0/8 except 10.96.0.0/12");

    rejected_at(&[
        ("egress", "{toCIDR: [10.0.0.0/40]}", "spec.egress[0].toCIDR[0]"),
        ("egress", "{toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.0.0.0/8]}]}", "spec.egress[0].toCIDRSet[0].except[0]"),
        ("egress", "{toCIDRSet: [{cidrGroupRef: office}]}", "spec.egress[0].toCIDRSet[0].cidrGroupRef"),
        ("egress", "{toCIDRSet: [{except: [10.0.0.0/8]}]}", "spec.egress[0].toCIDRSet[0].cidr"),
    ]);
}

#[test]
fn one_kind_of_peer_per_rule() {
    let e = rejected("ingress", "{fromEndpoints: [{}], fromCIDR: [10.0.0.0/8]}");
    assert_eq!(e.path, "spec.ingress[0].fromCIDR");
    assert_eq!(e.reason, "combining fromEndpoints and fromCIDR in one rule is not supported");
    let e = rejected("egress", "{toCIDR: [10.0.0.0/8], toCIDRSet: [{cidr: 11.0.0.0/8}]}");
    assert_eq!(e.reason, "combining toCIDR and toCIDRSet in one rule is not supported");
    let e = rejected("egress", "{toEntities: [world], toFQDNs: [{matchName: example.com}]}");
    assert_eq!(e.reason, "combining toEntities and toFQDNs in one rule is not supported");
    // An empty list is no peer of that kind.
    assert_eq!(
        peers("ingress", "{fromEndpoints: [], fromEntities: [host]}"),
        Peers::Only(vec![Peer::Entity(Entity::Host)])
    );
}

#[test]
fn requires_are_scoped_and_grant_nothing() {
    let p = accepted("ingress", "{fromRequires: [{matchLabels: {env: prod}}]}");
    let pr = &p.rules[0].ingress[0];
    assert_eq!(pr.peers, Peers::Only(vec![]), "requires alone names no peer");
    assert_eq!(pr.requires.len(), 1);
    assert_eq!(pr.requires[0].to_string(), "any:env=prod, k8s:io.kubernetes.pod.namespace=default");
    assert!(p.rules[0].enforce_ingress);
}

#[test]
fn icmps() {
    let p = accepted(
        "ingress",
        "{fromEndpoints: [{}], icmps: [{fields: [{type: 8}, {type: EchoRequest, family: IPv4}, {type: EchoRequest, family: IPv6}]}]}",
    );
    assert_eq!(
        p.rules[0].ingress[0].ports,
        [
            PortRule { protocol: Protocol::Icmp, port: Port::Range { first: 8, last: 8 } },
            PortRule { protocol: Protocol::IcmpV6, port: Port::Range { first: 128, last: 128 } },
        ]
    );
    assert_eq!(peers("egress", "{icmps: [{fields: [{type: 0}]}]}"), Peers::Any, "ICMP only: every peer");
    rejected_at(&[
        ("ingress", "{icmps: [{fields: [{type: 8}]}], toPorts: [{ports: [{port: \"80\"}]}]}", "spec.ingress[0].icmps"),
        ("ingress", "{icmps: [{fields: [{type: 300}]}]}", "spec.ingress[0].icmps[0].fields[0].type"),
        ("ingress", "{icmps: [{fields: [{type: 8, family: ipv4}]}]}", "spec.ingress[0].icmps[0].fields[0].family"),
        ("ingress", "{icmps: [{}]}", "spec.ingress[0].icmps[0].fields"),
    ]);
    let p = accepted("ingressDeny", "{icmps: [{fields: [{type: 8}]}]}");
    assert_eq!(p.rules[0].ingress[0].ports.len(), 1, "deny rules take ICMP types");
}

#[test]
fn at_most_forty_ports() {
    let ports = |n: usize| (1..=n).map(|p| format!("{{port: \"{p}\"}}")).collect::<Vec<_>>().join(", ");
    accepted("ingress", &format!("{{toPorts: [{{ports: [{}]}}]}}", ports(40)));
    let e = rejected("ingress", &format!("{{toPorts: [{{ports: [{}]}}]}}", ports(41)));
    assert_eq!(e.path, "spec.ingress[0].toPorts[0].ports");
    assert_eq!(e.reason, "41 ports in one toPorts item; at most 40 are allowed");
}

#[test]
fn unenforced_peers_warn_and_match_nothing() {
    let p = accepted("egress", "{toFQDNs: [{matchName: example.com}], toPorts: [{ports: [{port: \"443\"}]}]}");
    let pr = &p.rules[0].egress[0];
    assert_eq!(pr.peers, Peers::Only(vec![]), "not widened to every peer by its ports");
    assert_eq!(pr.ports.len(), 1);
    assert_eq!(p.warnings.len(), 1);
    assert!(p.warnings[0].starts_with("spec.egress[0].toFQDNs: not enforced"), "{}", p.warnings[0]);
    assert!(p.warnings[0].contains("allows nothing"), "{}", p.warnings[0]);
    let p = accepted("egress", "{toServices: [{k8sService: {serviceName: s, namespace: n}}]}");
    assert!(p.warnings[0].starts_with("spec.egress[0].toServices: not enforced"));
    let p = accepted("ingress", "{fromGroups: [{aws: {securityGroupsIds: [sg-1]}}]}");
    assert!(p.warnings[0].starts_with("spec.ingress[0].fromGroups: not enforced"));
    let p = accepted("ingress", "{fromEndpoints: [{}], authentication: {mode: required}}");
    assert!(p.warnings[0].starts_with("spec.ingress[0].authentication: mutual authentication is not enforced"));
    let e = rejected("egressDeny", "{toServices: [{k8sService: {serviceName: s, namespace: n}}]}");
    assert_eq!(e.path, "spec.egressDeny[0].toServices");
}

#[test]
fn label_syntax_in_cilium_selectors() {
    rejected_at(&[
        (
            "ingress",
            "{fromEndpoints: [{matchLabels: {\"k8s:app name\": x}}]}",
            "spec.ingress[0].fromEndpoints[0].matchLabels.k8s:app name",
        ),
        (
            "ingress",
            "{fromEndpoints: [{matchExpressions: [{key: \"-x\", operator: Exists}]}]}",
            "spec.ingress[0].fromEndpoints[0].matchExpressions[0].key",
        ),
        (
            "ingress",
            "{fromEndpoints: [{matchExpressions: [{key: x, operator: In, values: [\"a/b\"]}]}]}",
            "spec.ingress[0].fromEndpoints[0].matchExpressions[0].values[0]",
        ),
    ]);
}
