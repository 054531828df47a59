//! palisade's policy model and resolution, pure: no kernel, Kubernetes or actor crate.
//!
//! - [`labels`]: labels, label sets, the labels derived for a pod.
//! - [`selector`]: label selectors (`matchLabels`, `matchExpressions`, source prefixes).
//! - [`cidr`]: prefixes, CIDR blocks, CIDR identities, ipBlock membership labels.
//! - [`identity`]: label set -> numeric identity, reference counted.
//! - [`model`]: the one internal rule model every policy kind translates into.
//! - [`parse`]: manifests -> policies, or errors with field paths.
//! - [`resolve`]: policies x endpoints x identities -> desired policy entries.
//! - [`yaml`]: YAML in and out (with the parser's limits), for every crate.

pub mod cidr;
pub mod explain;
pub mod identity;
pub mod labels;
pub mod model;
pub mod parse;
pub mod ports;
pub mod resolve;
pub mod selector;
#[doc(hidden)]
pub mod synth;
pub mod tiers;
pub mod yaml;

pub use cidr::{CidrBlock, CidrIdentities, Prefix};
pub use identity::IdentityAllocator;
pub use labels::{Label, LabelSet};
pub use model::{Direction, Entity, NamedPort, Policy, PolicyKind, Protocol};
pub use parse::{ManifestOutcome, ParseError, PolicyError, parse_manifest_bytes, parse_manifests};
pub use resolve::{
    DesiredState, EndpointPolicy, EndpointView, EntryKey, EntryValue, PolicyResolver, RuleOrigin, resolve,
    resolve_full, resolve_on_node,
};
pub use selector::EndpointSelector;
