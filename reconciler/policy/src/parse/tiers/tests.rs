//! ClusterNetworkPolicy, AdminNetworkPolicy and BaselineAdminNetworkPolicy: accepted
//! shapes and every rejection of the CRD schema and its CEL rules.

use crate::Policy;
use crate::model::{Entity, Peer, Peers, PolicyKind, Port, PortRule, Protocol, Tier, TierPlace, Verdict};
use crate::parse::{ManifestOutcome, PolicyError, parse_manifests};
use std::fmt::Write as _;

fn outcome(text: &str) -> ManifestOutcome {
    let mut out = parse_manifests(text, "test.yaml").expect("readable YAML");
    assert_eq!(out.len(), 1);
    out.remove(0)
}

fn accepted(text: &str) -> Policy {
    match outcome(text) {
        ManifestOutcome::Accepted(p) => p,
        ManifestOutcome::Rejected(e) => panic!("rejected: {e}"),
    }
}

fn rejected(text: &str) -> PolicyError {
    match outcome(text) {
        ManifestOutcome::Accepted(p) => panic!("accepted: {p:?}"),
        ManifestOutcome::Rejected(e) => e,
    }
}

/// The lines of `spec`, indented by two spaces.
fn indent(spec: &str) -> String {
    spec.lines().fold(String::new(), |mut s, l| {
        writeln!(s, "  {l}").unwrap();
        s
    })
}

fn cnp(spec: &str) -> String {
    format!(
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: p}}\nspec:\n{}",
        indent(spec)
    )
}

const SUBJECT: &str = "tier: Admin\npriority: 10\nsubject: {namespaces: {}}\n";

#[test]
fn a_cluster_network_policy_is_tiered_and_ordered() {
    let p = accepted(&cnp(&format!(
        "{SUBJECT}ingress:\n- {{name: a, action: Accept, from: [{{namespaces: {{matchLabels: {{team: mon}}}}}}], \
         protocols: [{{tcp: {{destinationPort: {{number: 9090}}}}}}, {{udp: {{destinationPort: {{range: {{start: 5000, end: 5010}}}}}}}}]}}\n\
         - {{action: Pass, from: [{{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: x}}}}}}}}]}}\n\
         egress:\n- {{action: Deny, to: [{{networks: [192.0.2.0/24]}}, {{nodes: {{}}}}]}}\n\
         - {{action: Accept, to: [{{domainNames: [example.com, '*.example.org']}}]}}\n"
    )));
    assert_eq!(p.kind, PolicyKind::ClusterNetworkPolicy);
    assert_eq!(p.namespace, None);
    assert_eq!(p.tier, Some(TierPlace { tier: Tier::Admin, priority: 10 }));
    let r = &p.rules[0];
    assert!(!r.enforce_ingress && !r.enforce_egress, "tiered rules never isolate");
    assert_eq!(r.ingress[0].verdict, Verdict::Allow);
    assert_eq!(
        r.ingress[0].ports,
        vec![
            PortRule { protocol: Protocol::Tcp, port: Port::Range { first: 9090, last: 9090 } },
            PortRule { protocol: Protocol::Udp, port: Port::Range { first: 5000, last: 5010 } },
        ]
    );
    assert_eq!(r.ingress[1].verdict, Verdict::Pass);
    assert!(r.ingress[1].ports.is_empty(), "no protocols: all traffic");
    assert_eq!(r.egress[0].verdict, Verdict::Deny);
    let Peers::Only(peers) = &r.egress[0].peers else { panic!() };
    assert!(matches!(peers[0], Peer::IpBlock(_)));
    assert_eq!(peers[1..], [Peer::Entity(Entity::Host), Peer::Entity(Entity::RemoteNode)]);
    assert_eq!(r.egress[1].peers, Peers::Only(vec![]), "domain names match nothing yet");
    assert!(p.warnings.iter().any(|w| w.contains("domainNames: not enforced")), "{:?}", p.warnings);
}

#[test]
fn subjects_and_pod_peers_select_pods_only() {
    let p = accepted(&cnp("tier: Baseline\npriority: 0\nsubject: {pods: {podSelector: {matchLabels: {app: db}}}}\n"));
    let s = p.rules[0].subject.to_string();
    assert!(s.contains("io.kubernetes.pod.namespace"), "{s}");
    assert!(s.contains("app"), "{s}");
}

