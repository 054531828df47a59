//! The one place that decides how a test behaves when what it needs is missing (root, for
//! eBPF and network namespaces; a Docker engine, for the container tests). Every
//! `*_privileged*` test of the agent, the CNI plugin and the testbed starts with
//! [`require_root!`] (or calls [`has_root`] / [`skip`]; the agent's kernel tests, whose
//! shared set-up makes the pin directory, call [`require_root_for_this_binary`] there):
//!
//! - with what it needs, the test runs;
//! - without, it prints `skipped: needs root (<test>)` on stderr and passes, so a plain
//!   `cargo test` as a user runs the pure tests and says what it left out;
//! - with `CI=true` in the environment (as CI runs `.ci/run`), a skip is a failure: CI
//!   must never go green on tests that did not run.
//!
//! To see both without changing user: run a test binary as nobody
//! (`setpriv --reuid=65534 --regid=65534 --clear-groups <test binary> <test name>`), with and
//! without `CI=true`.

pub mod etcd;

/// Whether skips are failures here: `CI` is `true` or `1` (any case), as CI systems set it.
pub fn skips_fail() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// The running test's name, as the test harness names its thread (`None` when the test
/// runs on the main thread).
fn test_name() -> Option<String> {
    std::thread::current().name().filter(|n| *n != "main").map(str::to_string)
}

/// Reports that the running test cannot run because of `reason` (`needs root`, `no Docker
/// engine can run here: ...`): prints `skipped: <reason> (<test>)` and returns, or panics
/// with the same words when [`skips_fail`].
pub fn skip(reason: &str) {
    let test = test_name().map(|n| format!(" ({n})")).unwrap_or_default();
    assert!(
        !skips_fail(),
        "skipped: {reason}{test}, and CI=true makes a skipped test a failure: run the tests where they can run \
         (as root: sudo ./ci/test.sh)"
    );
    say(&format!("skipped: {reason}{test}"));
}

/// A line on stderr that the test harness does not capture (it captures `eprintln!` of
/// passing tests): a skip must be seen in a plain `cargo test`.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// True when the process runs as root (effective uid 0). Otherwise reports the skip
/// ([`skip`]: a panic under `CI=true`) and answers false.
pub fn has_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        return true;
    }
    skip("needs root");
    false
}

/// True when bpffs is there (`/sys/fs/bpf`; `ci/setup.sh` mounts it). Otherwise reports the
/// skip ([`skip`]) and answers false.
pub fn has_bpffs() -> bool {
    if std::path::Path::new("/sys/fs/bpf").is_dir() {
        return true;
    }
    skip("needs bpffs mounted at /sys/fs/bpf (ci/setup.sh mounts it)");
    false
}

/// For set-up that every test of a test binary shares and that cannot make its caller
/// return (a constructor): unless root, reports the skip as [`has_root`] does (a panic
/// under `CI=true`) and ends the whole test binary there, successfully, since none of its
/// tests can run.
pub fn require_root_for_this_binary() {
    if !has_root() {
        say("skipped: every test of this binary needs root");
        std::process::exit(0);
    }
}

/// Returns from the calling test (with `()`, or with the value given) unless it runs as
/// root; see [`has_root`].
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::has_root() {
            return;
        }
    };
    ($otherwise:expr) => {
        if !$crate::has_root() {
            return $otherwise;
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    // The environment is process-wide: one test changes it, in order.
    #[test]
    fn a_skip_prints_and_passes_but_fails_under_ci() {
        // SAFETY: no other test of this crate reads or writes the environment.
        unsafe { std::env::remove_var("CI") };
        assert!(!skips_fail());
        skip("needs a test");
        for (value, fails) in [("true", true), ("TRUE", true), ("1", true), ("false", false), ("", false)] {
            // SAFETY: as above.
            unsafe { std::env::set_var("CI", value) };
            assert_eq!(skips_fail(), fails, "CI={value:?}");
            let outcome = std::panic::catch_unwind(|| skip("needs a test"));
            assert_eq!(outcome.is_err(), fails, "CI={value:?}");
        }
        // SAFETY: as above.
        unsafe { std::env::remove_var("CI") };
    }
}
