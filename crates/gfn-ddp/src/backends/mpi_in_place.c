/* MPI_IN_PLACE as this MPI implementation defines it (a macro, so Rust cannot read it). */
#include <mpi.h>

void *const gfn_mpi_in_place = MPI_IN_PLACE;
