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
