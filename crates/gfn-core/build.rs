//! The torch rpath of every libtorch crate, and the Transformer's CPU attention and affine
//! layers (`src/estimators/attention.cpp`, `linear.cpp`), libtorch autograd functions compiled
//! against the same headers as torch-sys compiles its own C++.

#[path = "../../build/torch_rpath.rs"]
mod torch_rpath;

const KERNELS: [&str; 2] = ["src/estimators/attention.cpp", "src/estimators/linear.cpp"];

fn main() {
    torch_rpath::main();
    for file in KERNELS.iter().chain(&["src/estimators/vectors.h"]) {
        println!("cargo:rerun-if-changed={file}");
    }
    let Some(includes) = torch_rpath::torch_include_dirs() else {
        panic!("libtorch not found: run launch/setup.sh (it installs the pinned torch)");
    };
    cc::Build::new()
        .cpp(true)
        .files(KERNELS)
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
