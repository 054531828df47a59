//! Builds the eBPF programs (ebpf/programs) for `bpfel-unknown-none` with a nested cargo,
//! so that a plain `cargo build` of the agent carries its datapath. The nested build uses
//! its own target directory (`<target>/bpf`, shared by every outer profile) and is the only
//! place `RUSTC_BOOTSTRAP=1` (needed for `-Z build-std=core`) is set.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let root = manifest_dir.join("../..").canonicalize().expect("workspace root");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    // OUT_DIR = <target>/<profile>/build/<pkg>-<hash>/out
    let target_dir = out_dir.ancestors().nth(4).map_or_else(|| root.join("target"), Path::to_path_buf);
    let bpf_target_dir = target_dir.join("bpf");

    for p in ["ebpf/programs/src", "ebpf/programs/Cargo.toml", "ebpf/common/src", "ebpf/common/Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    println!("cargo:rerun-if-env-changed=PALISADE_EBPF_OBJECT");

    let object = if let Ok(prebuilt) = env::var("PALISADE_EBPF_OBJECT") {
        PathBuf::from(prebuilt)
    } else {
        let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
        let rustflags =
            [format!("--cfg=bpf_target_arch=\"{arch}\""), "-Cdebuginfo=2".into(), "-Clink-arg=--btf".into()]
                .join("\x1f");
        let mut cmd = Command::new(cargo);
        cmd.current_dir(&root)
            .args([
                "build",
                "--package",
                "palisade-ebpf",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
            ])
            .arg("--target-dir")
            .arg(&bpf_target_dir)
            .env("RUSTC_BOOTSTRAP", "1")
            .env("CARGO_ENCODED_RUSTFLAGS", rustflags);
        for var in
            ["RUSTC", "RUSTC_WRAPPER", "RUSTC_WORKSPACE_WRAPPER", "RUSTFLAGS", "CARGO_TARGET_DIR", "CARGO_BUILD_TARGET"]
        {
            cmd.env_remove(var);
        }
        // Nested cargo would otherwise inherit the outer build's profile and jobserver
        // settings meant for the host build.
        for (k, _) in env::vars() {
            if k.starts_with("CARGO_PROFILE_") || k.starts_with("CARGO_CFG_") || k.starts_with("CARGO_FEATURE_") {
                cmd.env_remove(k);
            }
        }
        let status = cmd
            .status()
            .unwrap_or_else(|e| panic!("could not run cargo to build the eBPF programs: {e}; run ci/setup.sh first"));
        assert!(
            status.success(),
            "building the eBPF programs failed ({status}). They need the rust-src component and \
             bpf-linker built against rustc's LLVM: run ci/setup.sh (it installs both)."
        );
        bpf_target_dir.join("bpfel-unknown-none/release/palisade-ebpf")
    };
    let dest = out_dir.join("palisade-ebpf.o");
    std::fs::copy(&object, &dest)
        .unwrap_or_else(|e| panic!("copying eBPF object {} to {}: {e}", object.display(), dest.display()));
}
