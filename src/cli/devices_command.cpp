// `moeforge devices`: the CUDA devices moeforge can use (or why there are none).
#include <fmt/format.h>

#include "cli/commands.h"

#if MOEFORGE_HAVE_CUDA
#include "cuda/device_info.h"
#endif

namespace moeforge::cli {

void register_devices_command(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand("devices", "List the CUDA devices moeforge can use");
  cmd->callback([] {
#if MOEFORGE_HAVE_CUDA
    const cuda::DeviceQuery q = cuda::query_devices();
    if (q.devices.empty()) {
      fmt::print("no CUDA device: {}\n", q.unavailable_reason);
      return;
    }
    for (const cuda::DeviceInfo& d : q.devices) {
      fmt::print("cuda:{}  {}  sm_{}{}  {} SMs  {:.1f} GiB{}\n", d.index, d.name, d.compute_major,
                 d.compute_minor, d.num_sms, d.total_memory_bytes / double(1ull << 30),
                 d.is_hopper() ? "  (Hopper: sm_90a kernels)" : "");
    }
#else
    fmt::print("built without CUDA (configure with -DMOEFORGE_CUDA=ON where nvcc is installed)\n");
#endif
  });
}

}  // namespace moeforge::cli
