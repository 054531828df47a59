//! The real agent in Kubernetes mode, fed only through the list/watch protocol of the
//! testbed's API server, enforcing with real packets between the testbed's pods: policies
//! applied, changed and deleted through the API (a CiliumNetworkPolicy and a Kubernetes
//! NetworkPolicy), a pod deleted and created again, a watch disconnect and a compaction
//! (410 Gone) on the way. The agent finds the pods' interfaces by their routes. Needs root
//! and the binaries built (`cargo build --bins`).
mod common;

use common::*;
use palisade_testbed::kubeapi;
use palisade_testbed::netns;
use palisade_testbed::report::Observed;
use palisade_testbed::session::{KUBE_NODE, Session};
use serde_json::json;

const SCENARIO: &str = include_str!("scenarios/kubernetes-live.yaml");

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
    let (plan, names, opts) = kube_run(SCENARIO, "kl");

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
        kube_apply(&session, &api, moved, true).await;
        assert_eq!(verdicts(&session, &plan).await, [Deny, Allow, Deny, Allow]);

        // 3. A Kubernetes NetworkPolicy isolates `other` for ingress (no rules: deny all).
        let knp = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "other-isolated", "namespace": "shop"},
            "spec": {"podSelector": {"matchLabels": {"app": "other"}}, "policyTypes": ["Ingress"]}});
        kube_apply(&session, &api, knp, true).await;
        assert_eq!(verdicts(&session, &plan).await, [Deny, Allow, Deny, Deny]);

        // 4. The CNP deleted: the server is no longer selected, everything reaches it.
        kube_delete(&session, &api, "CiliumNetworkPolicy", "shop/server-ingress").await;
        assert_eq!(verdicts(&session, &plan).await, [Allow, Allow, Allow, Deny]);

        // 5. The original CNP back, then the client pod deleted (after a compaction: the
        //    agent's watches resume with 410 Gone and relist). Its address no longer carries
        //    the client's identity, so the server's ingress denies it.
        kube_apply(&session, &api, policy, true).await;
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
