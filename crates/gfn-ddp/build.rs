//! The torch rpath of every libtorch crate, and for the MPI backend a one-line C shim: the value
//! of `MPI_IN_PLACE` is a macro that differs between MPI implementations (Open MPI: 1, MPICH: -1)
//! and rsmpi does not export it, so it is read from the `mpi.h` that rsmpi itself builds with.

#[path = "../../build/torch_rpath.rs"]
mod torch_rpath;

fn main() {
    torch_rpath::main();
    #[cfg(feature = "mpi")]
    mpi_in_place();
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
