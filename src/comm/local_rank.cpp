// Local rank from the launcher's environment (see local_rank.h).
#include "comm/local_rank.h"

#include <charconv>
#include <cstdlib>
#include <string>

#include "core/error.h"

namespace moeforge {

int local_rank_from_environment() {
  for (const char* name :
       {"OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "LOCAL_RANK"}) {
    const char* value = std::getenv(name);
    if (value == nullptr) continue;
    const std::string text(value);
    int rank = -1;
    const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), rank);
    MF_CHECK(!text.empty() && error == std::errc() && end == text.data() + text.size() && rank >= 0,
             "{}=\"{}\" is not a local rank (a non-negative integer)", name, text);
    return rank;
  }
  return -1;
}

}  // namespace moeforge
