//! The `palisade` CLI's library part: offline `policy explain` of a testbed scenario
//! ([`offline`]), and the flags and lines of `palisade observe` ([`observe`]). The testbed uses the same functions to register a scenario with a real
//! agent, so the offline answer and the kernel's verdicts can be compared probe by probe.
pub mod observe;
pub mod offline;
