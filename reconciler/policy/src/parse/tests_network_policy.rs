//! Kubernetes NetworkPolicy parsing.

use super::*;
use crate::model::{Peer, Peers, Port, PortRule, Protocol};

fn knp(spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: np, namespace: prod}}\nspec:\n{spec}"
    )
}

fn accepted(spec: &str) -> Policy {
    super::tests::accepted(&knp(spec))
}

fn rejected(spec: &str) -> PolicyError {
    super::tests::rejected(&knp(spec))
}

/// The peers of the first ingress rule, shown.
fn ingress_peers(spec: &str) -> Vec<String> {
    let p = accepted(spec);
    match &p.rules[0].ingress[0].peers {
        Peers::Any => vec!["any".to_owned()],
        Peers::Only(list) => list
            .iter()
            .map(|peer| match peer {
                Peer::Endpoints(s) => s.to_string(),
                Peer::IpBlock(b) => format!("ipBlock {b}"),
                other => panic!("{other:?}"),
            })
            .collect(),
    }
}

#[test]
fn subject_and_policy_types() {
    let p = accepted("  podSelector: {matchLabels: {app: db}}\n");
    assert_eq!(p.kind, PolicyKind::NetworkPolicy);
    assert_eq!(p.display_name(), "NetworkPolicy prod/np");
    let r = &p.rules[0];
    assert_eq!(r.subject.to_string(), "k8s:app=db, k8s:io.kubernetes.pod.namespace=prod");
    assert!(r.enforce_ingress && !r.enforce_egress, "omitted policyTypes: Ingress only");
    assert!(r.ingress.is_empty(), "no ingress rules: deny all ingress");

    let r = &accepted("  podSelector: {}\n  egress: [{}]\n").rules[0];
    assert!(r.enforce_ingress && r.enforce_egress, "egress rules add Egress");
    let r = &accepted("  podSelector: {}\n  egress: []\n").rules[0];
    assert!(r.enforce_ingress && !r.enforce_egress, "an empty egress list is no egress rules");
    let r = &accepted("  podSelector: {}\n  policyTypes: [Egress]\n").rules[0];
    assert!(!r.enforce_ingress && r.enforce_egress);
    let p = accepted("  podSelector: {}\n  policyTypes: [Egress]\n  ingress: [{}]\n");
    assert!(p.rules[0].ingress.is_empty());
    assert_eq!(p.warnings.len(), 1, "ignored ingress rules are reported");
    let e = rejected("  podSelector: {}\n  policyTypes: [ingress]\n");
    assert_eq!(e.path, "spec.policyTypes[0]");
    let e = rejected("  policyTypes: [Ingress]\n");
    assert_eq!(e.path, "spec.podSelector");
}

#[test]
fn empty_rule_allows_every_peer() {
    assert_eq!(ingress_peers("  podSelector: {}\n  ingress: [{}]\n"), ["any"]);
    assert_eq!(ingress_peers("  podSelector: {}\n  ingress: [{from: []}]\n"), ["any"]);
    let p = accepted("  podSelector: {}\n  ingress: [{ports: [{port: 80}]}]\n");
    assert_eq!(p.rules[0].ingress[0].peers, Peers::Any);
}

#[test]
fn peers_pod_namespace_and_both() {
    assert_eq!(
        ingress_peers("  podSelector: {}\n  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]\n"),
        ["k8s:app=web, k8s:io.kubernetes.pod.namespace=prod"],
        "podSelector alone: the policy's namespace"
    );
    assert_eq!(
        ingress_peers("  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: a}}}]}]\n"),
        ["k8s:io.cilium.k8s.namespace.labels.team=a, k8s:io.kubernetes.pod.namespace"],
        "namespaceSelector alone: every pod of those namespaces"
    );
    assert_eq!(
        ingress_peers("  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {}}]}]\n"),
        ["k8s:io.kubernetes.pod.namespace"],
        "every pod of every namespace"
    );
    assert_eq!(
        ingress_peers(
            "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: a}}, podSelector: {matchExpressions: [{key: app, operator: In, values: [x, y]}]}}]}]\n"
        ),
        ["k8s:app in (x,y), k8s:io.cilium.k8s.namespace.labels.team=a, k8s:io.kubernetes.pod.namespace"],
        "both in one peer: AND"
    );
    assert_eq!(
        ingress_peers(
            "  podSelector: {}\n  ingress: [{from: [{podSelector: {matchLabels: {app: a}}}, {namespaceSelector: {matchLabels: {team: a}}}]}]\n"
        )
        .len(),
        2,
        "two peers: OR"
    );
}

