//! The real agent in Kubernetes mode, fed only through the list/watch protocol of the
//! testbed's API server, enforcing with real packets between the testbed's pods: policies
//! applied, changed and deleted through the API (a CiliumNetworkPolicy and a Kubernetes
//! NetworkPolicy), a pod deleted and created again, a watch disconnect and a compaction
//! (410 Gone) on the way. The agent finds the pods' interfaces by their routes. Needs root
//! and the binaries built (`cargo build --bins`).
mod common;

use std::time::Duration;

use common::*;
use palisade_testbed::kubeapi::{self, FakeApi};
use palisade_testbed::netns;
use palisade_testbed::report::Observed;
use palisade_testbed::scenario::Plan;
use palisade_testbed::session::{KUBE_NODE, Session};
use serde_json::{Value, json};

const SCENARIO: &str = r#"
name: kubernetes-live
namespaces:
  shop: {team: a}
pods:
  - {name: client, namespace: shop, labels: {app: client}}
  - name: server
    namespace: shop
    labels: {app: server}
    ports: [{port: 80, protocol: TCP}, {port: 81, protocol: TCP}]
  - name: other
    namespace: shop
    labels: {app: other}
    ports: [{port: 80, protocol: TCP}]
policies:
  - apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: server-ingress, namespace: shop}
    spec:
      endpointSelector: {matchLabels: {app: server}}
      ingress:
        - fromEndpoints: [{matchLabels: {app: client}}]
          toPorts: [{ports: [{port: "80", protocol: TCP}]}]
probes:
  - {from: shop/client, to: shop/server, port: 80, protocol: TCP, expect: allow}
  - {from: shop/client, to: shop/server, port: 81, protocol: TCP, expect: deny}
  - {from: shop/other, to: shop/server, port: 80, protocol: TCP, expect: deny}
  - {from: shop/client, to: shop/other, port: 80, protocol: TCP, expect: allow}
"#;

/// The probes' verdicts, in the scenario's order.
async fn verdicts(session: &Session, plan: &Plan) -> Vec<Observed> {
    session.probe_many(&plan.probes).await.into_iter().map(|r| r.observed).collect()
}

/// Applies `obj` (a policy) through the API and waits until the agent has taken in this
/// version and realized it.
async fn apply_policy(session: &Session, api: &FakeApi, obj: Value) {
    let source = format!(
        "kube:{}/{}/{}",
        obj["kind"].as_str().unwrap(),
        obj["metadata"]["namespace"].as_str().unwrap(),
        obj["metadata"]["name"].as_str().unwrap()
    );
    let before = session.policies().await.unwrap().into_iter().find(|p| p.source == source).map(|p| p.revision);
    api.upsert(obj);
    eventually(&format!("{source} taken in"), async || {
        let now = session.policies().await.ok()?.into_iter().find(|p| p.source == source)?;
        (Some(now.revision) != before && now.revision != u64::MAX && now.enforced).then_some(())
    })
    .await;
    session.wait_realized().await.unwrap();
}

/// Deletes a policy through the API and waits until the agent has dropped and realized it.
async fn delete_policy(session: &Session, api: &FakeApi, kind: &str, key: &str) {
    let source = format!("kube:{kind}/{key}");
    api.delete(kind, key);
    eventually(&format!("{source} gone"), async || {
        (!session.policies().await.ok()?.iter().any(|p| p.source == source)).then_some(())
    })
    .await;
    session.wait_realized().await.unwrap();
}

/// Waits until the agent has (or has not) an endpoint for `shop/name`, realized.
async fn endpoint_present(session: &Session, name: &str, present: bool) {
    eventually(&format!("endpoint shop/{name} present={present}"), async || {
        let list = session.endpoints().await.ok()?;
        (list.iter().any(|e| e.namespace == "shop" && e.name == name) == present).then_some(())
    })
    .await;
    session.wait_realized().await.unwrap();
}

#[test]
fn policies_and_pods_through_the_api_server_privileged() {
    use Observed::{Allow, Deny};
    palisade_privileged::require_root!();
    let (plan, names, mut opts) = agent_run(SCENARIO, "kl", &[]);
    opts.timeout = Duration::from_millis(700);
    opts.kubernetes = true;

    let rt = runtime();
    rt.block_on(async {
        let session = Session::up(&plan, &opts, &names).await.expect("the scenario comes up in Kubernetes mode");
        let api = session.kube_api().expect("Kubernetes mode has an API server").clone();
        // 1. As the scenario says, from the API alone.
        assert_eq!(verdicts(&session, &plan).await, [Allow, Deny, Deny, Allow]);
        let policy = serde_json::to_value(&plan.policies[0].manifest).unwrap();

        // 2. The CNP changes through the API (80 -> 81), across a watch disconnect.
        api.disconnect();
        let mut moved = policy.clone();
        moved["spec"]["ingress"][0]["toPorts"][0]["ports"][0]["port"] = json!("81");
        apply_policy(&session, &api, moved).await;
        assert_eq!(verdicts(&session, &plan).await, [Deny, Allow, Deny, Allow]);

        // 3. A Kubernetes NetworkPolicy isolates `other` for ingress (no rules: deny all).
        let knp = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "other-isolated", "namespace": "shop"},
            "spec": {"podSelector": {"matchLabels": {"app": "other"}}, "policyTypes": ["Ingress"]}});
        apply_policy(&session, &api, knp).await;
        assert_eq!(verdicts(&session, &plan).await, [Deny, Allow, Deny, Deny]);

        // 4. The CNP deleted: the server is no longer selected, everything reaches it.
        delete_policy(&session, &api, "CiliumNetworkPolicy", "shop/server-ingress").await;
        assert_eq!(verdicts(&session, &plan).await, [Allow, Allow, Allow, Deny]);

        // 5. The original CNP back, then the client pod deleted (after a compaction: the
        //    agent's watches resume with 410 Gone and relist). Its address no longer carries
        //    the client's identity, so the server's ingress denies it.
        apply_policy(&session, &api, policy).await;
        assert_eq!(verdicts(&session, &plan).await, [Allow, Deny, Deny, Deny]);
        api.compact();
        api.disconnect();
        api.delete("Pod", "shop/client");
        endpoint_present(&session, "client", false).await;
        assert_eq!(verdicts(&session, &plan).await[..3], [Deny, Deny, Deny]);

        // 6. The pod comes back (same address, same labels): allowed again.
        api.upsert(kubeapi::pod_object(&plan, 0, KUBE_NODE));
        endpoint_present(&session, "client", true).await;
        assert_eq!(verdicts(&session, &plan).await, [Allow, Deny, Deny, Deny]);

        session.down().await;
    });
    assert_eq!(netns::list_with_prefix(&names.prefix), Vec::<String>::new());
}
