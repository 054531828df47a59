//! `palisade-testbed up --kubernetes` answers a real client: kubectl (the one on the
//! machine) lists the nodes, namespaces and pods of a two-node scenario through the
//! kubeconfig the testbed writes, and applies, edits and deletes one policy of every kind
//! (NetworkPolicy, CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy,
//! ClusterNetworkPolicy v1alpha2, AdminNetworkPolicy and BaselineAdminNetworkPolicy
//! v1alpha1); after each step both nodes' agents have taken it in and real packets from
//! node-a to node-b get the new verdicts. Needs root, kubectl and the binaries built.
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const SCENARIO: &str = "tests/scenarios/kubectl-two-nodes.yaml";

/// Every agent's policies: source -> revision.
type Seen = Vec<BTreeMap<String, u64>>;

struct Bed<'a> {
    root: &'a Path,
    kubeconfig: String,
    sockets: Vec<std::path::PathBuf>,
    rt: tokio::runtime::Runtime,
}

impl Bed<'_> {
    fn testbed(&self, args: &[&str]) -> std::process::Output {
        testbed(self.root, args)
    }

    fn seen(&self) -> Seen {
        self.rt.block_on(async {
            let mut out = Vec::new();
            for s in &self.sockets {
                let pols = palisade_api::Client::new(s).policies().await.expect("the agent answers");
                out.push(pols.into_iter().map(|p| (p.source, p.revision)).collect());
            }
            out
        })
    }

    /// Runs kubectl (with `stdin` for `-f -`), expecting success; then waits until every
    /// agent's policies changed from what they were and that is in the kernel.
    fn kubectl(&self, args: &[&str], stdin: Option<&str>, editor: Option<&Path>) -> String {
        use std::io::Write as _;
        let before = self.seen();
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if let Some(e) = editor {
            cmd.env("KUBE_EDITOR", e).env("EDITOR", e);
        }
        let mut child = cmd.spawn().expect("kubectl runs");
        let mut pipe = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            pipe.write_all(text.as_bytes()).unwrap();
        }
        drop(pipe);
        let out = child.wait_with_output().unwrap();
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "kubectl {args:?}: {stdout}\n{}", text(&out.stderr));
        if args[0] != "get" {
            self.rt.block_on(async {
                for (k, s) in self.sockets.iter().enumerate() {
                    let client = palisade_api::Client::new(s);
                    eventually(&format!("node {k} takes in kubectl {args:?}"), async || {
                        let now: BTreeMap<String, u64> =
                            client.policies().await.ok()?.into_iter().map(|p| (p.source, p.revision)).collect();
                        (now != before[k]).then_some(())
                    })
                    .await;
                    client.wait_current(Duration::from_secs(10)).await.unwrap();
                }
            });
        }
        stdout
    }

    /// client -> server on 80 and 81: true for allowed.
    fn verdicts(&self) -> [bool; 2] {
        ["80/TCP", "81/TCP"].map(|port| {
            let out = self.testbed(&["probe", "--json", "shop/client", "shop/server", port]);
            assert_eq!(out.status.code(), Some(0), "{}{}", text(&out.stdout), text(&out.stderr));
            let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let judged = doc["judgedOn"].as_str().unwrap_or_default();
            assert!(judged.contains("egress node-a") && judged.contains("ingress node-b"), "{doc}");
            match doc["observed"].as_str() {
                Some("allow") => true,
                Some("deny") => false,
                other => panic!("{other:?}: {doc}"),
            }
        })
    }
}

