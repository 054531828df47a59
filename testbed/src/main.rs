//! `palisade-testbed`: see the library.
fn main() -> std::process::ExitCode {
    palisade_testbed::main()
}
