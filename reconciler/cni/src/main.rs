//! `palisade-cni`: CNI plugin (spec 1.0: ADD, DEL, CHECK, VERSION). Creates the pod's veth
//! pair and addresses (IPAM delegated to the plugin named in `ipam.type`), routes the pod's
//! addresses to the host-side veth, and registers the endpoint with the local palisade
//! agent. The logic lives in the library (`palisade_cni`).
use std::io::Read;

fn main() -> std::process::ExitCode {
    let mut stdin = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let env: std::collections::BTreeMap<String, String> = std::env::vars().collect();
    let (code, out) = palisade_cni::main(&env, &stdin);
    println!("{out}");
    std::process::ExitCode::from(code)
}