#[test]
fn ip_blocks() {
    assert_eq!(
        ingress_peers(
            "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.2.0.0/16, 10.1.0.0/16]}}]}]\n"
        ),
        ["ipBlock 10.0.0.0/8 except 10.1.0.0/16,10.2.0.0/16"]
    );
    let e =
        rejected("  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]}]\n");
    assert_eq!(e.path, "spec.ingress[0].from[0].ipBlock.except[0]");
    assert_eq!(e.reason, "except 11.0.0.0/16 is not strictly inside cidr 10.0.0.0/8");
    let e = rejected("  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]\n");
    assert_eq!(e.path, "spec.ingress[0].from[0].ipBlock.cidr");
    let e = rejected("  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]\n");
    assert_eq!(e.path, "spec.ingress[0].from[0].ipBlock");
    let e = rejected("  podSelector: {}\n  ingress: [{from: [{}]}]\n");
    assert_eq!(e.path, "spec.ingress[0].from[0]");
    let p = accepted("  podSelector: {}\n  egress: [{to: [{ipBlock: {cidr: 10.0.0.1/8}}]}]\n");
    assert_eq!(
        p.warnings,
        ["spec.egress[0].to[0].ipBlock.cidr: 10.0.0.1/8 has bits set past the prefix length; it is read as 10.0.0.0/8"]
    );
}

#[test]
fn ports_default_to_tcp_with_names_and_ranges() {
    let p = accepted(
        "  podSelector: {}\n  ingress: [{ports: [{port: 80}, {protocol: UDP, port: dns}, {port: 8000, endPort: 8010}, {protocol: SCTP}]}]\n",
    );
    assert_eq!(
        p.rules[0].ingress[0].ports,
        [
            PortRule { protocol: Protocol::Tcp, port: Port::Range { first: 80, last: 80 } },
            PortRule { protocol: Protocol::Udp, port: Port::Named("dns".into()) },
            PortRule { protocol: Protocol::Tcp, port: Port::Range { first: 8000, last: 8010 } },
            PortRule { protocol: Protocol::Sctp, port: Port::Any },
        ]
    );
    for (ports, path) in [
        ("[{port: 0}]", "spec.ingress[0].ports[0].port"),
        ("[{port: \"80\"}]", "spec.ingress[0].ports[0].port"),
        ("[{protocol: tcp}]", "spec.ingress[0].ports[0].protocol"),
        ("[{protocol: ICMP}]", "spec.ingress[0].ports[0].protocol"),
        ("[{port: 90, endPort: 80}]", "spec.ingress[0].ports[0].endPort"),
        ("[{port: http, endPort: 80}]", "spec.ingress[0].ports[0].endPort"),
        ("[{prot: TCP}]", "spec.ingress[0].ports[0].prot"),
    ] {
        let e = rejected(&format!("  podSelector: {{}}\n  ingress: [{{ports: {ports}}}]\n"));
        assert_eq!(e.path, path, "{ports}");
    }
}

#[test]
fn selector_syntax_is_checked() {
    let e = rejected("  podSelector: {matchLabels: {\"bad key\": x}}\n");
    assert_eq!(e.path, "spec.podSelector.matchLabels.bad key");
    let e = rejected("  podSelector: {matchLabels: {app: \"a b\"}}\n");
    assert!(e.reason.starts_with("label value \"a b\" is not valid"), "{}", e.reason);
    let e = rejected(
        "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: team, operator: In}]}}]}]\n",
    );
    assert_eq!(e.path, "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].values");
}

#[test]
fn api_version_and_defaults() {
    let text =
        "apiVersion: networking.k8s.io/v1beta1\nkind: NetworkPolicy\nmetadata: {name: np}\nspec: {podSelector: {}}\n";
    let ManifestOutcome::Rejected(e) = &parse_manifests(text, "k.yaml").unwrap()[0] else { panic!() };
    assert_eq!(e.path, "apiVersion");
    let text = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\nspec: {podSelector: {}}\n";
    let ManifestOutcome::Accepted(p) = &parse_manifests(text, "k.yaml").unwrap()[0] else { panic!() };
    assert_eq!(p.namespace.as_deref(), Some("default"));
}