#[test]
fn schema_and_cel_rejections() {
    let cases: &[(&str, &str, &str)] = &[
        ("tier: Admin\npriority: 1001\nsubject: {namespaces: {}}", "spec.priority", "outside 0..1000"),
        ("tier: Admin\npriority: -1\nsubject: {namespaces: {}}", "spec.priority", "outside 0..1000"),
        ("tier: Admin\nsubject: {namespaces: {}}", "spec.priority", "missing"),
        ("tier: NetworkPolicy\npriority: 1\nsubject: {namespaces: {}}", "spec.tier", "not Admin or Baseline"),
        ("priority: 1\nsubject: {namespaces: {}}", "spec.tier", "missing"),
        ("tier: Admin\npriority: 1", "spec.subject", "missing"),
        ("tier: Admin\npriority: 1\nsubject: {}", "spec.subject", "neither"),
        ("tier: Admin\npriority: 1\nsubject: {namespaces: {}, pods: {podSelector: {}}}", "spec.subject", "both"),
        (
            "tier: Baseline\npriority: 1\nsubject: {namespaces: {}}\ningress: [{action: Pass, from: [{namespaces: {}}]}]",
            "spec.ingress[0].action",
            "not allowed in the Baseline tier",
        ),
        (
            "tier: Admin\npriority: 1\nsubject: {namespaces: {}}\ningress: [{action: Allow, from: [{namespaces: {}}]}]",
            "spec.ingress[0].action",
            "v1alpha1",
        ),
        (
            "tier: Admin\npriority: 1\nsubject: {namespaces: {}}\ningress: [{action: accept, from: [{namespaces: {}}]}]",
            "spec.ingress[0].action",
            "not one of",
        ),
        (
            "tier: Admin\npriority: 1\nsubject: {namespaces: {}}\ningress: [{action: Deny}]",
            "spec.ingress[0].from",
            "missing or empty",
        ),
        (
            "tier: Admin\npriority: 1\nsubject: {namespaces: {}}\ningress: [{action: Deny, from: [{}]}]",
            "spec.ingress[0].from[0]",
            "sets no field",
        ),
        (
            "tier: Admin\npriority: 1\nsubject: {namespaces: {}}\ningress: [{action: Deny, from: [{namespaces: {}, pods: {podSelector: {}}}]}]",
            "spec.ingress[0].from[0]",
            "namespaces and pods",
        ),
        (
            "tier: Admin\npriority: 1\nsubject: {namespaces: {}}\ningress: [{action: Deny, from: [{networks: [10.0.0.0/8]}]}]",
            "spec.ingress[0].from[0].networks",
            "egress peer only",
        ),
        (
            "tier: Admin\npriority: 1\nsubject: {namespaces: {}}\negress: [{action: Deny, to: [{domainNames: [example.com]}]}]",
            "spec.egress[0].to[0].domainNames",
            "Accept rules only",
        ),
        (
            "tier: Admin\npriority: 1\nsubject: {namespaces: {}}\negress: [{action: Accept, to: [{domainNames: ['ex*.com']}]}]",
            "spec.egress[0].to[0].domainNames[0]",
            "not a domain name",
        ),
        (
            "tier: Admin\npriority: 1\nsubject: {namespaces: {}}\negress: [{action: Accept, to: [{networks: [10.0.0.0/33]}]}]",
            "spec.egress[0].to[0].networks[0]",
            "",
        ),
        (
            "tier: Admin\npriority: 1\nsubject: {namespaces: {}}\negress: [{action: Accept, to: [{networks: [10.0.0.0/8]}], protocols: [{destinationNamedPort: http}]}]",
            "spec.egress[0].protocols[0].destinationNamedPort",
            "networks have no named ports",
        ),
        (
            "tier: Admin\npriority: 1\nsubject: {namespaces: {}}\negress: [{action: Accept, to: [{nodes: {matchLabels: {a: b}}}]}]",
            "spec.egress[0].to[0].nodes",
            "node labels",
        ),
        (
            "tier: Admin\npriority: 1\nsubject: {namespaces: {}}\ningress: [{action: Deny, from: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {number: 0}}}]}]",
            "spec.ingress[0].protocols[0].tcp.destinationPort.number",
            "outside 1..65535",
        ),
        (
            "tier: Admin\npriority: 1\nsubject: {namespaces: {}}\ningress: [{action: Deny, from: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {range: {start: 90, end: 80}}}}]}]",
            "spec.ingress[0].protocols[0].tcp.destinationPort.range",
            "start must be less than end",
        ),
        (
            "tier: Admin\npriority: 1\nsubject: {namespaces: {}}\ningress: [{action: Deny, from: [{namespaces: {}}], protocols: [{tcp: {}}]}]",
            "spec.ingress[0].protocols[0].tcp",
            "no destinationPort",
        ),
        (
            "tier: Admin\npriority: 1\nsubject: {namespaces: {}}\ningress: [{action: Deny, from: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {number: 1}}, udp: {destinationPort: {number: 1}}}]}]",
            "spec.ingress[0].protocols[0]",
            "exactly one",
        ),
        (
            "tier: Admin\npriority: 1\nsubject: {namespaces: {}}\ningress: [{action: Deny, from: [{namespaces: {}}], protocols: []}]",
            "spec.ingress[0].protocols",
            "empty",
        ),
        (
            "tier: Admin\npriority: 1\nsubject: {namespaces: {}}\ningress: [{action: Deny, from: [{namespaces: {}}], protocols: [{icmp: {}}]}]",
            "spec.ingress[0].protocols[0].icmp",
            "unknown field `icmp`",
        ),
    ];
    for (spec, path, reason) in cases {
        let e = rejected(&cnp(spec));
        assert_eq!(e.path, *path, "{spec}: {e}");
        assert!(e.reason.contains(reason), "{spec}: {e}");
        assert!(!e.hint.is_empty(), "{spec}: {e}");
        assert_eq!(e.kind.as_deref(), Some("ClusterNetworkPolicy"));
    }
}

