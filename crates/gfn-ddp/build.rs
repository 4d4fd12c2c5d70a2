//! The torch rpath of every libtorch crate, and for the MPI backend a one-line C shim: the value
//! of `MPI_IN_PLACE` is a macro that differs between MPI implementations (Open MPI: 1, MPICH: -1)
//! and rsmpi does not export it, so it is read from the `mpi.h` that rsmpi itself builds with.

#[path = "../../build/torch_rpath.rs"]
mod torch_rpath;

fn main() {
    torch_rpath::main();
    #[cfg(feature = "mpi")]
    mpi_in_place();
    #[cfg(feature = "gloo")]
    gloo_shim();
}

/// The C++ shim over gloo (Debian's libgloo-dev). libtorch exports a gloo of its own, of
/// another version: libgloo is named here, before libtorch on the link line, so that its
/// symbols are the ones every gloo call binds to (the backend checks this at start-up).
#[cfg(feature = "gloo")]
fn gloo_shim() {
    const SHIM: &str = "src/backends/gloo_shim.cc";
    println!("cargo:rerun-if-changed={SHIM}");
    if !std::path::Path::new("/usr/include/gloo/context.h").exists() {
        panic!("gloo headers not found: install libgloo-dev (launch/setup.sh does), or build without the `gloo` feature");
    }
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file(SHIM)
        .warnings(false)
        .compile("gfn_gloo_shim");
    println!("cargo:rustc-link-lib=dylib=gloo");
}

#[cfg(feature = "mpi")]
fn mpi_in_place() {
    const SHIM: &str = "src/backends/mpi_in_place.c";
    println!("cargo:rerun-if-changed={SHIM}");
    let library = build_probe_mpi::probe().unwrap_or_else(|errors| {
        let reasons: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        panic!(
            "no MPI library found (install libopenmpi-dev, or build without the `mpi` feature): {}",
            reasons.join("; ")
        )
    });
    let mut build = cc::Build::new();
    build.file(SHIM);
    match library.mpicc {
        Some(mpicc) => {
            build.compiler(mpicc);
        }
        None => {
            build.includes(&library.include_paths);
        }
    }
    build.compile("gfn_mpi_in_place");
}
