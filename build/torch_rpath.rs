//! Shared build script of every crate that links libtorch: embeds an rpath to the libtorch that
//! tch was built against, so binaries and test executables run without LD_LIBRARY_PATH, and keeps
//! libtorch_cuda linked (`--as-needed` would drop it, and CUDA would then look unavailable).
//! A crate with more to build includes it as a module and calls its `main`.
use std::path::PathBuf;
use std::process::Command;

/// The root of the libtorch that tch builds against: `LIBTORCH`, else the venv's torch package.
fn torch_root() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("LIBTORCH") {
        return Some(PathBuf::from(dir));
    }
    let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python".into());
    let out = Command::new(python)
        .args([
            "-c",
            "import os, torch; print(os.path.dirname(torch.__file__))",
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn torch_lib_dir() -> Option<PathBuf> {
    torch_root().map(|root| root.join("lib"))
}

/// Header directories for C++ built against libtorch (as torch-sys builds its own), or `None`
/// where libtorch is not found.
#[allow(dead_code)] // Only crates with C++ of their own call it.
pub fn torch_include_dirs() -> Option<Vec<PathBuf>> {
    let include = torch_root()?.join("include");
    Some(vec![include.join("torch/csrc/api/include"), include])
}

pub fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    println!("cargo:rerun-if-env-changed=PYTHON_SYS_EXECUTABLE");
    let Some(lib) = torch_lib_dir() else {
        println!("cargo:warning=libtorch not found: run launch/setup.sh (binaries will need LD_LIBRARY_PATH)");
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
