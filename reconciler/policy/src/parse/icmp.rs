//! ICMP and ICMPv6 types as Cilium's `icmps` fields name them: a number from 0 to 255 or
//! one of the names Cilium knows.

use super::Invalid;
use super::raw::PortValue;

/// ICMP (IPv4) type names.
const ICMP_V4: &[(&str, u8)] = &[
    ("EchoReply", 0),
    ("DestinationUnreachable", 3),
    ("Redirect", 5),
    ("Echo", 8),
    ("EchoRequest", 8),
    ("RouterAdvertisement", 9),
    ("RouterSelection", 10),
    ("TimeExceeded", 11),
    ("ParameterProblem", 12),
    ("Timestamp", 13),
    ("TimestampReply", 14),
    ("Photuris", 40),
    ("ExtendedEchoRequest", 42),
    ("ExtendedEchoReply", 43),
];

/// ICMPv6 type names.
const ICMP_V6: &[(&str, u8)] = &[
    ("DestinationUnreachable", 1),
    ("PacketTooBig", 2),
    ("TimeExceeded", 3),
    ("ParameterProblem", 4),
    ("EchoRequest", 128),
    ("EchoReply", 129),
    ("MulticastListenerQuery", 130),
    ("MulticastListenerReport", 131),
    ("MulticastListenerDone", 132),
    ("RouterSolicitation", 133),
    ("RouterAdvertisement", 134),
    ("NeighborSolicitation", 135),
    ("NeighborAdvertisement", 136),
    ("RedirectMessage", 137),
    ("RouterRenumbering", 138),
    ("ICMPNodeInformationQuery", 139),
    ("ICMPNodeInformationResponse", 140),
    ("InverseNeighborDiscoverySolicitation", 141),
    ("InverseNeighborDiscoveryAdvertisement", 142),
    ("HomeAgentAddressDiscoveryRequest", 144),
    ("HomeAgentAddressDiscoveryReply", 145),
    ("MobilePrefixSolicitation", 146),
    ("MobilePrefixAdvertisement", 147),
    ("DuplicateAddressRequestCodeSuffix", 157),
    ("DuplicateAddressConfirmationCodeSuffix", 158),
    ("ExtendedEchoRequest", 160),
    ("ExtendedEchoReply", 161),
];

/// The type number of an `icmps` field.
pub(super) fn icmp_type(path: &str, value: &PortValue, v6: bool) -> Result<u8, Invalid> {
    let family = if v6 { "ICMPv6" } else { "ICMP" };
    let out_of_range = |n: &dyn std::fmt::Display| {
        Invalid::new(path, format!("{family} type {n} is out of range"), "ICMP types are 0 to 255")
    };
    match value {
        PortValue::Number(n) => u8::try_from(*n).map_err(|_| out_of_range(n)),
        PortValue::Text(t) if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) => {
            t.parse::<u8>().map_err(|_| out_of_range(t))
        }
        PortValue::Text(t) => {
            let table = if v6 { ICMP_V6 } else { ICMP_V4 };
            table.iter().find(|(name, _)| name == t).map(|(_, n)| *n).ok_or_else(|| {
                let other = if v6 { ICMP_V4 } else { ICMP_V6 };
                let hint = if other.iter().any(|(name, _)| name == t) {
                    format!("{t} is an {} type; set family accordingly", if v6 { "ICMP (IPv4)" } else { "ICMPv6" })
                } else {
                    let names: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
                    format!("use a number or one of {}", names.join(", "))
                };
                Invalid::new(path, format!("{t:?} is not an {family} type name"), hint)
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_names() {
        let v4 = |v: PortValue| icmp_type("p", &v, false);
        let v6 = |v: PortValue| icmp_type("p", &v, true);
        assert_eq!(v4(PortValue::Number(8)), Ok(8));
        assert_eq!(v4(PortValue::Text("8".into())), Ok(8));
        assert_eq!(v4(PortValue::Text("EchoRequest".into())), Ok(8));
        assert_eq!(v6(PortValue::Text("EchoRequest".into())), Ok(128));
        assert_eq!(v6(PortValue::Text("NeighborSolicitation".into())), Ok(135));
        assert!(v4(PortValue::Number(256)).is_err());
        assert!(v4(PortValue::Number(-1)).is_err());
        let e = v4(PortValue::Text("NeighborSolicitation".into())).unwrap_err();
        assert!(e.hint.contains("ICMPv6"), "{}", e.hint);
        assert!(v4(PortValue::Text("echo".into())).is_err(), "names are case-sensitive");
    }
}
