//! `palisade ui` in a real browser: the testbed brings the seed scenario up with the real
//! agent, sends an allowed and denied probes, `palisade ui` serves the page on loopback,
//! and headless Chromium (Debian's, driven by playwright-core: `tests/browser/ui_check.mjs`)
//! finds the map's edges of the allowed and the dropped connections, opens the drop and
//! reads the policy that put `default/backend` into default deny, opens the pod, and
//! applies the observe filters. Needs root, the binaries (`cargo build --bins`), and what
//! ci/setup.sh installs (chromium, node, playwright-core under tests/browser).
//!
//! `PALISADE_UI_SCREENSHOT=docs/ui.png` (relative to the workspace root) keeps the page's
//! screenshot there (the one in docs/ is made so).
mod common;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use palisade_testbed::instance::InstanceState;

fn testbed(state_root: &Path, args: &[&str]) -> Output {
    Command::new(BIN).args(args).env("PALISADE_TESTBED_STATE_DIR", state_root).output().expect("palisade-testbed runs")
}

fn ok(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(0), "stdout:\n{}\nstderr:\n{}", text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

/// Takes the instance down when the test ends, also on failure.
struct Down<'a>(&'a Path);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = testbed(self.0, &["down"]);
    }
}

/// The processes this test started (the page's server, node, and the Chromium node
/// started in its own process group), ended when the test ends, also on failure.
#[derive(Default)]
struct Started {
    children: Vec<Child>,
    chromium: Option<i32>,
}

