//! The tier kinds in Kubernetes mode, live: the real agent fed only through the testbed's
//! list/watch API server enforces `ClusterNetworkPolicies`, an `AdminNetworkPolicy` and the
//! `BaselineAdminNetworkPolicy` with real packets, follows a priority change and deletes,
//! keeps enforcing the last good version when a new one is rejected (and says why in its
//! status condition), and treats a kind the server stops serving (CRD removed) as empty.
//! Needs root and the binaries built (`cargo build --bins`).
mod common;

use common::*;
use palisade_testbed::kubeapi::FakeApi;
use palisade_testbed::netns;
use palisade_testbed::report::Observed;
use palisade_testbed::session::{KUBE_NODE, Session};
use serde_json::{Value, json};

const SCENARIO: &str = include_str!("scenarios/kubernetes-tiers.yaml");

const READY: &str = "Ready-On-Node-";
const CNP: &str = "ClusterNetworkPolicy";

/// Waits until this node's condition on `kind/name` has status `status`; returns it.
async fn condition(api: &FakeApi, kind: &str, name: &str, status: &str) -> Value {
    let ty = format!("{READY}{KUBE_NODE}");
    eventually(&format!("{kind}/{name}: condition {ty}={status}"), async || {
        let obj = api.get(kind, name)?;
        let c = obj["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == json!(ty))?.clone();
        (c["status"] == json!(status)).then_some(c)
    })
    .await
}

#[test]
fn tier_policies_through_the_api_server_privileged() {
    use Observed::{Allow, Deny};
    palisade_privileged::require_root!();
    let (plan, names, opts) = kube_run(SCENARIO, "kt");

    let rt = runtime();
    rt.block_on(async {
        let session = Session::up(&plan, &opts, &names).await.expect("the scenario comes up in Kubernetes mode");
        let api = session.kube_api().expect("Kubernetes mode has an API server").clone();
        // 1. As the scenario says: the Deny at priority 10 comes before the Accept at 20.
        assert_eq!(verdicts(&session, &plan).await, [Deny, Allow]);
        let c = condition(&api, CNP, "accept-shop-clients", "True").await;
        assert_eq!(c["reason"], json!("Enforced"), "{c}");
        eprintln!("accepted version's condition: {c}");
        let accept = serde_json::to_value(&plan.policies[1].manifest).unwrap();

        // 2. A priority change through the API: the Accept at 5 now decides first.
        let mut first = accept.clone();
        first["spec"]["priority"] = json!(5);
        kube_apply(&session, &api, first.clone(), true).await;
        assert_eq!(verdicts(&session, &plan).await, [Allow, Allow]);

        // 3. A version the CRD's rules reject (priority out of range): nothing changes in
        //    what is enforced, and the condition says why.
        let mut bad = first.clone();
        bad["spec"]["priority"] = json!(1001);
        kube_apply(&session, &api, bad, false).await;
        assert_eq!(verdicts(&session, &plan).await, [Allow, Allow]);
        let c = condition(&api, CNP, "accept-shop-clients", "False").await;
        assert_eq!(c["reason"], json!("InvalidPreviousVersionEnforced"), "{c}");
        eprintln!("rejected version's condition: {c}");
        assert!(c["message"].as_str().unwrap().contains("priority"), "{c}");
        // The other policy's condition is untouched by it.
        condition(&api, CNP, "deny-shop-clients", "True").await;

        // A new object that was never valid (an unknown tier): rejected, reported, nothing
        // enforced from it.
        let middle = json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": CNP,
            "metadata": {"name": "middle"},
            "spec": {"tier": "Middle", "priority": 0, "subject": {"namespaces": {}},
                     "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]}});
        kube_apply(&session, &api, middle, false).await;
        assert_eq!(verdicts(&session, &plan).await, [Allow, Allow]);
        let c = condition(&api, CNP, "middle", "False").await;
        assert_eq!(c["reason"], json!("Invalid"), "{c}");
        assert!(c["message"].as_str().unwrap().contains("spec.tier"), "{c}");
        kube_delete(&session, &api, CNP, "middle").await;

        // 4. The good version back, then deleted: the Deny decides again.
        kube_apply(&session, &api, first, true).await;
        condition(&api, CNP, "accept-shop-clients", "True").await;
        kube_delete(&session, &api, CNP, "accept-shop-clients").await;
        assert_eq!(verdicts(&session, &plan).await, [Deny, Allow]);

        // 5. The v1alpha1 kinds: a BaselineAdminNetworkPolicy denies ingress from ops (no
        //    NetworkPolicy selects the server), an AdminNetworkPolicy at priority 1 allows the
        //    shop clients before the Deny at 10.
        let banp = json!({"apiVersion": "policy.networking.k8s.io/v1alpha1", "kind": "BaselineAdminNetworkPolicy",
            "metadata": {"name": "default"},
            "spec": {"subject": {"namespaces": {"matchLabels": {"team": "a"}}},
                     "ingress": [{"name": "no-ops", "action": "Deny", "from": [{"namespaces": {"matchLabels": {"team": "ops"}}}]}]}});
        kube_apply(&session, &api, banp, true).await;
        assert_eq!(verdicts(&session, &plan).await, [Deny, Deny]);
        let anp = json!({"apiVersion": "policy.networking.k8s.io/v1alpha1", "kind": "AdminNetworkPolicy",
            "metadata": {"name": "shop-clients"},
            "spec": {"priority": 1, "subject": {"namespaces": {"matchLabels": {"team": "a"}}},
                     "ingress": [{"name": "clients", "action": "Allow", "from": [{"namespaces": {"matchLabels": {"team": "a"}}}],
                                  "ports": [{"portNumber": {"protocol": "TCP", "port": 80}}]}]}});
        kube_apply(&session, &api, anp, true).await;
        assert_eq!(verdicts(&session, &plan).await, [Allow, Deny]);
        condition(&api, "AdminNetworkPolicy", "shop-clients", "True").await;
        condition(&api, "BaselineAdminNetworkPolicy", "default", "True").await;

        // 6. The AdminNetworkPolicy CRD removed (the server answers 404 and has dropped its
        //    objects without a watch event): the kind counts as empty, its policy is gone;
        //    the CRD and the object created again, it comes back.
        let mut anp = api.get("AdminNetworkPolicy", "shop-clients").unwrap();
        anp.as_object_mut().unwrap().remove("status");
        api.set_served("AdminNetworkPolicy", false);
        eventually("the AdminNetworkPolicy dropped", async || {
            (!session.policies().await.ok()?.iter().any(|p| p.source == "kube:AdminNetworkPolicy/shop-clients"))
                .then_some(())
        })
        .await;
        session.wait_realized().await.unwrap();
        assert_eq!(verdicts(&session, &plan).await, [Deny, Deny]);
        api.set_served("AdminNetworkPolicy", true);
        api.upsert(anp);
        eventually("the AdminNetworkPolicy back", async || {
            session.policies().await.ok()?.iter().any(|p| p.source == "kube:AdminNetworkPolicy/shop-clients" && p.enforced).then_some(())
        })
        .await;
        session.wait_realized().await.unwrap();
        assert_eq!(verdicts(&session, &plan).await, [Allow, Deny]);

        // 7. A namespace label change re-resolves the tier peers: ops is no longer team=ops,
        //    the BaselineAdminNetworkPolicy's Deny stops matching it.
        api.upsert(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ops", "labels": {"team": "tools"}}}));
        eventually("ops relabelled", async || {
            let ep = session.endpoints().await.ok()?.into_iter().find(|e| e.namespace == "ops")?;
            ep.security_labels.iter().any(|l| l.contains("namespace.labels.team=tools")).then_some(())
        })
        .await;
        session.wait_realized().await.unwrap();
        assert_eq!(verdicts(&session, &plan).await, [Allow, Allow]);

        session.down().await;
    });
    assert_eq!(netns::list_with_prefix(&names.prefix), Vec::<String>::new());
}
