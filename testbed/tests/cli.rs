//! The command line without root: validation errors and their exit code.
mod common;

use common::*;

fn scenario_file(dir: &tempfile::TempDir, text: &str) -> String {
    let p = dir.path().join("s.yaml");
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn check_accepts_the_seed_fixture() {
    let file = fixture("seed-allow-frontend-to-backend.yaml");
    let (_, out) = run(&["check", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("6 pods, 2 policies, 15 probes"));
}

#[test]
fn unknown_key_exits_2_and_names_the_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let f = scenario_file(
        &dir,
        "name: x\nnamespaces: {default: {}}\npods:\n  - {name: a, namespace: default, lables: {app: a}}\n",
    );
    let (_, out) = run(&["run", "--json", &f]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("pods[0].lables"), "{stderr}");
    // Still one JSON document on stdout.
    let doc: serde_json::Value = serde_json::from_str(&text(&out.stdout)).unwrap();
    assert_eq!(doc["scenarios"].as_array().unwrap().len(), 0);
}

#[test]
fn probe_to_an_unlisted_port_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let f = scenario_file(
        &dir,
        "name: x\nnamespaces: {default: {}}\npods:\n  - {name: a, namespace: default}\n  - {name: b, namespace: default, ports: [{port: 80}]}\nprobes:\n  - {from: default/a, to: default/b, port: 81, protocol: TCP, expect: allow}\n",
    );
    let (_, out) = run(&["check", &f]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("probes[0].port") && stderr.contains("does not list 81/TCP"), "{stderr}");
}

#[test]
fn world_hosts_entities_sctp_and_ipv6_are_valid() {
    let dir = tempfile::tempdir().unwrap();
    let f = scenario_file(
        &dir,
        "name: x\nipFamilies: [IPv4, IPv6]\nnamespaces: {default: {}}\npods:\n  - {name: a, namespace: default, ports: [{port: 9, protocol: SCTP}]}\nprobes:\n  - {from: default/a, to: 192.0.2.7, port: 443, protocol: TCP, expect: deny}\n  - {from: 2001:db8::7, to: default/a, port: 9, protocol: SCTP, expect: allow}\n  - {from: entity:remote-node, to: default/a, protocol: ICMPv6, expect: allow}\n  - {from: default/a, to: entity:kube-apiserver, port: 6443, protocol: TCP, family: IPv6, expect: allow}\n",
    );
    let (_, out) = run(&["check", &f]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("1 pods, 0 policies, 4 probes"), "{}", text(&out.stdout));
}

#[test]
fn unsupported_parts_exit_2_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let f = scenario_file(
        &dir,
        "name: x\nnamespaces: {default: {}}\npods:\n  - {name: a, namespace: default}\nprobes:\n  - {from: default/a, to: 192.0.2.7, protocol: ICMP, icmp_type: 13, expect: deny}\n",
    );
    let (_, out) = run(&["run", &f]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("probes[0].icmp_type") && stderr.contains("not supported yet by this testbed version"),
        "{stderr}"
    );
}

#[test]
fn palisade_explains_a_scenario_offline() {
    let palisade = std::path::Path::new(BIN).with_file_name("palisade");
    if !palisade.is_file() {
        eprintln!("skipped: {} is not built (`cargo build --bins`)", palisade.display());
        return;
    }
    let seed = fixture("seed-allow-frontend-to-backend.yaml");
    let explain = |from: &str, port: &str| {
        std::process::Command::new(&palisade)
            .args(["--socket", "/nonexistent/agent.sock", "policy", "explain", "--scenario"])
            .arg(&seed)
            .args(["--from", from, "--to", "default/backend", "--port", port, "--protocol", "TCP"])
            .output()
            .unwrap()
    };
    let out = explain("default/frontend", "8080");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("default/frontend (10.200.1.10) (identity 256) -> default/backend (10.200.1.11)"),
        "{stdout}"
    );
    assert!(stdout.contains("8080/TCP: ALLOW"), "{stdout}");
    assert!(stdout.contains("rule CiliumNetworkPolicy default/allow-frontend-to-backend spec.ingress[0]"), "{stdout}");
    let out = explain("default/other", "8080");
    assert!(text(&out.stdout).contains("8080/TCP: DENY") && text(&out.stdout).contains("default-deny"));
}
