//! Results of a run and their two renderings: the human truth table and the JSON document
//! of the spec (`{"scenarios":[{"name","file","probes":[...]}]}`).
use std::fmt::Write as _;

use serde::Serialize;

use crate::scenario::{Expect, IpFamily};

/// What a probe observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Observed {
    Allow,
    Deny,
    /// Passed, with an AUDIT verdict reported for it (audit mode).
    Audit,
    Error,
}

impl Observed {
    pub fn as_str(self) -> &'static str {
        match self {
            Observed::Allow => "allow",
            Observed::Deny => "deny",
            Observed::Audit => "audit",
            Observed::Error => "error",
        }
    }
}

/// One probe's row.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeResult {
    pub from: String,
    pub to: String,
    pub port: Option<u16>,
    pub protocol: String,
    /// Which addresses the probe used (shown in the table for IPv6).
    #[serde(skip)]
    pub family: IpFamily,
    pub expect: Expect,
    pub observed: Observed,
    /// Why: what decided (policies, default deny, not enforced) or what went wrong.
    pub detail: Option<String>,
    pub ms: u64,
    /// Short form of what decided, for the table's column.
    #[serde(skip)]
    pub decided_by: String,
    /// Scenarios with several nodes: which node judged each side.
    #[serde(rename = "nodes", skip_serializing_if = "Option::is_none")]
    pub judged: Option<JudgedOn>,
    /// `run --flows`: the flow records the agents emitted for the probe (Hubble's JSON).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub flows: Vec<palisade_api::flow::Flow>,
}

/// Which node judged a probe's sides: the source's node its egress, the destination's its
/// ingress (`None`: that end is no enforced pod: a node, a host-network pod, a world host).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct JudgedOn {
    pub egress: Option<String>,
    pub ingress: Option<String>,
}

impl JudgedOn {
    /// `egress node-a, ingress node-b` (the table's column).
    pub fn text(&self) -> String {
        let parts: Vec<String> = [("egress", &self.egress), ("ingress", &self.ingress)]
            .into_iter()
            .filter_map(|(side, node)| node.as_ref().map(|n| format!("{side} {n}")))
            .collect();
        if parts.is_empty() { "-".into() } else { parts.join(", ") }
    }
}

impl ProbeResult {
    pub fn passed(&self) -> bool {
        matches!(
            (self.expect, self.observed),
            (Expect::Allow, Observed::Allow) | (Expect::Deny, Observed::Deny) | (Expect::Audit, Observed::Audit)
        )
    }
}

/// One scenario's results.
#[derive(Clone, Debug, Serialize)]
pub struct ScenarioReport {
    pub name: String,
    pub file: String,
    pub probes: Vec<ProbeResult>,
    /// Checks other than probes that failed (manifest expectations): they fail the run.
    #[serde(skip)]
    pub failures: Vec<String>,
    /// Things to know (agent warnings, debug modes).
    #[serde(skip)]
    pub notes: Vec<String>,
}

impl ScenarioReport {
    pub fn passed(&self) -> usize {
        self.probes.iter().filter(|p| p.passed()).count()
    }
    pub fn failed(&self) -> usize {
        self.probes.len() - self.passed()
    }
    pub fn ok(&self) -> bool {
        self.failed() == 0 && self.failures.is_empty()
    }
}

/// The `--json` document.
#[derive(Serialize)]
pub struct JsonDocument<'a> {
    pub scenarios: &'a [ScenarioReport],
}

pub fn json(reports: &[ScenarioReport]) -> String {
    serde_json::to_string_pretty(&JsonDocument { scenarios: reports }).expect("reports serialize")
}

