//! Plans in words, one line per map operation in the order they are written
//! ([`Plan::describe`]), for logs and snapshots; and keys in words for the CLI.
use std::net::{Ipv4Addr, Ipv6Addr};

use palisade_common::{
    EndpointInfo, IpcacheValue, Ipv4Prefix, Ipv6Prefix, POLICY_PREFIX_FIXED, POLICY_PREFIX_PROTO, PolicyLengthsKey,
    PolicyValue, direction, policy_flags, policy_length_bit,
};

use super::plan::{Part, Room, Step, Writes};
use super::table::{MapVisitor, Plan, TableMap};
use super::{PolicyMapKey, V4Key, V6Key};

/// A map's keys in plan lines.
pub trait DescribeKey {
    /// What an entry of the map is called: `add <NOUN> <key>...`.
    const NOUN: &'static str;
    fn describe(&self) -> String;
    /// The verb of a step's lines.
    fn verb(part: Part) -> &'static str {
        match part {
            Part::Adds | Part::LateAdds => "add",
            Part::Updates => "update",
            Part::Narrowed => "narrow",
            Part::Deletes => "delete",
        }
    }
}

/// A map's values in plan lines: what follows the key.
pub trait DescribeValue {
    fn describe(&self) -> String;
}

impl Plan {
    /// One line per operation, in the order the map writer applies them
    /// ([`Plan::steps`]), for logs and snapshots.
    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        for step in Plan::steps() {
            step.map.visit(DescribeStep { plan: self, step, out: &mut out });
        }
        out
    }
}

struct DescribeStep<'a> {
    plan: &'a Plan,
    step: Step,
    out: &'a mut Vec<String>,
}

impl MapVisitor for DescribeStep<'_> {
    type Output = ();
    fn visit<M: TableMap>(self, _: M) {
        let (verb, noun) = (M::Key::verb(self.step.part), M::Key::NOUN);
        match self.step.writes::<M>(self.plan, &Room::UNLIMITED) {
            Writes::Upserts(entries) => {
                for (k, v) in entries {
                    self.out.push(format!("{verb} {noun} {}{}", k.describe(), v.describe()));
                }
            }
            Writes::Deletes(keys) => {
                for k in keys {
                    self.out.push(format!("{verb} {noun} {}", k.describe()));
                }
            }
        }
    }
}

/// ENDPOINTS keys: host-side interface indexes.
impl DescribeKey for u32 {
    const NOUN: &'static str = "endpoint";
    fn describe(&self) -> String {
        format!("if{self}")
    }
}

impl DescribeValue for EndpointInfo {
    fn describe(&self) -> String {
        format!(" id={} identity={} flags={:#x}", self.endpoint_id, self.identity, self.flags)
    }
}

impl DescribeKey for V4Key {
    const NOUN: &'static str = "ipcache";
    fn describe(&self) -> String {
        format!("{}/{}", Ipv4Addr::from(self.1.addr), self.0)
    }
}

impl DescribeKey for V6Key {
    const NOUN: &'static str = "ipcache";
    fn describe(&self) -> String {
        format!("{}/{}", Ipv6Addr::from(self.1.addr), self.0)
    }
}

impl DescribeKey for Ipv4Prefix {
    const NOUN: &'static str = "ipcache";
    fn describe(&self) -> String {
        format!("{}/32", Ipv4Addr::from(self.addr))
    }
}

impl DescribeKey for Ipv6Prefix {
    const NOUN: &'static str = "ipcache";
    fn describe(&self) -> String {
        format!("{}/128", Ipv6Addr::from(self.addr))
    }
}

impl DescribeValue for IpcacheValue {
    fn describe(&self) -> String {
        format!(" -> {}", self.identity)
    }
}

impl DescribeKey for PolicyMapKey {
    const NOUN: &'static str = "policy";
    fn describe(&self) -> String {
        describe_policy_key(self)
    }
}

impl DescribeValue for PolicyValue {
    fn describe(&self) -> String {
        let action = if self.flags & policy_flags::DENY != 0 { "deny" } else { "allow" };
        format!(" -> {action} cookie {}", self.cookie)
    }
}

impl DescribeKey for PolicyLengthsKey {
    const NOUN: &'static str = "policy lengths";
    fn describe(&self) -> String {
        describe_lengths_key(self)
    }
    /// Bitmaps are set (widened) before the deletes and narrowed after them.
    fn verb(part: Part) -> &'static str {
        match part {
            Part::Adds | Part::LateAdds | Part::Updates => "set",
            Part::Narrowed => "narrow",
            Part::Deletes => "delete",
        }
    }
}

/// `POLICY_LENGTHS` values: bitmaps of prefix lengths.
impl DescribeValue for u32 {
    fn describe(&self) -> String {
        format!(" -> {}", describe_lengths(*self))
    }
}

/// A policy key in words: `ep 3 ingress identity 257 TCP/8080`.
pub fn describe_policy_key((prefix, k): &PolicyMapKey) -> String {
    let dir = if k.direction == direction::INGRESS { "ingress" } else { "egress" };
    let id = match k.identity() {
        0 => "any".to_string(),
        n => n.to_string(),
    };
    let l4 = if *prefix <= POLICY_PREFIX_FIXED {
        "any".to_string()
    } else {
        let proto = crate::monitor::protocol_name(k.protocol);
        let port_bits = prefix - POLICY_PREFIX_PROTO;
        match port_bits {
            0 => format!("{proto}/any"),
            16 => format!("{proto}/{}", k.dport()),
            b => {
                let lo = k.dport();
                let hi = lo | (u16::MAX >> b);
                format!("{proto}/{lo}-{hi}")
            }
        }
    };
    let view = if k.view == palisade_common::policy_view::AUDIT { " (audit view)" } else { "" };
    format!("ep {} {dir} identity {id} {l4}{view}", k.endpoint_id())
}

/// A `POLICY_LENGTHS` key in words: `ep 3 ingress identity 257`.
pub fn describe_lengths_key(k: &PolicyLengthsKey) -> String {
    let dir = if k.direction == direction::INGRESS { "ingress" } else { "egress" };
    let id = match k.identity() {
        0 => "any".to_string(),
        n => n.to_string(),
    };
    let view = if k.view == palisade_common::policy_view::AUDIT { " (audit view)" } else { "" };
    format!("ep {} {dir} identity {id}{view}", k.endpoint_id())
}

/// A `POLICY_LENGTHS` bitmap in words: `/64 /72 /88`.
fn describe_lengths(bits: u32) -> String {
    let lens: Vec<String> = (POLICY_PREFIX_FIXED..=palisade_common::POLICY_PREFIX_FULL)
        .filter(|l| bits & policy_length_bit(*l) != 0)
        .map(|l| format!("/{l}"))
        .collect();
    lens.join(" ")
}
