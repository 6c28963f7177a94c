//! Compiles the kernel programs (C) with clang for the BPF target and leaves
//! the object in OUT_DIR, where `src/lib.rs` embeds it.

use std::{env, path::PathBuf, process::Command};

use anyhow::{Context, bail};

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let out = PathBuf::from(env::var("OUT_DIR").context("OUT_DIR")?);
    let src = manifest.join("bpf/meshbypass.bpf.c");
    let include = manifest.join("bpf/include");
    let obj = out.join("meshbypass.bpf.o");
    let clang = env::var("MESHBYPASS_CLANG").unwrap_or_else(|_| "clang".to_owned());
    // uapi headers include <asm/types.h>, which Debian keeps under the
    // multiarch directory of the build host.
    let multiarch = format!("/usr/include/{}-linux-gnu", env::consts::ARCH);

    println!("cargo:rerun-if-changed={}", src.display());
    println!(
        "cargo:rerun-if-changed={}",
        include.join("meshbypass_maps.h").display()
    );
    println!("cargo:rerun-if-env-changed=MESHBYPASS_CLANG");

    let status = Command::new(&clang)
        .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"])
        .arg("-I")
        .arg(&include)
        .arg("-I")
        .arg(&multiarch)
        .arg("-c")
        .arg(&src)
        .arg("-o")
        .arg(&obj)
        .status()
        .with_context(|| {
            format!("cannot run {clang}: install clang, libbpf-dev and linux-libc-dev (scripts/deps.sh)")
        })?;
    if !status.success() {
        bail!("{clang} failed to compile {} ({status})", src.display());
    }
    Ok(())
}
