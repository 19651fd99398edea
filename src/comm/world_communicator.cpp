// world_communicator(): MPI's world when built with MPI and started by an MPI launcher (MPI is
// initialised on first use and finalised at exit), otherwise a SelfCommunicator; and
// make_nccl_communicator(), the GPU communicator over a host one when built with NCCL.
#include <cstdio>
#include <cstdlib>

#include "comm/communicator.h"
#include "core/error.h"

#if MOEFORGE_HAVE_MPI
#include "comm/mpi/mpi_communicator.h"
#endif
#if MOEFORGE_HAVE_NCCL
#include "comm/nccl/nccl_communicator.h"
#endif

namespace moeforge {

namespace {

#if MOEFORGE_HAVE_MPI
// Environment variables set by the common launchers: Open MPI's mpirun, PMIx, and PMI (MPICH's
// Hydra mpiexec, Slurm's srun --mpi=pmi2).
bool launched_by_mpi() {
  for (const char* variable : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK"}) {
    if (std::getenv(variable) != nullptr) return true;
  }
  return false;
}

// Owns MPI's lifetime: initialises it (unless the host program already did) and finalises it when
// the process exits, after the world communicator is gone.
class MpiWorld {
 public:
  MpiWorld() {
    int initialized = 0;
    MF_MPI_CHECK(MPI_Initialized(&initialized));
    if (!initialized) {
      int provided = 0;
      MF_MPI_CHECK(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided));
      if (provided < MPI_THREAD_FUNNELED) {
        MPI_Finalize();
        MF_FAIL("MPI provides thread level {} but moeforge needs MPI_THREAD_FUNNELED ({})",
                provided, MPI_THREAD_FUNNELED);
      }
      owns_mpi_ = true;
    }
    communicator_ = std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, MpiCommOwnership::kBorrowed);
  }
  ~MpiWorld() {
    communicator_.reset();
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (owns_mpi_ && !finalized) MPI_Finalize();
  }
  MpiWorld(const MpiWorld&) = delete;
  MpiWorld& operator=(const MpiWorld&) = delete;

  Communicator& communicator() { return *communicator_; }

 private:
  bool owns_mpi_ = false;
  std::unique_ptr<MpiCommunicator> communicator_;
};
#else
// The number of ranks a launcher started (1 when not launched by one).
int launcher_world_size() {
  for (const char* variable : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE"}) {
    if (const char* value = std::getenv(variable)) return std::atoi(value);
  }
  return 1;
}
#endif

Communicator& make_world_communicator() {
#if MOEFORGE_HAVE_MPI
  if (launched_by_mpi()) {
    static MpiWorld mpi_world;
    return mpi_world.communicator();
  }
#else
  // Every process would think it is the only rank and they would overwrite each other's files.
  MF_CHECK(launcher_world_size() <= 1,
           "this moeforge was built without MPI but was started by an MPI launcher with several "
           "ranks; rebuild with -DMOEFORGE_MPI=ON");
#endif
  static SelfCommunicator self;
  return self;
}

}  // namespace

Communicator& world_communicator() {
  static Communicator& world = make_world_communicator();
  return world;
}

std::unique_ptr<Communicator> make_nccl_communicator([[maybe_unused]] Communicator& parent) {
#if MOEFORGE_HAVE_NCCL
  return std::make_unique<NcclCommunicator>(parent);
#else
  MF_FAIL(
      "make_nccl_communicator: this moeforge was built without NCCL; rebuild with "
      "-DMOEFORGE_CUDA=ON -DMOEFORGE_NCCL=ON (NCCL >= 2.18: the CUDA toolkit's, apt's libnccl-dev "
      "or PyPI's nvidia-nccl-cu13)");
#endif
}

void abort_world(int exit_code) {
#if MOEFORGE_HAVE_MPI
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized && world_communicator().size() > 1) {
    MPI_Abort(MPI_COMM_WORLD, exit_code);
  }
#endif
  std::fflush(nullptr);
  std::_Exit(exit_code);
}

}  // namespace moeforge
