use super::*;
use crate::model::{Peer, Peers, Port, PortRule, Protocol, Verdict};

const SEED: &str = r#"
apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: "allow-frontend-to-backend"
spec:
  endpointSelector:
    matchLabels:
      app: backend
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: frontend
    toPorts:
    - ports:
      - port: "8080"
        protocol: TCP
"#;

/// The one document of `text`.
pub(super) fn one(text: &str) -> ManifestOutcome {
    let mut all = parse_manifests(text, "test.yaml").expect("readable YAML");
    assert_eq!(all.len(), 1, "{all:?}");
    all.remove(0)
}

pub(super) fn accepted(text: &str) -> Policy {
    match one(text) {
        ManifestOutcome::Accepted(p) => p,
        ManifestOutcome::Rejected(e) => panic!("rejected: {e}"),
    }
}

pub(super) fn rejected(text: &str) -> PolicyError {
    match one(text) {
        ManifestOutcome::Accepted(p) => panic!("accepted: {p:?}"),
        ManifestOutcome::Rejected(e) => e,
    }
}

/// A CNP in namespace `default` with one ingress item (given as YAML flow text).
fn cnp_ingress(item: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p}}\n\
         spec:\n  endpointSelector: {{matchLabels: {{app: backend}}}}\n  ingress:\n  - {item}\n"
    )
}

#[test]
fn seed_policy_parses_into_the_model() {
    let p = accepted(SEED);
    assert_eq!(p.kind, PolicyKind::CiliumNetworkPolicy);
    assert_eq!(p.namespace.as_deref(), Some("default"), "absent namespace is default");
    assert_eq!(p.name, "allow-frontend-to-backend");
    assert_eq!(p.source, "test.yaml");
    assert!(p.warnings.is_empty());
    let rule = &p.rules[0];
    assert_eq!(rule.path, "spec");
    assert_eq!(rule.subject.to_string(), "any:app=backend, k8s:io.kubernetes.pod.namespace=default");
    assert!(rule.enforce_ingress);
    assert!(!rule.enforce_egress);
    let pr = &rule.ingress[0];
    assert_eq!(pr.path, "spec.ingress[0]");
    assert_eq!(pr.verdict, Verdict::Allow);
    let Peers::Only(peers) = &pr.peers else { panic!("{:?}", pr.peers) };
    let Peer::Endpoints(sel) = &peers[0] else { panic!("{peers:?}") };
    assert_eq!(sel.to_string(), "any:app=frontend, k8s:io.kubernetes.pod.namespace=default");
    assert_eq!(pr.ports, vec![PortRule { protocol: Protocol::Tcp, port: Port::Range { first: 8080, last: 8080 } }]);
}

#[test]
fn a_bad_document_does_not_hide_the_good_ones() {
    let text = format!("{SEED}\n---\n{}\n---\n", cnp_ingress("{toPorts: [{ports: [{port: \"99999\"}]}]}"));
    let all = parse_manifests(&text, "two.yaml").unwrap();
    assert_eq!(all.len(), 2, "the empty trailing document is skipped");
    assert!(matches!(&all[0], ManifestOutcome::Accepted(p) if p.name == "allow-frontend-to-backend"));
    let ManifestOutcome::Rejected(e) = &all[1] else { panic!() };
    assert_eq!(e.document, 2);
    assert_eq!(e.name.as_deref(), Some("p"));
    assert_eq!(e.namespace.as_deref(), Some("default"));
    assert_eq!(e.kind.as_deref(), Some("CiliumNetworkPolicy"));
    assert_eq!(e.path, "spec.ingress[0].toPorts[0].ports[0].port");
    assert_eq!(e.reason, "port 99999 is out of range");
    assert_eq!(
        e.to_string(),
        "CiliumNetworkPolicy default/p (two.yaml, document 2): spec.ingress[0].toPorts[0].ports[0].port: \
         port 99999 is out of range (hint: ports are 1 to 65535; 0 or no port means every port)"
    );
}

