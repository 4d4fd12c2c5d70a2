//! The torch rpath of every libtorch crate, and the Transformer's CPU attention
//! (`src/estimators/attention.cpp`), a libtorch autograd function compiled against the same
//! headers as torch-sys compiles its own C++.

#[path = "../../build/torch_rpath.rs"]
mod torch_rpath;

const ATTENTION: &str = "src/estimators/attention.cpp";

fn main() {
    torch_rpath::main();
    println!("cargo:rerun-if-changed={ATTENTION}");
    let Some(includes) = torch_rpath::torch_include_dirs() else {
        panic!("libtorch not found: run launch/setup.sh (it installs the pinned torch)");
    };
    cc::Build::new()
        .cpp(true)
        .file(ATTENTION)
        .includes(includes)
        .flag("-std=c++17")
        // torch 2.x wheels use the C++11 ABI, as torch-sys assumes by default.
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .flag_if_supported("-Wno-unused-parameter")
        // Vector helpers pass 32-byte values between inline functions of this file only.
        .flag_if_supported("-Wno-psabi")
        // Lets the loops' rounding and square roots vectorise (no errno to set).
        .flag("-fno-math-errno")
        .opt_level(3)
        .compile("gfn_attention");
}