/// An editor for `kubectl edit`: replaces `from` by `to` in the file it is given.
fn editor(dir: &Path, name: &str, from: &str, to: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\nsed -i 's/{from}/{to}/' \"$1\"\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn kubectl_lists_applies_edits_and_deletes_every_policy_kind_privileged() {
    palisade_privileged::require_root!();
    if Command::new("kubectl").arg("version").arg("--client").output().is_err() {
        palisade_privileged::skip("needs kubectl (on the machine image)");
        return;
    }
    built_agent();
    let root = tempfile::tempdir().unwrap();
    let up = testbed(root.path(), &["up", "--kubernetes", SCENARIO]);
    // Down also when an assertion below fails (the instance outlives this process).
    let _down = Down(root.path());
    let up_text = ok(&up);
    let state = palisade_testbed::instance::InstanceState::load(&root.path().join("default")).unwrap().unwrap();
    let kubeconfig = state.kubeconfig.clone().expect("up --kubernetes writes a kubeconfig");
    assert!(up_text.contains(&kubeconfig.display().to_string()), "{up_text}");
    let mut sockets = vec![state.api_socket.clone()];
    sockets.extend(state.nodes.iter().map(|n| n.api_socket.clone()));
    let bed = Bed { root: root.path(), kubeconfig: kubeconfig.display().to_string(), sockets, rt: runtime() };
    let tools = tempfile::tempdir().unwrap();

    // Listing.
    let nodes = bed.kubectl(&["get", "nodes", "-o", "wide"], None, None);
    assert!(nodes.contains("node-a") && nodes.contains("node-b") && nodes.contains("Ready"), "{nodes}");
    let pods = bed.kubectl(&["get", "pods", "-A", "-o", "wide"], None, None);
    let server = pods.lines().find(|l| l.contains("server")).unwrap_or_default();
    assert!(server.contains("node-b") && server.contains("Running"), "{pods}");
    let ns = bed.kubectl(&["get", "namespaces", "--show-labels"], None, None);
    assert!(ns.contains("shop") && ns.contains("team=shop"), "{ns}");
    let json = bed.kubectl(&["get", "pods", "-n", "shop", "-l", "app=client", "-o", "json"], None, None);
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(doc["items"].as_array().map(Vec::len), Some(1), "{json}");
    assert_eq!(bed.verdicts(), [true, true], "no policy yet");

    // CiliumNetworkPolicy: server takes client on 81 only; edited to 80.
    let cnp = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: server-in, namespace: shop}\n\
               spec:\n  endpointSelector: {matchLabels: {app: server}}\n  ingress:\n\
               \x20 - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts: [{ports: [{port: \"81\", protocol: TCP}]}]\n";
    let out = bed.kubectl(&["apply", "-f", "-"], Some(cnp), None);
    assert!(out.contains("ciliumnetworkpolicy.cilium.io/server-in created"), "{out}");
    assert_eq!(bed.verdicts(), [false, true]);
    let ed = editor(tools.path(), "cnp-80", "port: \"81\"", "port: \"80\"");
    bed.kubectl(&["edit", "cnp", "server-in", "-n", "shop"], None, Some(&ed));
    assert_eq!(bed.verdicts(), [true, false]);

    // NetworkPolicy: 81 too (the union of what selects the pod).
    let knp = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: server-81, namespace: shop}\n\
               spec:\n  podSelector: {matchLabels: {app: server}}\n  policyTypes: [Ingress]\n\
               \x20 ingress: [{ports: [{port: 81, protocol: TCP}]}]\n";
    bed.kubectl(&["apply", "-f", "-"], Some(knp), None);
    assert_eq!(bed.verdicts(), [true, true]);

    // CiliumClusterwideNetworkPolicy: a deny on 81 wins over both.
    let ccnp = "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: no-81}\n\
                spec:\n  endpointSelector: {matchLabels: {app: server}}\n  ingressDeny:\n\
                \x20 - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts: [{ports: [{port: \"81\", protocol: TCP}]}]\n";
    bed.kubectl(&["apply", "-f", "-"], Some(ccnp), None);
    assert_eq!(bed.verdicts(), [true, false]);
    // Each agent writes its node's status entry once it enforces the policy, on its own
    // time: asked until both are there (bounded).
    let start = std::time::Instant::now();
    loop {
        let ccnp_yaml = bed.kubectl(&["get", "ccnp", "no-81", "-o", "yaml"], None, None);
        if ccnp_yaml.contains("node-a:") && ccnp_yaml.contains("node-b:") {
            break;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(10), "both agents report within 10 s: {ccnp_yaml}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    bed.kubectl(&["delete", "ccnp", "no-81"], None, None);
    assert_eq!(bed.verdicts(), [true, true]);
    bed.kubectl(&["delete", "networkpolicy", "server-81", "-n", "shop"], None, None);
    bed.kubectl(&["delete", "-n", "shop", "ciliumnetworkpolicy", "server-in"], None, None);
    assert_eq!(bed.verdicts(), [true, true], "nothing selects server again");

    // ClusterNetworkPolicy (Admin tier): Deny on 80, edited to Accept.
    let cnp2 = "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: guard}\n\
                spec:\n  tier: Admin\n  priority: 10\n  subject: {namespaces: {matchLabels: {team: shop}}}\n\
                \x20 ingress:\n  - name: no-80\n    action: Deny\n    from: [{namespaces: {}}]\n\
                \x20   protocols: [{tcp: {destinationPort: {number: 80}}}]\n";
    bed.kubectl(&["apply", "-f", "-"], Some(cnp2), None);
    assert_eq!(bed.verdicts(), [false, true]);
    let ed = editor(tools.path(), "cnp-accept", "action: Deny", "action: Accept");
    bed.kubectl(&["edit", "clusternetworkpolicy", "guard"], None, Some(&ed));
    assert_eq!(bed.verdicts(), [true, true]);
    bed.kubectl(&["delete", "clusternetworkpolicy", "guard"], None, None);

    // AdminNetworkPolicy (v1alpha1): Deny on 81; BaselineAdminNetworkPolicy `default`:
    // Deny on 80 (no NetworkPolicy-tier policy selects server).
    let anp = "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\nmetadata: {name: no-81}\n\
               spec:\n  priority: 5\n  subject: {namespaces: {matchLabels: {team: shop}}}\n\
               \x20 ingress:\n  - name: no-81\n    action: Deny\n    from: [{namespaces: {}}]\n\
               \x20   ports: [{portNumber: {protocol: TCP, port: 81}}]\n";
    bed.kubectl(&["apply", "-f", "-"], Some(anp), None);
    assert_eq!(bed.verdicts(), [true, false]);
    let banp = "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: BaselineAdminNetworkPolicy\nmetadata: {name: default}\n\
                spec:\n  subject: {namespaces: {matchLabels: {team: shop}}}\n\
                \x20 ingress:\n  - name: no-80\n    action: Deny\n    from: [{namespaces: {}}]\n\
                \x20   ports: [{portNumber: {protocol: TCP, port: 80}}]\n";
    bed.kubectl(&["apply", "-f", "-"], Some(banp), None);
    assert_eq!(bed.verdicts(), [false, false]);
    let ed = editor(tools.path(), "banp-81", "port: 80", "port: 82");
    bed.kubectl(&["edit", "baselineadminnetworkpolicy", "default"], None, Some(&ed));
    assert_eq!(bed.verdicts(), [true, false]);
    bed.kubectl(&["delete", "adminnetworkpolicy", "no-81"], None, None);
    bed.kubectl(&["delete", "baselineadminnetworkpolicy", "default"], None, None);
    assert_eq!(bed.verdicts(), [true, true]);

    ok(&bed.testbed(&["down"]));
    assert!(state.holder.wait_gone(Duration::from_secs(10)));
    assert_eq!(leftovers(state.holder.pid), Vec::<String>::new());
}
