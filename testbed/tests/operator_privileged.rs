//! The operator surface of the real agent on a real scenario: `/metrics` scraped from the
//! node's namespace while probes are dropped and allowed (the counters must move with
//! them), `/healthz` and `/readyz`, the built-in allow-localhost entry named in the
//! verdict events, `palisade ipcache list` and `palisade bpf policy get`
//! (decoded from the kernel maps, with the rules each entry comes from; an entry removed
//! behind the agent's back disappears from the output, so it is read from the kernel and
//! not from the desired state). Needs root and the binaries built (`cargo build --bins`).
mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use palisade_api::Client;
use palisade_api::types::{BpfPolicy, EndpointStatus, IpcacheEntry};
use palisade_testbed::netns;
use palisade_testbed::report::Observed;
use palisade_testbed::session::Session;

const SCENARIO: &str = include_str!("scenarios/operator-surface.yaml");

fn bin(name: &str) -> PathBuf {
    Path::new(BIN).with_file_name(name)
}

/// `GET path` on the agent's metrics listener (127.0.0.1:9962 in the node's namespace):
/// status code and body.
fn http_get(session: &Session, path: &str) -> (u16, String) {
    let path = path.to_string();
    session
        .topology()
        .node
        .netns
        .run(move || {
            let mut s = std::net::TcpStream::connect("127.0.0.1:9962").expect("the metrics listener accepts");
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            write!(s, "GET {path} HTTP/1.0\r\nHost: palisade\r\n\r\n").unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
            let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("a status code");
            (code, body.to_string())
        })
        .unwrap()
}

/// The samples of an exposition: `name{labels}` -> value.
fn scrape(session: &Session) -> BTreeMap<String, f64> {
    let (code, body) = http_get(session, "/metrics");
    assert_eq!(code, 200, "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap_or_else(|| panic!("sample line {l:?}"));
            (k.to_string(), v.parse::<f64>().unwrap_or_else(|_| panic!("value of {l:?}")))
        })
        .collect()
}

fn get(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    *m.get(key).unwrap_or_else(|| panic!("{key} missing from the exposition: {:#?}", m.keys().collect::<Vec<_>>()))
}

fn palisade(socket: &Path, args: &[&str]) -> String {
    let out = Command::new(bin("palisade")).arg("--socket").arg(socket).args(args).output().unwrap();
    assert!(out.status.success(), "palisade {args:?}: {}", text(&out.stderr));
    text(&out.stdout)
}

const DROP_DENIED: &str = r#"palisade_drop_count_total{reason="policy-denied",direction="ingress"}"#;
const DROP_DENY_RULE: &str = r#"palisade_drop_count_total{reason="deny-rule",direction="ingress"}"#;
const FORWARD_INGRESS: &str = r#"palisade_forward_count_total{direction="ingress"}"#;
const ALLOWED_BY_POLICY: &str =
    r#"palisade_verdict_count_total{verdict="allow",reason="allowed-by-policy",direction="ingress"}"#;

