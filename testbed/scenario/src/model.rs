//! The scenario file as written: every key of the format, nothing else (unknown keys are
//! errors). Cross-checks live in `validate`.
use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Deserializer, Serialize};

/// A whole scenario file.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawScenario {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// Cluster name (label `io.cilium.k8s.policy.cluster`).
    #[serde(default)]
    pub cluster: Option<String>,
    #[serde(default)]
    pub ip_families: Option<Vec<IpFamily>>,
    /// The cluster's nodes (format 1.1); absent: one node, as in format 1.0.
    #[serde(default)]
    pub nodes: Option<Vec<RawNode>>,
    /// Namespace name -> its labels (`{}` or nothing for none).
    #[serde(default)]
    pub namespaces: BTreeMap<String, Option<BTreeMap<String, String>>>,
    #[serde(default)]
    pub pods: Vec<RawPod>,
    /// Full manifests, as a user would `kubectl apply` them.
    #[serde(default)]
    pub policies: Vec<serde_json::Value>,
    #[serde(default)]
    pub probes: Vec<RawProbe>,
    /// How the agent enforces policy (audit mode, enforcement switch); absent: defaults.
    #[serde(default)]
    pub agent: Option<RawAgent>,
}

/// The agent's policy switches for a scenario (its command line flags).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawAgent {
    /// `--policy-audit-mode`.
    #[serde(default)]
    pub policy_audit_mode: bool,
    /// `--policy-enforcement`: `default`, `always` or `never`.
    #[serde(default)]
    pub policy_enforcement: Option<String>,
}

/// A pod of the scenario.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawPod {
    pub name: String,
    /// Kubernetes' default namespace when absent.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    #[serde(default)]
    pub ipv6: Option<Ipv6Addr>,
    #[serde(default)]
    pub ports: Vec<PodPort>,
    /// The node the pod runs on (a name under `nodes`); the first node when absent.
    #[serde(default)]
    pub node: Option<String>,
    /// The pod is its node's host: it has the node's addresses and its ports are served in
    /// the node's namespace; it is not an endpoint the agent enforces.
    #[serde(default)]
    pub host_network: bool,
}

/// A node of the cluster (`nodes[]`).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawNode {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn default_namespace() -> String {
    "default".into()
}

/// A port a pod listens on.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodPort {
    #[serde(deserialize_with = "port_number")]
    pub port: u16,
    /// Kubernetes' default (TCP) when absent.
    #[serde(default)]
    pub protocol: PortProtocol,
    #[serde(default)]
    pub name: Option<String>,
}

/// One probe: a connection attempt and the verdict it must get.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProbe {
    pub from: String,
    pub to: String,
    #[serde(default, deserialize_with = "opt_port_number")]
    pub port: Option<u16>,
    /// TCP when absent, as in Kubernetes.
    #[serde(default)]
    pub protocol: ProbeProtocol,
    #[serde(default, alias = "icmpType")]
    pub icmp_type: Option<u8>,
    #[serde(default)]
    pub family: Option<IpFamily>,
    pub expect: Expect,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum IpFamily {
    IPv4,
    IPv6,
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpFamily::IPv4 => "IPv4",
            IpFamily::IPv6 => "IPv6",
        })
    }
}

/// Protocol of a pod's port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PortProtocol {
    #[default]
    TCP,
    UDP,
    SCTP,
}

impl fmt::Display for PortProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PortProtocol::TCP => "TCP",
            PortProtocol::UDP => "UDP",
            PortProtocol::SCTP => "SCTP",
        })
    }
}

/// Protocol of a probe.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ProbeProtocol {
    #[default]
    TCP,
    UDP,
    SCTP,
    ICMP,
    ICMPv6,
}

impl ProbeProtocol {
    /// The port protocol a listener needs for this probe (none for ICMP).
    pub fn port_protocol(self) -> Option<PortProtocol> {
        match self {
            ProbeProtocol::TCP => Some(PortProtocol::TCP),
            ProbeProtocol::UDP => Some(PortProtocol::UDP),
            ProbeProtocol::SCTP => Some(PortProtocol::SCTP),
            ProbeProtocol::ICMP | ProbeProtocol::ICMPv6 => None,
        }
    }

    pub fn is_icmp(self) -> bool {
        matches!(self, ProbeProtocol::ICMP | ProbeProtocol::ICMPv6)
    }

    /// The spelling of the format (and of the agent's monitor events).
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeProtocol::TCP => "TCP",
            ProbeProtocol::UDP => "UDP",
            ProbeProtocol::SCTP => "SCTP",
            ProbeProtocol::ICMP => "ICMP",
            ProbeProtocol::ICMPv6 => "ICMPv6",
        }
    }

    /// IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            ProbeProtocol::TCP => 6,
            ProbeProtocol::UDP => 17,
            ProbeProtocol::SCTP => 132,
            ProbeProtocol::ICMP => 1,
            ProbeProtocol::ICMPv6 => 58,
        }
    }
}

impl fmt::Display for ProbeProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The verdict a probe must get.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    Allow,
    Deny,
    /// Passes (as `allow`), and the datapath reports an AUDIT verdict for it: policy in
    /// audit mode would have dropped it.
    Audit,
}

impl Expect {
    pub fn as_str(self) -> &'static str {
        match self {
            Expect::Allow => "allow",
            Expect::Deny => "deny",
            Expect::Audit => "audit",
        }
    }
}

/// A port given as a number or as a numeric string (`"8080"`, as policies write them).
fn port_number<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    struct PortVisitor;
    impl serde::de::Visitor<'_> for PortVisitor {
        type Value = u16;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a port number (1-65535)")
        }
        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<u16, E> {
            u16::try_from(n)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| E::custom(format!("port {n} is out of range (1-65535)")))
        }
        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<u16, E> {
            match u64::try_from(n) {
                Ok(n) => self.visit_u64(n),
                Err(_) => Err(E::custom(format!("port {n} is out of range (1-65535)"))),
            }
        }
        fn visit_str<E: serde::de::Error>(self, t: &str) -> Result<u16, E> {
            match t.trim().parse::<u64>() {
                Ok(n) => self.visit_u64(n),
                Err(_) => Err(E::custom(format!("port {t:?} is not a number"))),
            }
        }
    }
    d.deserialize_any(PortVisitor)
}

fn opt_port_number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    port_number(d).map(Some)
}
