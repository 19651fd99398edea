// The rank of this process among the processes of its host, as MPI launchers and schedulers
// export it (Open MPI, MVAPICH2, Slurm, torchrun-style LOCAL_RANK), for binding ranks to GPUs.
#pragma once

namespace moeforge {

// The first of OMPI_COMM_WORLD_LOCAL_RANK, MV2_COMM_WORLD_LOCAL_RANK, SLURM_LOCALID, LOCAL_RANK
// that is set, or -1 when none is (a process started without a launcher). Throws moeforge::Error
// naming the variable when its value is not a non-negative integer.
int local_rank_from_environment();

}  // namespace moeforge