impl Drop for Started {
    fn drop(&mut self) {
        if let Some(pid) = self.chromium {
            // Still the browser this test started (not a reused pid)? Then its group.
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("chromium") {
                // SAFETY: kill has no memory preconditions; -pid is the group Playwright
                // made for the browser it launched for this test.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Lines of a child's stdout, read on a thread.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let out = child.stdout.take().expect("stdout piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// What the browser check needs, else why not.
fn browser_missing() -> Option<String> {
    let chromium = std::env::var("PALISADE_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&chromium).is_file() {
        return Some(format!("no Chromium at {chromium} (ci/setup.sh installs Debian's `chromium`)"));
    }
    if Command::new("node").arg("--version").output().is_err() {
        return Some("no `node` on PATH (ci/setup.sh installs Node.js)".into());
    }
    let pw = browser_dir().join("node_modules/playwright-core/package.json");
    if !pw.is_file() {
        return Some(format!("no {} (ci/setup.sh runs `npm ci` there)", pw.display()));
    }
    None
}

#[test]
fn ui_shows_the_map_and_explains_the_drop_in_chromium_privileged() {
    palisade_privileged::require_root!();
    built_agent();
    if let Some(why) = browser_missing() {
        palisade_privileged::skip(&format!("needs a browser: {why}"));
        return;
    }
    let started_at = Instant::now();
    let root = tempfile::tempdir().unwrap();
    let seed = fixture("seed-allow-frontend-to-backend.yaml");
    ok(&testbed(root.path(), &["up", seed.to_str().unwrap()]));
    let _down = Down(root.path());
    let state = InstanceState::load(&root.path().join("default")).unwrap().expect("up wrote the state");
    ok(&testbed(root.path(), &["probe", "--expect", "allow", "default/frontend", "default/backend", "8080/TCP"]));
    ok(&testbed(root.path(), &["probe", "--expect", "deny", "default/frontend", "default/backend", "9090/TCP"]));
    ok(&testbed(root.path(), &["probe", "--expect", "deny", "default/other", "default/backend", "8080/TCP"]));

    let mut started = Started::default();
    let mut ui = Command::new(Path::new(BIN).with_file_name("palisade"))
        .arg("--socket")
        .arg(&state.api_socket)
        .args(["ui", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("palisade ui starts");
    let ui_lines = lines(&mut ui);
    started.children.push(ui);
    let first = ui_lines.recv_timeout(Duration::from_secs(10)).expect("palisade ui prints its address");
    let url = first
        .split_whitespace()
        .find(|w| w.starts_with("http://127.0.0.1:"))
        .unwrap_or_else(|| panic!("no loopback URL in {first:?}"))
        .to_string();

    let shot = std::env::var_os("PALISADE_UI_SCREENSHOT")
        .map_or_else(|| root.path().join("ui.png"), |p| Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p));
    let mut node = Command::new("node")
        .arg(browser_dir().join("ui_check.mjs"))
        .arg(&url)
        .arg(&shot)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node starts");
    let node_lines = lines(&mut node);
    let node_pid = node.id();
    started.children.push(node);
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut result = None;
    while result.is_none() && Instant::now() < deadline {
        match node_lines.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
                if let Some(pid) = v["chromium_pid"].as_i64() {
                    started.chromium = i32::try_from(pid).ok();
                }
                if v.get("result").is_some() {
                    result = Some(v["result"].clone());
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let node = started.children.iter_mut().find(|c| c.id() == node_pid).unwrap();
    let status = loop {
        if let Some(s) = node.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    if let Some(mut e) = node.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    assert!(status.is_some_and(|s| s.success()), "the browser check failed ({status:?}):\n{stderr}");
    let r = result.unwrap_or_else(|| panic!("the browser check printed no result:\n{stderr}"));

    // The map: an allowed and two dropped connections into backend, coloured apart; the
    // connection that other's egress forwarded and backend's ingress dropped is one
    // dropped edge, not also a forwarded one.
    assert_eq!(r["allowed_edge_count"], 1, "{r:#}");
    assert_eq!(r["dropped_edge_count"], 1, "{r:#}");
    assert_eq!(r["dropped_other_edge_count"], 1, "{r:#}");
    assert_eq!(r["other_forwarded_edges"], 0, "{r:#}");
    assert!(r["dropped_edge_records"].as_u64().unwrap() >= 2, "egress + ingress records: {r:#}");
    assert_ne!(r["allowed_edge_colour"], r["dropped_edge_colour"], "{r:#}");
    // The drop, opened: the flow record's policy and `policy explain`'s default deny.
    assert!(r["edge_row_verdicts"].as_array().unwrap().contains(&"DROPPED".into()), "{r:#}");
    assert_eq!(r["drop_title"], "drop default/frontend → default/backend", "{r:#}");
    assert!(
        r["drop_decided_by"]
            .as_str()
            .unwrap()
            .contains("CiliumNetworkPolicy default/allow-frontend-to-backend (default deny)"),
        "{r:#}"
    );
    assert_eq!(r["explain_ingress_decision"], "default-deny", "{r:#}");
    assert_eq!(r["default_deny_by"], serde_json::json!(["CiliumNetworkPolicy default/allow-frontend-to-backend"]));
    // The pod panel.
    assert_eq!(r["pod_title"], "pod default/backend", "{r:#}");
    assert_eq!(r["pod_policies"], serde_json::json!(["CiliumNetworkPolicy default/allow-frontend-to-backend"]));
    assert!(r["pod_entries"].as_u64().unwrap() >= 1, "{r:#}");
    let backend = state.ends.iter().find(|e| e.name == "default/backend").map(|e| e.ipv4.unwrap().to_string());
    if let Some(ip) = backend {
        assert!(r["pod_panel"].as_str().unwrap().contains(&ip), "{r:#}");
    }
    // The filters, and the page's own health.
    assert_eq!(r["filtered_verdicts"], serde_json::json!(["DROPPED"]), "{r:#}");
    assert!(r["bad_filter_error"].as_str().unwrap().contains("--verdikt"), "{r:#}");
    assert_eq!(r["page_errors"], serde_json::json!([]), "{r:#}");
    assert_eq!(r["foreign_requests"], serde_json::json!([]), "assets come from the binary only: {r:#}");
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot at {}", shot.display());
    drop(started);
    eprintln!("ui test: {:.1} s (testbed up, probes, page, browser)", started_at.elapsed().as_secs_f64());
}
