//! Entities, CIDR peers, ipBlocks, requirements and ICMP through the resolver.

use super::*;
use crate::cidr::Prefix;
use crate::identity::LOCAL_SCOPE;

fn policies(yaml: &str) -> Vec<Policy> {
    accepted_policies(yaml, "t.yaml")
}

fn knp(ns: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: np, namespace: {ns}}}\nspec:\n{spec}"
    )
}

const C1: u32 = LOCAL_SCOPE | 1;
const C2: u32 = LOCAL_SCOPE | 2;
const C3: u32 = LOCAL_SCOPE | 3;

#[test]
fn entities_select_their_identities() {
    let mut w = World::new();
    let a = w.pod(1, "default", &[("app", "a")], &[]);
    let show = |entities: &str, w: &World| {
        let s = w.resolve(&cnp(
            "default",
            &format!(
                "  endpointSelector: {{}}\n  egress: [{{toEntities: [{entities}]}}]\n  egressDeny: [{{toCIDR: [10.0.0.0/8]}}]\n"
            ),
        ));
        s.endpoints[&1].entries.iter().filter(|(_, v)| !v.deny).map(|(k, _)| k.identity).collect::<Vec<_>>()
    };
    // The deny on 10.0.0.0/8 only makes a CIDR identity (C1) exist.
    assert_eq!(show("all", &w), [0]);
    assert_eq!(show("none", &w), Vec::<u32>::new());
    assert_eq!(show("host", &w), [1]);
    assert_eq!(show("kube-apiserver", &w), [7]);
    assert_eq!(show("remote-node, health, init, unmanaged, ingress", &w), [3, 4, 5, 6, 8]);
    assert_eq!(show("world-ipv6", &w), [10]);
    let s = w.resolve(&cnp(
        "default",
        "  endpointSelector: {}\n  egress: [{toEntities: [world]}, {toEntities: [world-ipv4]}]\n  egressDeny: [{toCIDR: [10.0.0.0/8], toPorts: [{ports: [{port: \"1\"}]}]}]\n",
    ));
    let allowed: Vec<String> = shown(&s, 1).into_iter().filter(|e| e.ends_with("allow")).collect();
    assert_eq!(
        allowed,
        [
            "egress to 2 * => allow".to_owned(),
            "egress to 9 * => allow".to_owned(),
            "egress to 10 * => allow".to_owned(),
            format!("egress to {C1} * => allow"),
        ],
        "world and world-ipv4 include the CIDR identities (world-ipv4: the IPv4 ones)"
    );
    assert_eq!(show("cluster", &w), [1, 3, 4, 5, 6, 7, 8, a], "every pod and the in-cluster reserved identities");
}

#[test]
fn cidr_with_except_and_the_ipcache() {
    let mut w = World::new();
    w.pod(1, "default", &[("app", "a")], &[]);
    let s = w.resolve(&cnp(
        "default",
        "  endpointSelector: {}\n  egress: [{toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.96.0.0/12]}, {cidr: 0.0.0.0/0, except: [10.0.0.0/8, 192.168.0.0/16]}]}]\n",
    ));
    // Prefix order: 10.0.0.0/8, 10.96.0.0/12, 192.168.0.0/16.
    let ipcache: Vec<String> = s.cidr_ipcache.iter().map(|((a, l), id)| format!("{a}/{l}={id}")).collect();
    assert_eq!(ipcache, [format!("10.0.0.0/8={C1}"), format!("10.96.0.0/12={C2}"), format!("192.168.0.0/16={C3}")]);
    assert_eq!(s.cidr_identities[&C2].to_string(), "cidr:10.96.0.0/12,reserved:world,reserved:world-ipv4");
    assert_eq!(
        shown(&s, 1),
        [
            "egress to 2 * => allow".to_owned(),
            "egress to 9 * => allow".to_owned(),
            format!("egress to {C1} * => allow")
        ],
        "0.0.0.0/0 is the world; 10.96/12 and 192.168/16 are holes (their own identities) in both blocks"
    );
}

