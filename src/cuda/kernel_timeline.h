// A timeline of GPU work for the benchmarks, from CUPTI's activity API: when each kernel, memset
// and memcpy ran, on which device and stream, and when the host's CUDA runtime calls ran, so that a
// benchmark can show what overlapped and where the GPU waited (the GPU machine has no nsys, and ncu
// serialises kernels).
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <fstream>
#include <ostream>
#include <string>
#include <vector>

namespace moeforge::cuda {

struct TimelineEvent {
  enum class Kind { kernel, memset, memcpy, runtime };
  Kind kind = Kind::kernel;
  // A kernel's demangled name, a runtime call's name ("cudaLaunchKernel_v7000", ...), or for
  // copies and sets "memset" / "memcpy".
  std::string name;
  uint32_t device = 0;  // GPU work only
  uint32_t stream = 0;  // GPU work: CUPTI's stream id; runtime calls: the host thread's id
  uint64_t start_ns = 0, end_ns = 0;  // CUPTI timestamps (one clock for the host and the GPUs)
  uint64_t bytes = 0;                 // memsets and memcpys
  // Matches a runtime call with the GPU work it launched (0: none).
  uint32_t correlation = 0;
};

const char* timeline_kind_name(TimelineEvent::Kind kind);

// Writes one JSON line per event: tags' keys, then "kind", "name", "device", "stream", "start_us"
// and "end_us" (microseconds since the earliest start among events), "bytes" and "correlation".
void write_timeline_jsonl(std::ostream& out, const std::vector<TimelineEvent>& events,
                          const nlohmann::json& tags);

// Whether this build records timelines (it found CUPTI).
bool kernel_timeline_available();

// A file at path for write_timeline_jsonl, after checking that this build records timelines
// (moeforge::Error naming `who` otherwise, or where the file cannot be written). CUPTI itself loads
// at the first recording, so timings taken before it carry none of its overhead.
std::ofstream open_timeline_file(const std::string& path, const char* who);

// Records from construction to finish(); one recording at a time per process (moeforge::Error for
// a second, or in a build without CUPTI). Recording slows the host's CUDA calls, so time the work
// without it and record a separate run; once CUPTI is loaded (at the first recording) it stays, so
// timings after a recording may carry a little of its overhead.
class KernelTimeline {
 public:
  KernelTimeline();
  ~KernelTimeline();
  KernelTimeline(const KernelTimeline&) = delete;
  KernelTimeline& operator=(const KernelTimeline&) = delete;

  // Waits for the device's work, stops recording and returns the events by start time. Once only;
  // moeforge::Error where CUPTI lost records (the timeline would be incomplete).
  std::vector<TimelineEvent> finish();

 private:
  bool recording_ = false;
};

}  // namespace moeforge::cuda