#[test]
#[allow(clippy::float_cmp, reason = "metric values are counts, exact in an f64")]
fn metrics_health_ipcache_and_bpf_policy_privileged() {
    palisade_privileged::require_root!();
    assert!(bin("palisade").is_file(), "build the binaries first (`cargo build --bins`)");
    // No drift repair during the test: the entry removed below must stay removed.
    let (plan, names, opts) = agent_run(SCENARIO, "op", &["--repair-interval-secs", "3600"]);
    let rt = runtime();
    rt.block_on(async {
        let session = Session::up(&plan, &opts, &names).await.expect("the scenario comes up");
        let socket = session.dirs().socket.clone();

        // Health and readiness: the policies are realized (Session::up waited for it).
        let (code, body) = http_get(&session, "/healthz");
        assert_eq!(code, 200, "{body}");
        for actor in ["resolver", "map-writer", "policy-watch", "endpoints", "identities"] {
            assert!(body.contains(&format!("{actor}: ok")), "{body}");
        }
        let (code, body) = http_get(&session, "/readyz");
        assert_eq!(code, 200, "{body}");
        assert!(body.starts_with("ready\n"), "{body}");

        // Gauges.
        let m0 = scrape(&session);
        let status = session.status().await.unwrap();
        assert_eq!(get(&m0, "palisade_policy"), 2.0);
        assert_eq!(get(&m0, "palisade_policy_rejected"), 0.0);
        assert_eq!(get(&m0, "palisade_endpoint"), 4.0);
        assert_eq!(get(&m0, r#"palisade_endpoint_enforced{direction="ingress"}"#), 1.0);
        assert_eq!(get(&m0, r#"palisade_endpoint_enforced{direction="egress"}"#), 1.0);
        assert_eq!(get(&m0, "palisade_policy_max_revision"), status.revision as f64);
        assert_eq!(get(&m0, "palisade_policy_realized_revision"), status.realized_revision as f64);
        assert_eq!(get(&m0, r#"palisade_identity{type="cluster_local"}"#), 4.0);
        assert_eq!(get(&m0, r#"palisade_identity{type="reserved"}"#), 10.0);
        assert_eq!(get(&m0, "palisade_ready"), 1.0);
        // Every accepted change up to the realized revision observed its delay.
        assert!(get(&m0, "palisade_policy_implementation_delay_count") >= 1.0);
        assert_eq!(
            get(&m0, r#"palisade_policy_implementation_delay_bucket{le="+Inf"}"#),
            get(&m0, "palisade_policy_implementation_delay_count")
        );
        // server and egress-user got policy entries: at least two regenerations.
        assert!(get(&m0, r#"palisade_endpoint_regenerations_total{outcome="success"}"#) >= 2.0);
        assert_eq!(get(&m0, r#"palisade_endpoint_regenerations_total{outcome="failure"}"#), 0.0);
        assert!(get(&m0, "palisade_endpoint_regeneration_time_stats_seconds_count") >= 2.0);
        // Map fill: 4 endpoints, 4 pods + node + 2 entities as host entries, one CIDR.
        assert_eq!(get(&m0, r#"palisade_bpf_map_entries{map_name="ENDPOINTS"}"#), 4.0);
        assert_eq!(get(&m0, r#"palisade_bpf_map_entries{map_name="IPCACHE_V4"}"#), 1.0);
        let policy_entries = get(&m0, r#"palisade_bpf_map_entries{map_name="POLICY"}"#);
        assert!(policy_entries >= 4.0, "{policy_entries}");
        let pressure = get(&m0, r#"palisade_bpf_map_pressure{map_name="POLICY"}"#);
        assert!(pressure > 0.0 && pressure < 0.01, "{pressure}");

        // An allowed probe moves the forward counters, not the drops.
        let r = session.probe(&plan.probes[0]).await;
        assert_eq!(r.observed, Observed::Allow, "{r:?}");
        let m1 = scrape(&session);
        assert!(get(&m1, FORWARD_INGRESS) > get(&m0, FORWARD_INGRESS));
        assert!(get(&m1, ALLOWED_BY_POLICY) > get(&m0, ALLOWED_BY_POLICY));
        assert_eq!(get(&m1, DROP_DENIED), get(&m0, DROP_DENIED));
        assert_eq!(get(&m1, DROP_DENY_RULE), get(&m0, DROP_DENY_RULE));
        // A deny rule's drop.
        let r = session.probe(&plan.probes[1]).await;
        assert_eq!(r.observed, Observed::Deny, "{r:?}");
        let m2 = scrape(&session);
        assert!(get(&m2, DROP_DENY_RULE) > get(&m1, DROP_DENY_RULE));
        assert_eq!(get(&m2, DROP_DENIED), get(&m1, DROP_DENIED));
        assert!(
            get(&m2, r#"palisade_drop_bytes_total{reason="deny-rule",direction="ingress"}"#)
                > get(&m1, r#"palisade_drop_bytes_total{reason="deny-rule",direction="ingress"}"#)
        );
        // A default deny's drop.
        let r = session.probe(&plan.probes[2]).await;
        assert_eq!(r.observed, Observed::Deny, "{r:?}");
        let m3 = scrape(&session);
        assert!(get(&m3, DROP_DENIED) > get(&m2, DROP_DENIED));
        assert_eq!(get(&m3, DROP_DENY_RULE), get(&m2, DROP_DENY_RULE));

        // The node's probe passes by the built-in allow-localhost entry, and the verdict
        // event (which the probe reads) names it.
        let mut monitor = Client::new(&socket).monitor().await.unwrap();
        let r = session.probe(&plan.probes[3]).await;
        assert_eq!(r.observed, Observed::Allow, "{r:?}");
        let event = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(e) = monitor.next().await.unwrap() {
                if e.src == "10.200.0.1" && e.dst_port == 81 && e.verdict == "allow" {
                    return e;
                }
            }
            panic!("the monitor stream ended");
        })
        .await
        .expect("the allow event of the node's probe");
        assert_eq!(event.policies, vec!["built-in allow-localhost"], "{event:?}");
        assert_eq!((event.match_kind.as_str(), event.peer_identity), ("L3-only", 1), "{event:?}");
        drop(monitor);

        // ipcache list: every pod, the node and the CIDR, with labels.
        let ipcache: Vec<IpcacheEntry> =
            serde_json::from_str(&palisade(&socket, &["ipcache", "list", "-o", "json"])).unwrap();
        let eps: BTreeMap<String, EndpointStatus> = Client::new(&socket)
            .endpoints()
            .await
            .unwrap()
            .into_iter()
            .map(|e| (format!("{}/{}", e.namespace, e.name), e))
            .collect();
        for ep in eps.values() {
            let prefix = format!("{}/32", ep.ipv4.unwrap());
            let e = ipcache.iter().find(|e| e.prefix == prefix).unwrap_or_else(|| panic!("{prefix}: {ipcache:?}"));
            assert_eq!(e.identity, ep.identity, "{e:?}");
            assert_eq!(e.endpoint.as_deref(), Some(format!("{}/{}", ep.namespace, ep.name).as_str()));
            assert_eq!(e.labels, ep.security_labels, "{e:?}");
        }
        let node = ipcache.iter().find(|e| e.prefix == "10.200.0.1/32").expect("the node's address");
        assert_eq!((node.identity, node.labels.clone()), (1, vec!["reserved:host".to_string()]));
        let cidr = ipcache.iter().find(|e| e.prefix == "192.0.2.0/24").expect("the policy's CIDR");
        assert!(cidr.identity & (1 << 24) != 0, "{cidr:?}");
        assert!(cidr.labels.contains(&"cidr:192.0.2.0/24".to_string()), "{cidr:?}");
        let table = palisade(&socket, &["ipcache", "list"]);
        assert!(table.starts_with("PREFIX"), "{table}");
        assert!(table.lines().any(|l| l.starts_with("192.0.2.0/24") && l.contains("cidr:192.0.2.0/24")), "{table}");

        // bpf policy get: the server's entries, decoded and attributed.
        let server = &eps["default/server"];
        let client = &eps["default/client"];
        let p: BpfPolicy =
            serde_json::from_str(&palisade(&socket, &["bpf", "policy", "get", "default/server", "-o", "json"]))
                .unwrap();
        assert_eq!((p.endpoint_id, p.identity), (server.id, server.identity));
        assert!(p.ifindex != 0 && p.ingress_enforced && !p.egress_enforced, "{p:?}");
        let find = |proto: &str, port: &str, identity: u32| {
            p.entries
                .iter()
                .find(|e| e.direction == "ingress" && e.protocol == proto && e.port == port && e.identity == identity)
                .unwrap_or_else(|| panic!("ingress {identity} {proto}/{port} in {:#?}", p.entries))
                .clone()
        };
        let allow = find("TCP", "80", client.identity);
        assert_eq!(allow.action, "allow");
        assert_eq!(allow.rules, vec!["CiliumNetworkPolicy default/server-ingress spec.ingress[0]"]);
        assert_eq!(allow.policies, vec!["CiliumNetworkPolicy default/server-ingress"]);
        assert_eq!(allow.labels, client.security_labels);
        let deny = find("TCP", "81", client.identity);
        assert_eq!(deny.action, "deny");
        assert_eq!(deny.rules, vec!["CiliumNetworkPolicy default/server-ingress spec.ingressDeny[0]"]);
        let host = find("ANY", "any", 1);
        assert_eq!((host.action.as_str(), host.policies.clone()), ("allow", vec!["built-in allow-localhost".into()]));
        assert!(p.entries.iter().all(|e| e.probed), "{:#?}", p.entries);
        assert_eq!(p.entries.len(), 3, "{:#?}", p.entries);
        let table = palisade(&socket, &["bpf", "policy", "get", "default/server"]);
        assert!(table.contains("spec.ingressDeny[0]") && table.contains("built-in allow-localhost"), "{table}");
        // By id too; an endpoint without policy has no entries.
        let by_id = palisade(&socket, &["bpf", "policy", "get", &server.id.to_string(), "-o", "json"]);
        assert_eq!(serde_json::from_str::<BpfPolicy>(&by_id).unwrap(), p);
        let none: BpfPolicy =
            serde_json::from_str(&palisade(&socket, &["bpf", "policy", "get", "default/other", "-o", "json"])).unwrap();
        assert!(none.entries.is_empty() && !none.ingress_enforced, "{none:?}");
        let egress: BpfPolicy =
            serde_json::from_str(&palisade(&socket, &["bpf", "policy", "get", "default/egress-user", "-o", "json"]))
                .unwrap();
        let to_cidr = egress.entries.iter().find(|e| e.identity == cidr.identity).expect("the CIDR entry");
        assert_eq!((to_cidr.direction.as_str(), to_cidr.protocol.as_str()), ("egress", "ANY"));
        assert!(to_cidr.labels.contains(&"cidr:192.0.2.0/24".to_string()), "{to_cidr:?}");

        // Read from the kernel: remove the deny entry from the pinned map behind the
        // agent's back; `bpf policy get` no longer shows it.
        remove_deny_entries(&session.dirs().bpffs, server.id);
        let after: BpfPolicy =
            serde_json::from_str(&palisade(&socket, &["bpf", "policy", "get", "default/server", "-o", "json"]))
                .unwrap();
        assert_eq!(after.entries.len(), 2, "{:#?}", after.entries);
        assert!(after.entries.iter().all(|e| e.action == "allow"), "{:#?}", after.entries);

        session.down().await;
    });
    assert_eq!(netns::list_with_prefix(&names.prefix), Vec::<String>::new());
}

/// Deletes endpoint `id`'s deny entries from the pinned POLICY map.
fn remove_deny_entries(bpffs: &Path, id: u16) {
    use aya::maps::{HashMap, Map, MapData};
    use palisade_common::{PolicyKey, PolicyValue, map_names, policy_flags};
    let data = MapData::from_pin(bpffs.join(map_names::POLICY)).unwrap();
    let mut policy: HashMap<MapData, PolicyKey, PolicyValue> =
        HashMap::try_from(Map::from_map_data(data).unwrap()).unwrap();
    let keys: Vec<PolicyKey> = policy
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, v)| k.endpoint_id() == id && v.flags & policy_flags::DENY != 0)
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys.len(), 1, "one deny entry");
    for k in keys {
        policy.remove(&k).unwrap();
    }
}