#[test]
fn deny_with_except_reopens_only_what_an_allow_permits() {
    let mut w = World::new();
    w.pod(1, "default", &[("app", "a")], &[]);
    let s = w.resolve(&cnp(
        "default",
        "  endpointSelector: {}\n  egress: [{toEntities: [world]}]\n  egressDeny: [{toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}]}]\n",
    ));
    assert_eq!(
        shown(&s, 1),
        [
            "egress to 2 * => allow".to_owned(),
            "egress to 9 * => allow".to_owned(),
            "egress to 10 * => allow".to_owned(),
            format!("egress to {C1} * => deny"),
            format!("egress to {C2} * => allow"),
        ]
    );
    let s = w.resolve(&cnp(
        "default",
        "  endpointSelector: {}\n  egress: [{toEndpoints: [{}]}]\n  egressDeny: [{toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}]}]\n",
    ));
    assert!(
        !shown(&s, 1).iter().any(|e| e.contains(&C2.to_string())),
        "nothing allows 10.1.0.0/16, so the hole does not open it: {:?}",
        shown(&s, 1)
    );
}

#[test]
fn ip_blocks_match_outside_addresses_and_pod_addresses_inside() {
    let yaml = knp(
        "default",
        "  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.1.0/24]}}]}]\n",
    );
    let pols = policies(&yaml);
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let mut w = World::new();
    let mut addresses = BTreeMap::new();
    let db = w.pod(1, "default", &[("app", "db")], &[]);
    addresses.insert(ip("10.5.0.1"), db);
    // Two web pods with the same labels (one identity): one inside the block, one in the
    // hole.
    let web = w.pod(2, "default", &[("app", "web")], &[]);
    assert_eq!(w.pod(3, "default", &[("app", "web")], &[]), web);
    addresses.insert(ip("10.0.0.7"), web);
    addresses.insert(ip("10.0.1.7"), web);
    let cidrs = CidrIdentities::for_policies(&pols);
    let s = resolve_full(&pols, &w.endpoints, &w.identities, &cidrs, &addresses);
    let inside = ADDRESS_IDENTITY_BASE;
    assert_eq!(
        s.address_ipcache,
        BTreeMap::from([((ip("10.0.0.7"), 32), inside)]),
        "only the address inside the block has an address identity"
    );
    let labels = &s.address_identities[&inside];
    assert_eq!(labels.get("10.0.0.0/16 except 10.0.1.0/24").map(|l| l.source.as_str()), Some("ipblock"));
    assert_eq!(labels.get("app").map(|l| l.value.as_str()), Some("web"), "and the pod's labels");
    assert_eq!(
        shown(&s, 1),
        [format!("ingress from {C1} * => allow"), format!("ingress from {inside} * => allow")],
        "the pod address inside and the outside addresses of 10.0.0.0/16 (not the hole, not pod identity {web})"
    );
    // Other selectors ignore the ipblock source: app=web selects the pod identity and the
    // address identity (the address inside the block has that one).
    let other = policies(&cnp(
        "default",
        "  endpointSelector: {matchLabels: {app: db}}\n  ingress: [{fromEndpoints: [{matchLabels: {app: web}}]}]\n",
    ));
    let both: Vec<Policy> = pols.iter().chain(other.iter()).cloned().collect();
    let s = resolve_full(&both, &w.endpoints, &w.identities, &CidrIdentities::for_policies(&both), &addresses);
    assert_eq!(
        shown(&s, 1),
        [
            format!("ingress from {web} * => allow"),
            format!("ingress from {C1} * => allow"),
            format!("ingress from {inside} * => allow")
        ]
    );
    // A Cilium CIDR selector never selects pods.
    let cidr = policies(&cnp(
        "default",
        "  endpointSelector: {matchLabels: {app: db}}\n  ingress: [{fromCIDR: [10.0.0.0/16]}]\n",
    ));
    let s = resolve_full(&cidr, &w.endpoints, &w.identities, &CidrIdentities::for_policies(&cidr), &addresses);
    assert_eq!(shown(&s, 1), [format!("ingress from {C1} * => allow")]);
    assert!(s.address_ipcache.is_empty(), "no ipBlock, no address identities");
}

#[test]
fn ip_block_of_one_family_never_admits_the_other_address_of_a_dual_stack_pod() {
    let yaml = knp(
        "default",
        "  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{ipBlock: {cidr: fd00::30/128}}]}]\n",
    );
    let pols = policies(&yaml);
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let mut w = World::new();
    let db = w.pod(1, "default", &[("app", "db")], &[]);
    let client = w.pod(2, "default", &[("app", "client")], &[]);
    let addresses = BTreeMap::from([
        (ip("10.0.0.1"), db),
        (ip("fd00::1"), db),
        (ip("10.0.0.30"), client),
        (ip("fd00::30"), client),
    ]);
    let s = resolve_full(&pols, &w.endpoints, &w.identities, &CidrIdentities::for_policies(&pols), &addresses);
    let v6 = ADDRESS_IDENTITY_BASE;
    assert_eq!(s.address_ipcache, BTreeMap::from([((ip("fd00::30"), 128), v6)]));
    assert_eq!(
        shown(&s, 1),
        [format!("ingress from {C1} * => allow"), format!("ingress from {v6} * => allow")],
        "the CIDR identity of fd00::30/128 and the client's IPv6 address identity, not its identity {client}"
    );
}