#[test]
fn too_many_rules_or_peers() {
    let peers: String = (0..26).fold(String::new(), |mut s, i| {
        write!(s, "{{namespaces: {{matchLabels: {{n: x{i}}}}}}}, ").unwrap();
        s
    });
    let e = rejected(&cnp(&format!("{SUBJECT}ingress: [{{action: Deny, from: [{peers}]}}]")));
    assert_eq!(e.path, "spec.ingress[0].from");
    let rules: String = (0..26).map(|_| "{action: Deny, from: [{namespaces: {}}]}, ").collect();
    let e = rejected(&cnp(&format!("{SUBJECT}ingress: [{rules}]")));
    assert_eq!(e.path, "spec.ingress");
}

#[test]
fn wrong_api_version() {
    let text = cnp(SUBJECT).replace("v1alpha2", "v1alpha1");
    let e = rejected(&text);
    assert_eq!(e.path, "apiVersion");
}

fn anp(kind: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}}}\nspec:\n{}",
        indent(spec)
    )
}

#[test]
fn v1alpha1_kinds_are_translated() {
    let p = accepted(&anp(
        "AdminNetworkPolicy",
        "a",
        "priority: 5\nsubject: {namespaces: {}}\ningress:\n- {action: Allow, from: [{namespaces: {}}], ports: [{portNumber: {protocol: UDP, port: 53}}, {portRange: {start: 8000, end: 8080}}, {namedPort: web}]}\n- {action: Pass, from: [{pods: {namespaceSelector: {}, podSelector: {}}}]}\n",
    ));
    assert_eq!(p.kind, PolicyKind::AdminNetworkPolicy);
    assert_eq!(p.tier, Some(TierPlace { tier: Tier::Admin, priority: 5 }));
    let r = &p.rules[0].ingress;
    assert_eq!(r[0].verdict, Verdict::Allow);
    assert_eq!(
        r[0].ports,
        vec![
            PortRule { protocol: Protocol::Udp, port: Port::Range { first: 53, last: 53 } },
            PortRule { protocol: Protocol::Tcp, port: Port::Range { first: 8000, last: 8080 } },
            PortRule { protocol: Protocol::Any, port: Port::Named("web".into()) },
        ]
    );
    assert_eq!(r[1].verdict, Verdict::Pass);

    let b = accepted(&anp(
        "BaselineAdminNetworkPolicy",
        "default",
        "subject: {namespaces: {}}\negress: [{action: Deny, to: [{networks: [0.0.0.0/0]}]}]\n",
    ));
    assert_eq!(b.kind, PolicyKind::BaselineAdminNetworkPolicy);
    assert_eq!(b.tier, Some(TierPlace { tier: Tier::Baseline, priority: crate::parse::BANP_PRIORITY }));

    let e = rejected(&anp("BaselineAdminNetworkPolicy", "other", "subject: {namespaces: {}}\n"));
    assert_eq!(e.path, "metadata.name");
    let e = rejected(&anp(
        "BaselineAdminNetworkPolicy",
        "default",
        "subject: {namespaces: {}}\ningress: [{action: Pass, from: [{namespaces: {}}]}]\n",
    ));
    assert_eq!(e.path, "spec.ingress[0].action");
    let e = rejected(&anp("BaselineAdminNetworkPolicy", "default", "priority: 3\nsubject: {namespaces: {}}\n"));
    assert_eq!(e.path, "spec.priority");
    let e = rejected(&anp(
        "AdminNetworkPolicy",
        "a",
        "priority: 5\nsubject: {namespaces: {}}\ningress: [{action: Accept, from: [{namespaces: {}}]}]\n",
    ));
    assert_eq!(e.path, "spec.ingress[0].action");
    let e = rejected(&anp(
        "AdminNetworkPolicy",
        "a",
        "priority: 5\nsubject: {namespaces: {}}\ningress: [{action: Deny, from: [{namespaces: {}}], ports: [{portNumber: {protocol: ICMP, port: 1}}]}]\n",
    ));
    assert_eq!(e.path, "spec.ingress[0].ports[0].portNumber.protocol");
}