/// The human truth table of one scenario (with several nodes, a column says which node
/// judged each side).
pub fn table(r: &ScenarioReport) -> String {
    let nodes = r.probes.iter().any(|p| p.judged.is_some());
    let mut header = vec!["#", "FROM", "TO", "PORT/PROTO", "EXPECT", "OBSERVED", "DECIDED BY", "MS", ""];
    if nodes {
        header.insert(7, "JUDGED ON");
    }
    let rows: Vec<Vec<String>> = r
        .probes
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut row = vec![
                (i + 1).to_string(),
                p.from.clone(),
                p.to.clone(),
                match (p.port, p.family) {
                    (Some(port), IpFamily::IPv6) => format!("{port}/{} v6", p.protocol),
                    (Some(port), IpFamily::IPv4) => format!("{port}/{}", p.protocol),
                    (None, _) => p.protocol.clone(),
                },
                p.expect.as_str().to_string(),
                p.observed.as_str().to_string(),
                p.decided_by.clone(),
                p.ms.to_string(),
                if p.passed() { "ok".into() } else { "FAIL".into() },
            ];
            if nodes {
                row.insert(7, p.judged.as_ref().map_or_else(|| "-".into(), JudgedOn::text));
            }
            row
        })
        .collect();
    let ms_column = if nodes { 8 } else { 7 };
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let _ = writeln!(out, "scenario {} ({})", r.name, r.file);
    let line = |cells: &[String]| {
        let mut s = String::from(" ");
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            let w = *w;
            // Numbers right-aligned, text left-aligned.
            if i == 0 || i == ms_column {
                let _ = write!(s, " {cell:>w$}");
            } else {
                let _ = write!(s, " {cell:<w$}");
            }
        }
        s.trim_end().to_string()
    };
    let header: Vec<String> = header.into_iter().map(String::from).collect();
    let _ = writeln!(out, "{}", line(&header));
    for (row, p) in rows.iter().zip(&r.probes) {
        let _ = writeln!(out, "{}", line(row));
        for f in &p.flows {
            let _ = writeln!(out, "      flow {}", palisade_cli::observe::compact_line(f));
        }
        if !p.passed()
            && let Some(d) = &p.detail
        {
            let _ = writeln!(out, "      {d}");
        }
    }
    for f in &r.failures {
        let _ = writeln!(out, "  FAIL: {f}");
    }
    for n in &r.notes {
        let _ = writeln!(out, "  note: {n}");
    }
    out
}

/// `N passed, N failed` over all scenarios.
pub fn summary(reports: &[ScenarioReport]) -> String {
    let passed: usize = reports.iter().map(ScenarioReport::passed).sum();
    let failed: usize = reports.iter().map(|r| r.failed() + r.failures.len()).sum();
    format!("{passed} passed, {failed} failed")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> ScenarioReport {
        ScenarioReport {
            name: "s".into(),
            file: "s.yaml".into(),
            probes: vec![
                ProbeResult {
                    from: "default/a".into(),
                    to: "default/b".into(),
                    port: Some(8080),
                    protocol: "TCP".into(),
                    family: IpFamily::IPv4,
                    expect: Expect::Allow,
                    observed: Observed::Allow,
                    detail: Some("not enforced".into()),
                    ms: 1,
                    decided_by: "not enforced".into(),
                    judged: None,
                    flows: Vec::new(),
                },
                ProbeResult {
                    from: "default/a".into(),
                    to: "default/b".into(),
                    port: None,
                    protocol: "ICMP".into(),
                    family: IpFamily::IPv4,
                    expect: Expect::Deny,
                    observed: Observed::Error,
                    detail: Some("unexplained loss".into()),
                    ms: 1000,
                    decided_by: "-".into(),
                    judged: None,
                    flows: Vec::new(),
                },
            ],
            failures: vec![],
            notes: vec![],
        }
    }

    #[test]
    fn json_has_exactly_the_spec_keys() {
        let v: serde_json::Value = serde_json::from_str(&json(&[report()])).unwrap();
        let s = &v["scenarios"][0];
        let mut keys: Vec<_> = s.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["file", "name", "probes"]);
        let mut pkeys: Vec<_> = s["probes"][0].as_object().unwrap().keys().cloned().collect();
        pkeys.sort();
        assert_eq!(pkeys, ["detail", "expect", "from", "ms", "observed", "port", "protocol", "to"]);
        assert_eq!(s["probes"][1]["port"], serde_json::Value::Null);
        assert_eq!(s["probes"][1]["observed"], "error");
        assert_eq!(s["probes"][0]["expect"], "allow");
    }

    #[test]
    fn several_nodes_add_which_node_judged_each_side() {
        let mut r = report();
        r.probes[0].judged = Some(JudgedOn { egress: Some("node-a".into()), ingress: Some("node-b".into()) });
        r.probes[1].judged = Some(JudgedOn { egress: None, ingress: Some("node-b".into()) });
        let t = table(&r);
        assert!(t.contains("JUDGED ON"), "{t}");
        assert!(t.contains("egress node-a, ingress node-b"), "{t}");
        let v: serde_json::Value = serde_json::from_str(&json(&[r])).unwrap();
        let p = &v["scenarios"][0]["probes"];
        assert_eq!(p[0]["nodes"], serde_json::json!({"egress": "node-a", "ingress": "node-b"}));
        assert_eq!(p[1]["nodes"]["egress"], serde_json::Value::Null);
        assert!(!table(&report()).contains("JUDGED ON"));
    }

    #[test]
    fn table_marks_failures_and_summary_counts() {
        let t = table(&report());
        assert!(t.contains("8080/TCP"));
        assert!(t.contains("FAIL"));
        assert!(t.contains("unexplained loss"));
        assert_eq!(summary(&[report()]), "1 passed, 1 failed");
    }
}
