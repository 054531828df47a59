//! The tier kinds in Kubernetes mode, live: the real agent fed only through the testbed's
//! list/watch API server enforces `ClusterNetworkPolicies`, an `AdminNetworkPolicy` and the
//! `BaselineAdminNetworkPolicy` with real packets, follows a priority change and deletes,
//! keeps enforcing the last good version when a new one is rejected (and says why in its
//! status condition), and treats a kind the server stops serving (CRD removed) as empty.
//! Needs root and the binaries built (`cargo build --bins`).
mod common;

use std::time::Duration;

use common::*;
use palisade_testbed::kubeapi::FakeApi;
use palisade_testbed::netns;
use palisade_testbed::report::Observed;
use palisade_testbed::scenario::Plan;
use palisade_testbed::session::{KUBE_NODE, Session};
use serde_json::{Value, json};

const SCENARIO: &str = r"
name: kubernetes-tiers-live
namespaces:
  shop: {team: a}
  ops: {team: ops}
pods:
  - name: server
    namespace: shop
    labels: {app: server}
    ports: [{port: 80, protocol: TCP}]
  - {name: client, namespace: shop, labels: {app: client}}
  - {name: probe, namespace: ops, labels: {app: probe}}
policies:
  - apiVersion: policy.networking.k8s.io/v1alpha2
    kind: ClusterNetworkPolicy
    metadata: {name: deny-shop-clients}
    spec:
      tier: Admin
      priority: 10
      subject: {pods: {namespaceSelector: {matchLabels: {team: a}}, podSelector: {matchLabels: {app: server}}}}
      ingress:
        - {name: no-clients, action: Deny, from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: client}}}}]}
  - apiVersion: policy.networking.k8s.io/v1alpha2
    kind: ClusterNetworkPolicy
    metadata: {name: accept-shop-clients}
    spec:
      tier: Admin
      priority: 20
      subject: {namespaces: {matchLabels: {team: a}}}
      ingress:
        - {name: clients, action: Accept, from: [{namespaces: {matchLabels: {team: a}}}], protocols: [{tcp: {destinationPort: {number: 80}}}]}
probes:
  - {from: shop/client, to: shop/server, port: 80, protocol: TCP, expect: deny}
  - {from: ops/probe, to: shop/server, port: 80, protocol: TCP, expect: allow}
";

const READY: &str = "Ready-On-Node-";
const CNP: &str = "ClusterNetworkPolicy";

async fn verdicts(session: &Session, plan: &Plan) -> Vec<Observed> {
    session.probe_many(&plan.probes).await.into_iter().map(|r| r.observed).collect()
}

fn source(obj: &Value) -> String {
    format!("kube:{}/{}", obj["kind"].as_str().unwrap(), obj["metadata"]["name"].as_str().unwrap())
}

/// Applies a tier policy through the API; waits until the agent took in this version
/// (accepted: enforced at a new revision; rejected: an error) and realized it.
async fn apply(session: &Session, api: &FakeApi, obj: Value, accepted: bool) {
    let source = source(&obj);
    let before = session.policies().await.unwrap().into_iter().find(|p| p.source == source);
    let (rev_before, err_before) = (before.as_ref().map(|p| p.revision), before.is_some_and(|p| p.error.is_some()));
    api.upsert(obj);
    eventually(&format!("{source} taken in"), async || {
        let now = session.policies().await.ok()?.into_iter().find(|p| p.source == source)?;
        let done = if accepted {
            (Some(now.revision) != rev_before || err_before)
                && now.revision != u64::MAX
                && now.enforced
                && now.error.is_none()
        } else {
            now.error.is_some()
        };
        done.then_some(())
    })
    .await;
    session.wait_realized().await.unwrap();
}

async fn delete(session: &Session, api: &FakeApi, kind: &str, name: &str) {
    let source = format!("kube:{kind}/{name}");
    api.delete(kind, name);
    eventually(&format!("{source} gone"), async || {
        (!session.policies().await.ok()?.iter().any(|p| p.source == source)).then_some(())
    })
    .await;
    session.wait_realized().await.unwrap();
}

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
    let (plan, names, mut opts) = agent_run(SCENARIO, "kt", &[]);
    opts.timeout = Duration::from_millis(700);
    opts.kubernetes = true;

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
        apply(&session, &api, first.clone(), true).await;
        assert_eq!(verdicts(&session, &plan).await, [Allow, Allow]);

        // 3. A version the CRD's rules reject (priority out of range): nothing changes in
        //    what is enforced, and the condition says why.
        let mut bad = first.clone();
        bad["spec"]["priority"] = json!(1001);
        apply(&session, &api, bad, false).await;
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
        apply(&session, &api, middle, false).await;
        assert_eq!(verdicts(&session, &plan).await, [Allow, Allow]);
        let c = condition(&api, CNP, "middle", "False").await;
        assert_eq!(c["reason"], json!("Invalid"), "{c}");
        assert!(c["message"].as_str().unwrap().contains("spec.tier"), "{c}");
        delete(&session, &api, CNP, "middle").await;

        // 4. The good version back, then deleted: the Deny decides again.
        apply(&session, &api, first, true).await;
        condition(&api, CNP, "accept-shop-clients", "True").await;
        delete(&session, &api, CNP, "accept-shop-clients").await;
        assert_eq!(verdicts(&session, &plan).await, [Deny, Allow]);

        // 5. The v1alpha1 kinds: a BaselineAdminNetworkPolicy denies ingress from ops (no
        //    NetworkPolicy selects the server), an AdminNetworkPolicy at priority 1 allows the
        //    shop clients before the Deny at 10.
        let banp = json!({"apiVersion": "policy.networking.k8s.io/v1alpha1", "kind": "BaselineAdminNetworkPolicy",
            "metadata": {"name": "default"},
            "spec": {"subject": {"namespaces": {"matchLabels": {"team": "a"}}},
                     "ingress": [{"name": "no-ops", "action": "Deny", "from": [{"namespaces": {"matchLabels": {"team": "ops"}}}]}]}});
        apply(&session, &api, banp, true).await;
        assert_eq!(verdicts(&session, &plan).await, [Deny, Deny]);
        let anp = json!({"apiVersion": "policy.networking.k8s.io/v1alpha1", "kind": "AdminNetworkPolicy",
            "metadata": {"name": "shop-clients"},
            "spec": {"priority": 1, "subject": {"namespaces": {"matchLabels": {"team": "a"}}},
                     "ingress": [{"name": "clients", "action": "Allow", "from": [{"namespaces": {"matchLabels": {"team": "a"}}}],
                                  "ports": [{"portNumber": {"protocol": "TCP", "port": 80}}]}]}});
        apply(&session, &api, anp, true).await;
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
