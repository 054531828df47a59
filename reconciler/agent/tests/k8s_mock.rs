//! The HTTP side of the Kubernetes source against kube-rs's mock service (tower-test):
//! what the status write-back sends, exactly.
use axum::http::{Request, Response};
use kube::client::Body;
use palisade_agent::k8s::crd::NodePolicyStatus;
use palisade_agent::k8s::run::patch_policy_status;

#[tokio::test]
async fn status_write_back_is_a_merge_patch_of_this_nodes_entry() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let server = tokio::spawn(async move {
        let mut seen = Vec::new();
        for _ in 0..2 {
            let (req, send) = handle.next_request().await.expect("a request");
            let (parts, body) = req.into_parts();
            let bytes = body.collect_bytes().await.unwrap();
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            seen.push((
                parts.method.to_string(),
                parts.uri.to_string(),
                parts.headers["content-type"].to_str().unwrap().to_string(),
                v,
            ));
            let answer = serde_json::json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "web"}});
            send.send_response(Response::builder().body(Body::from(serde_json::to_vec(&answer).unwrap())).unwrap());
        }
        seen
    });
    let status = NodePolicyStatus {
        ok: false,
        enforcing: true,
        error: Some("spec.ingress[0]: bad".into()),
        local_policy_revision: Some(7),
        ..Default::default()
    };
    patch_policy_status(&client, "CiliumNetworkPolicy", Some("shop"), "web", "node-a", &status).await.unwrap();
    patch_policy_status(&client, "CiliumClusterwideNetworkPolicy", None, "all", "node-a", &status).await.unwrap();
    let seen = server.await.unwrap();
    assert_eq!(seen[0].0, "PATCH");
    assert!(
        seen[0].1.starts_with("/apis/cilium.io/v2/namespaces/shop/ciliumnetworkpolicies/web/status"),
        "{}",
        seen[0].1
    );
    assert_eq!(seen[0].2, "application/merge-patch+json");
    assert_eq!(
        seen[0].3,
        serde_json::json!({"status": {"nodes": {"node-a": {
            "ok": false, "enforcing": true, "error": "spec.ingress[0]: bad", "localPolicyRevision": 7}}}})
    );
    assert!(seen[1].1.starts_with("/apis/cilium.io/v2/ciliumclusterwidenetworkpolicies/all/status"), "{}", seen[1].1);
}

#[tokio::test]
async fn tier_status_is_a_server_side_apply_of_this_nodes_condition() {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let server = tokio::spawn(async move {
        let (req, send) = handle.next_request().await.expect("a request");
        let (parts, body) = req.into_parts();
        let bytes = body.collect_bytes().await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let answer = serde_json::json!({"apiVersion": "policy.networking.k8s.io/v1alpha1", "kind": "AdminNetworkPolicy", "metadata": {"name": "guard"}});
        send.send_response(Response::builder().body(Body::from(serde_json::to_vec(&answer).unwrap())).unwrap());
        (
            parts.method.to_string(),
            parts.uri.to_string(),
            parts.headers["content-type"].to_str().unwrap().to_string(),
            v,
        )
    });
    let condition = Condition {
        type_: palisade_agent::k8s::crd::tier_condition_type("node-a"),
        status: "False".into(),
        reason: "Invalid".into(),
        message: "spec.priority: priority 1001 is outside 0..1000".into(),
        last_transition_time: Time("2026-12-02T12:00:00Z".parse().unwrap()),
        observed_generation: Some(3),
    };
    palisade_agent::k8s::run::apply_tier_condition(&client, "AdminNetworkPolicy", "guard", "node-a", condition)
        .await
        .unwrap();
    let (method, uri, content_type, body) = server.await.unwrap();
    assert_eq!(method, "PATCH");
    assert!(uri.starts_with("/apis/policy.networking.k8s.io/v1alpha1/adminnetworkpolicies/guard/status?"), "{uri}");
    assert!(uri.contains("fieldManager=palisade-agent-node-a") && uri.contains("force=true"), "{uri}");
    assert_eq!(content_type, "application/apply-patch+yaml");
    assert_eq!(
        body,
        serde_json::json!({
            "apiVersion": "policy.networking.k8s.io/v1alpha1", "kind": "AdminNetworkPolicy",
            "metadata": {"name": "guard"},
            "status": {"conditions": [{"type": "Ready-On-Node-node-a", "status": "False", "reason": "Invalid",
                "message": "spec.priority: priority 1001 is outside 0..1000",
                "lastTransitionTime": "2026-12-02T12:00:00Z", "observedGeneration": 3}]}})
    );
}