#[test]
fn unknown_fields_are_errors_with_their_path() {
    let e = rejected(&cnp_ingress("{fromEndpoint: [{}]}"));
    assert_eq!(e.path, "spec.ingress[0].fromEndpoint");
    assert!(e.reason.starts_with("unknown field `fromEndpoint`"), "{}", e.reason);
    assert!(e.hint.contains("silently drop"), "{}", e.hint);

    let e = rejected(&cnp_ingress("{toPorts: [{ports: [{port: \"80\", protocl: TCP}]}]}"));
    assert_eq!(e.path, "spec.ingress[0].toPorts[0].ports[0].protocl");

    let e = rejected(&cnp_ingress("{fromEndpoints: [{matchLabel: {app: a}}]}"));
    assert_eq!(e.path, "spec.ingress[0].fromEndpoints[0].matchLabel");
}

#[test]
fn wrong_types_are_errors_with_their_path() {
    let e = rejected(&cnp_ingress("{fromEndpoints: {matchLabels: {app: a}}}"));
    assert_eq!(e.path, "spec.ingress[0].fromEndpoints");
    assert!(e.reason.contains("expected a sequence"), "{}", e.reason);
}

#[test]
fn ports_numeric_named_and_bad() {
    let port = |p: &str| -> Result<Port, Box<PolicyError>> {
        match one(&cnp_ingress(&format!("{{toPorts: [{{ports: [{{port: {p}, protocol: TCP}}]}}]}}"))) {
            ManifestOutcome::Accepted(pol) => Ok(pol.rules[0].ingress[0].ports[0].port.clone()),
            ManifestOutcome::Rejected(e) => Err(Box::new(e)),
        }
    };
    assert_eq!(port("\"8080\"").unwrap(), Port::Range { first: 8080, last: 8080 });
    assert_eq!(port("8080").unwrap(), Port::Range { first: 8080, last: 8080 }, "bare number");
    assert_eq!(port("\"65535\"").unwrap(), Port::Range { first: 65535, last: 65535 });
    assert_eq!(port("\"0\"").unwrap(), Port::Any, "Cilium: 0 means every port");
    assert_eq!(port("\"http\"").unwrap(), Port::Named("http".into()));
    assert_eq!(port("\"http-alt\"").unwrap(), Port::Named("http-alt".into()));
    for bad in ["\"65536\"", "\"99999999999999999999\"", "-1", "\"80_a\"", "\"HTTP\"", "\"\"", "\"-web\""] {
        let e = port(bad).expect_err(bad);
        assert_eq!(e.path, "spec.ingress[0].toPorts[0].ports[0].port", "{bad}");
    }
    assert_eq!(
        port("\"80_a\"").unwrap_err().reason,
        "port \"80_a\" is neither a number from 1 to 65535 nor a port name"
    );
    assert_eq!(port("70000").unwrap_err().reason, "port 70000 is out of range");
}

#[test]
fn end_port_makes_a_range() {
    let p = accepted(&cnp_ingress("{toPorts: [{ports: [{port: \"8000\", endPort: 8100, protocol: UDP}]}]}"));
    assert_eq!(p.rules[0].ingress[0].ports[0].port, Port::Range { first: 8000, last: 8100 });
    let e = rejected(&cnp_ingress("{toPorts: [{ports: [{port: \"8000\", endPort: 7000}]}]}"));
    assert_eq!(e.path, "spec.ingress[0].toPorts[0].ports[0].endPort");
    let e = rejected(&cnp_ingress("{toPorts: [{ports: [{port: \"http\", endPort: 7000}]}]}"));
    assert_eq!(e.path, "spec.ingress[0].toPorts[0].ports[0].endPort");
}

#[test]
fn protocols() {
    let proto = |p: &str| match one(&cnp_ingress(&format!("{{toPorts: [{{ports: [{{port: \"53\"{p}}}]}}]}}"))) {
        ManifestOutcome::Accepted(pol) => Ok(pol.rules[0].ingress[0].ports[0].protocol),
        ManifestOutcome::Rejected(e) => Err(Box::new(e)),
    };
    assert_eq!(proto("").unwrap(), Protocol::Any, "default is ANY");
    assert_eq!(proto(", protocol: ANY").unwrap(), Protocol::Any);
    assert_eq!(proto(", protocol: UDP").unwrap(), Protocol::Udp);
    assert_eq!(proto(", protocol: SCTP").unwrap(), Protocol::Sctp);
    let e = proto(", protocol: tcp").unwrap_err();
    assert_eq!(e.path, "spec.ingress[0].toPorts[0].ports[0].protocol");
    assert!(e.hint.contains("upper case"));
}