#[test]
fn knp_rules_allow_all_or_nothing() {
    let mut w = World::new();
    w.pod(1, "default", &[("app", "db")], &[]);
    let s = w.resolve(&knp("default", "  podSelector: {}\n  ingress: [{}]\n"));
    assert_eq!(shown(&s, 1), ["ingress from any * => allow"], "ingress: [{{}}] allows everyone, the world too");
    let s = w.resolve(&knp("default", "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n"));
    assert!(s.endpoints[&1].ingress_enforced && s.endpoints[&1].egress_enforced);
    assert!(shown(&s, 1).is_empty(), "no rules: deny both ways");
}

#[test]
fn requires_and_into_endpoint_selectors_of_other_rules() {
    let mut w = World::new();
    w.pod(1, "default", &[("app", "db"), ("env", "prod")], &[]);
    let prod_fe = w.pod(2, "default", &[("app", "fe"), ("env", "prod")], &[]);
    w.pod(3, "default", &[("app", "fe"), ("env", "dev")], &[]);
    let requires = cnp(
        "default",
        "  endpointSelector: {matchLabels: {env: prod}}\n  ingress: [{fromRequires: [{matchLabels: {env: prod}}]}]\n",
    )
    .replace("name: p,", "name: requires,");
    let allow = cnp(
        "default",
        "  endpointSelector: {matchLabels: {app: db}}\n  ingress: [{fromEndpoints: [{matchLabels: {app: fe}}]}, {fromEntities: [host]}]\n  ingressDeny: [{fromEndpoints: [{matchLabels: {env: dev}}], toPorts: [{ports: [{port: \"22\"}]}]}]\n",
    );
    let s = w.resolve(&format!("{requires}---\n{allow}"));
    assert_eq!(
        shown(&s, 1),
        [
            "ingress from 1 * => allow".to_owned(),
            format!("ingress from {prod_fe} * => allow"),
            "ingress from 258 TCP/22 => deny".to_owned(),
            "ingress from 258 UDP/22 => deny".to_owned(),
            "ingress from 258 SCTP/22 => deny".to_owned(),
        ],
        "fe in dev is not allowed; entities are not narrowed; requirements of allow rules do not narrow denies"
    );
    let s = w.resolve(&allow);
    assert!(shown(&s, 1).contains(&"ingress from 258 * => allow".to_owned()), "without the requirement");
}

#[test]
fn icmp_types_are_entries_with_the_type_as_port() {
    let mut w = World::new();
    w.pod(1, "default", &[], &[]);
    let s = w.resolve(&cnp(
        "default",
        "  endpointSelector: {}\n  ingress: [{icmps: [{fields: [{type: EchoRequest}, {type: EchoRequest, family: IPv6}]}]}]\n",
    ));
    assert_eq!(shown(&s, 1), ["ingress from any ICMP/8 => allow", "ingress from any ICMPv6/128 => allow"]);
    let key = s.endpoints[&1].entries.keys().next().unwrap();
    assert_eq!((key.protocol, key.port, key.port_prefix_len), (1, 8, 16));
}

#[test]
fn resolve_with_cidrs_keeps_the_numbers_it_is_given() {
    let mut w = World::new();
    w.pod(1, "default", &[], &[]);
    let pols = policies(&cnp("default", "  endpointSelector: {}\n  egress: [{toCIDR: [192.168.0.0/16]}]\n"));
    let mut cidrs = CidrIdentities::new();
    cidrs.sync_prefixes([Prefix::parse("1.0.0.0/8").unwrap().0].into());
    cidrs.sync(&pols);
    let s = resolve_with_cidrs(&pols, &w.endpoints, &w.identities, &cidrs);
    assert_eq!(shown(&s, 1), [format!("egress to {C2} * => allow")], "number 1 was freed in the same sync");
}
