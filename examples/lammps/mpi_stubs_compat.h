/* Serial (MPI STUBS) builds of LAMMPS before 10 Sep 2025 lack MPI_Comm_split_type, which
 * pair_nequip_allegro.cpp calls only when more than one MPI rank runs (never in a serial build).
 * build_lammps.sh force-includes this header into that one file when it builds without MPI. */
#include <mpi.h>
#ifndef MPI_COMM_TYPE_SHARED
#define MPI_COMM_TYPE_SHARED 0
#endif
#ifndef MPI_INFO_NULL
#define MPI_INFO_NULL 0
static inline int MPI_Comm_split_type(MPI_Comm comm, int, int key, int, MPI_Comm *out)
{
  return MPI_Comm_split(comm, 0, key, out);
}
#endif