#[test]
fn peers_any_none_and_scoping() {
    let peers = |item: &str| accepted(&cnp_ingress(item)).rules[0].ingress[0].peers.clone();
    assert_eq!(peers("{}"), Peers::Only(vec![]), "an empty item matches no peer");
    assert_eq!(peers("{toPorts: [{ports: [{port: \"80\"}]}]}"), Peers::Any, "L4 only: any peer");
    let sel = |item: &str| match peers(item) {
        Peers::Only(v) => v
            .iter()
            .map(|p| match p {
                Peer::Endpoints(s) => s.to_string(),
                other => panic!("{other:?}"),
            })
            .collect::<Vec<_>>(),
        Peers::Any => panic!(),
    };
    assert_eq!(sel("{fromEndpoints: [{}]}"), ["k8s:io.kubernetes.pod.namespace=default"]);
    assert_eq!(
        sel("{fromEndpoints: [{matchLabels: {io.kubernetes.pod.namespace: prod, app: a}}]}"),
        ["any:app=a, any:io.kubernetes.pod.namespace=prod"],
        "a selector naming the namespace is not scoped"
    );
    assert_eq!(
        sel("{fromEndpoints: [{matchExpressions: [{key: k8s:io.kubernetes.pod.namespace, operator: Exists}]}]}"),
        ["k8s:io.kubernetes.pod.namespace"],
        "any namespace"
    );
    assert_eq!(sel("{fromEndpoints: [{matchLabels: {reserved:host: \"\"}}]}"), ["reserved:host="]);
}

#[test]
fn clusterwide_policies_are_not_scoped() {
    let p = accepted(
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: cw}\n\
         spec:\n  endpointSelector: {}\n  egress:\n  - toEndpoints: [{matchLabels: {app: dns}}]\n",
    );
    assert_eq!(p.namespace, None);
    assert_eq!(p.warnings, Vec::<String>::new());
    assert_eq!(p.rules[0].subject.to_string(), "{}");
    assert!(p.rules[0].enforce_egress && !p.rules[0].enforce_ingress);
    let Peers::Only(v) = &p.rules[0].egress[0].peers else { panic!() };
    assert_eq!(v, &[Peer::Endpoints(crate::selector::EndpointSelector::all().match_label("app", "dns"))]);
}

#[test]
fn a_namespace_on_a_clusterwide_policy_is_ignored_with_a_warning() {
    // The API server drops it from a cluster-scoped object, so Cilium applies the policy in
    // every namespace: the same here, with a warning that says so.
    let p = accepted(
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: cw, namespace: x}\n\
         spec:\n  endpointSelector: {}\n",
    );
    assert_eq!(p.namespace, None);
    assert!(p.warnings.iter().any(|w| w.contains("not namespaced")), "{:?}", p.warnings);
}

#[test]
fn the_subject_always_lives_in_the_policy_namespace() {
    let p = accepted(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: prod}\n\
         spec:\n  endpointSelector: {matchLabels: {k8s:io.kubernetes.pod.namespace: other}}\n  ingress: [{}]\n",
    );
    assert_eq!(p.rules[0].subject.to_string(), "k8s:io.kubernetes.pod.namespace=prod");
    assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
    assert!(p.warnings[0].starts_with("spec.endpointSelector: the namespace match was replaced"));
}

#[test]
fn specs_list_and_default_deny_switches() {
    let p = accepted(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspecs:\n\
         - endpointSelector: {}\n  ingress: [{}]\n  enableDefaultDeny: {ingress: false}\n\
         - endpointSelector: {}\n  egressDeny: [{toEndpoints: [{}]}]\n",
    );
    assert_eq!(p.rules.len(), 2);
    assert_eq!(p.rules[1].path, "specs[1]");
    assert!(!p.rules[0].enforce_ingress, "enableDefaultDeny.ingress: false");
    assert!(p.rules[1].enforce_egress, "deny-only rules enforce too");
    assert_eq!(p.rules[1].egress[0].verdict, Verdict::Deny);
    assert_eq!(p.rules[1].egress[0].path, "specs[1].egressDeny[0]");
}

