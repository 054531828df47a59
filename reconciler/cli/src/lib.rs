//! The `palisade` CLI's library part: offline `policy explain` of a testbed scenario
//! ([`offline`]), the flags and lines of `palisade observe` ([`observe`]), and the web page
//! of `palisade ui` ([`ui`]). The testbed uses the same functions to register a scenario
//! with a real agent, so the offline answer and the kernel's verdicts can be compared probe
//! by probe.
pub mod observe;
pub mod offline;
pub mod ui;