#[test]
fn l7_rules_are_accepted_with_a_warning_but_not_in_deny_rules() {
    let p =
        accepted(&cnp_ingress("{toPorts: [{ports: [{port: \"80\", protocol: TCP}], rules: {http: [{method: GET}]}}]}"));
    assert_eq!(p.warnings.len(), 1);
    assert!(p.warnings[0].starts_with("spec.ingress[0].toPorts[0].rules: L7 rules are not enforced"));
    let e = rejected(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  \
         ingressDeny: [{toPorts: [{ports: [{port: \"80\"}], rules: {http: [{}]}}]}]\n",
    );
    assert_eq!(e.path, "spec.ingressDeny[0].toPorts[0].rules");
}

#[test]
fn unsupported_parts_are_named() {
    let e = rejected(&cnp_ingress("{fromNodes: [{matchLabels: {a: b}}]}"));
    assert_eq!(e.path, "spec.ingress[0].fromNodes");
    assert_eq!(e.reason, "fromNodes is not supported: it selects nodes by their labels");
    let e = rejected(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  nodeSelector: {}\n",
    );
    assert_eq!(e.path, "spec.nodeSelector");
    assert!(e.reason.starts_with("host policies (nodeSelector) are not supported"), "{}", e.reason);
}

#[test]
fn selector_errors() {
    let e = rejected(&cnp_ingress("{fromEndpoints: [{matchExpressions: [{key: app, operator: in, values: [a]}]}]}"));
    assert_eq!(e.path, "spec.ingress[0].fromEndpoints[0].matchExpressions[0].operator");
    let e = rejected(&cnp_ingress("{fromEndpoints: [{matchExpressions: [{key: app, operator: In}]}]}"));
    assert_eq!(e.path, "spec.ingress[0].fromEndpoints[0].matchExpressions[0].values");
    let e =
        rejected(&cnp_ingress("{fromEndpoints: [{matchExpressions: [{key: app, operator: Exists, values: [a]}]}]}"));
    assert_eq!(e.path, "spec.ingress[0].fromEndpoints[0].matchExpressions[0].values");
}

#[test]
fn document_level_errors() {
    let e =
        rejected("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  ingress: [{}]\n");
    assert_eq!(e.path, "spec.endpointSelector");
    let e = rejected("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\n");
    assert_eq!(e.path, "spec");
    let e = rejected("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nspec: {endpointSelector: {}}\n");
    assert_eq!(e.path, "metadata.name");
    let e = rejected("apiVersion: cilium.io/v1\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\n");
    assert_eq!(e.path, "apiVersion");
    let e = rejected("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n");
    assert_eq!((e.path.as_str(), e.kind.as_deref()), ("kind", Some("ConfigMap")));
    let e = rejected("just: a map\n");
    assert_eq!(e.path, "kind");
}

#[test]
fn unreadable_yaml_fails_the_whole_text_with_a_position() {
    let err = parse_manifests(&format!("{SEED}---\nkind: [unclosed\n"), "bad.yaml").unwrap_err();
    let ParseError::Yaml { origin, line, .. } = &err else { panic!("{err:?}") };
    assert_eq!(origin, "bad.yaml");
    assert!(*line > 1, "{err}");
    assert!(err.to_string().starts_with("bad.yaml: not readable YAML at line"), "{err}");
}

#[test]
fn empty_text_has_no_documents() {
    assert_eq!(parse_manifests("", "e.yaml").unwrap(), vec![]);
    assert_eq!(parse_manifests("---\n---\n", "e.yaml").unwrap(), vec![]);
}

#[test]
fn the_audit_annotation_puts_any_kind_into_audit_mode() {
    let with = |value: &str| {
        SEED.replace("metadata:\n", &format!("metadata:\n  annotations: {{palisade.io/audit: {value}}}\n"))
    };
    assert!(!accepted(SEED).audit);
    assert!(accepted(&with("\"true\"")).audit);
    assert!(!accepted(&with("\"false\"")).audit);
    let np = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: n, annotations: {palisade.io/audit: \"true\"}}\nspec: {podSelector: {}}\n";
    assert!(accepted(np).audit);
    let cnp = "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: c, annotations: {palisade.io/audit: \"true\"}}\n\
               spec: {tier: Admin, priority: 10, subject: {namespaces: {}}, ingress: [{action: Deny, from: [{namespaces: {}}]}]}\n";
    assert!(accepted(cnp).audit);
    // Anything but "true" or "false" is a mistake, not "enforce".
    for bad in ["yes", "true", "\"TRUE\""] {
        let e = rejected(&with(bad));
        assert_eq!(e.path, "metadata.annotations[\"palisade.io/audit\"]", "{bad}");
        assert!(e.reason.contains("must be \"true\" or \"false\""), "{e}");
    }
}
