// CUPTI activity recording behind KernelTimeline (kernel_timeline.h): CUPTI hands over filled
// buffers of activity records (on its own thread or at a flush), which are decoded into events.
#include "cuda/kernel_timeline.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>

#include "core/error.h"
#include "cuda/cuda_check.h"

#ifdef MOEFORGE_HAVE_CUPTI
#include <cupti.h>
#include <cxxabi.h>

#include <cstdlib>
#include <memory>
#include <mutex>
#endif

namespace moeforge::cuda {

const char* timeline_kind_name(TimelineEvent::Kind kind) {
  switch (kind) {
    case TimelineEvent::Kind::kernel: return "kernel";
    case TimelineEvent::Kind::memset: return "memset";
    case TimelineEvent::Kind::memcpy: return "memcpy";
    case TimelineEvent::Kind::runtime: return "runtime";
  }
  return "unknown";
}

void write_timeline_jsonl(std::ostream& out, const std::vector<TimelineEvent>& events,
                          const nlohmann::json& tags) {
  if (events.empty()) return;
  uint64_t origin = events.front().start_ns;
  for (const TimelineEvent& event : events) origin = std::min(origin, event.start_ns);
  const auto us = [origin](uint64_t ns) { return static_cast<double>(ns - origin) * 1e-3; };
  for (const TimelineEvent& event : events) {
    nlohmann::json line = tags;
    line["kind"] = timeline_kind_name(event.kind);
    line["name"] = event.name;
    line["device"] = event.device;
    line["stream"] = event.stream;
    line["start_us"] = us(event.start_ns);
    line["end_us"] = us(std::max(event.start_ns, event.end_ns));
    line["bytes"] = event.bytes;
    line["correlation"] = event.correlation;
    out << line.dump() << '\n';
  }
  MF_CHECK(out.good(), "kernel timeline: writing the timeline failed");
}

namespace {

std::atomic<bool> g_recording{false};
// Records lost while recording: dropped by CUPTI, or in buffers that could not be allocated.
std::atomic<size_t> g_lost{0};

#ifdef MOEFORGE_HAVE_CUPTI

constexpr size_t kBufferBytes = size_t{8} << 20;
constexpr size_t kBufferAlign = 8;  // CUPTI's requirement for activity buffers

const CUpti_ActivityKind kKinds[] = {CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL,
                                     CUPTI_ACTIVITY_KIND_MEMSET, CUPTI_ACTIVITY_KIND_MEMCPY,
                                     CUPTI_ACTIVITY_KIND_RUNTIME};

std::mutex g_mutex;
std::vector<TimelineEvent> g_events;  // under g_mutex

#define MF_CUPTI_CHECK(expr)                                         \
  do {                                                               \
    const CUptiResult mf_cupti_status = (expr);                      \
    if (mf_cupti_status != CUPTI_SUCCESS) {                          \
      const char* mf_cupti_message = "unknown";                      \
      cuptiGetResultString(mf_cupti_status, &mf_cupti_message);      \
      MF_FAIL("CUPTI error in {}: {} ({})", #expr, mf_cupti_message, \
              static_cast<int>(mf_cupti_status));                    \
    }                                                                \
  } while (0)

std::string demangled(const char* name) {
  if (name == nullptr) return "?";
  int status = 0;
  const std::unique_ptr<char, void (*)(void*)> plain(
      abi::__cxa_demangle(name, nullptr, nullptr, &status), std::free);
  return status == 0 && plain ? std::string(plain.get()) : std::string(name);
}

std::string runtime_name(CUpti_CallbackId id) {
  const char* name = nullptr;
  if (cuptiGetCallbackName(CUPTI_CB_DOMAIN_RUNTIME_API, id, &name) != CUPTI_SUCCESS ||
      name == nullptr) {
    return "runtime call " + std::to_string(id);
  }
  return name;
}

// An event of GPU work from a CUPTI record with the common device, stream, time and correlation
// fields.
template <typename Record>
TimelineEvent gpu_event(TimelineEvent::Kind kind, std::string name, const Record& r,
                        uint64_t bytes) {
  return {kind, std::move(name), r.deviceId, r.streamId, r.start, r.end, bytes, r.correlationId};
}

bool decode(const CUpti_Activity* record, TimelineEvent& event) {
  switch (record->kind) {
    case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL:
    case CUPTI_ACTIVITY_KIND_KERNEL: {
      const auto& r = *reinterpret_cast<const CUpti_ActivityKernel10*>(record);
      event = gpu_event(TimelineEvent::Kind::kernel, demangled(r.name), r, 0);
      return true;
    }
    case CUPTI_ACTIVITY_KIND_MEMSET: {
      const auto& r = *reinterpret_cast<const CUpti_ActivityMemset4*>(record);
      event = gpu_event(TimelineEvent::Kind::memset, "memset", r, r.bytes);
      return true;
    }
    case CUPTI_ACTIVITY_KIND_MEMCPY: {
      const auto& r = *reinterpret_cast<const CUpti_ActivityMemcpy6*>(record);
      event = gpu_event(TimelineEvent::Kind::memcpy, "memcpy", r, r.bytes);
      return true;
    }
    case CUPTI_ACTIVITY_KIND_RUNTIME: {
      const auto& r = *reinterpret_cast<const CUpti_ActivityAPI*>(record);
      event = {TimelineEvent::Kind::runtime,
               runtime_name(r.cbid),
               0,
               r.threadId,
               r.start,
               r.end,
               0,
               r.correlationId};
      return true;
    }
    default: return false;
  }
}

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(kBufferAlign, kBufferBytes));
  *size = *buffer == nullptr ? 0 : kBufferBytes;
  if (*buffer == nullptr) ++g_lost;  // CUPTI drops the records it cannot store
  *max_records = 0;                  // as many as fit
}

void CUPTIAPI buffer_completed(CUcontext context, uint32_t stream_id, uint8_t* buffer, size_t,
                               size_t valid_size) {
  std::vector<TimelineEvent> decoded;
  CUpti_Activity* record = nullptr;
  while (cuptiActivityGetNextRecord(buffer, valid_size, &record) == CUPTI_SUCCESS) {
    TimelineEvent event;
    // A record that a forced flush handed over before its work ended has no times yet.
    if (decode(record, event) && event.start_ns != 0 && event.end_ns >= event.start_ns) {
      decoded.push_back(std::move(event));
    }
  }
  std::free(buffer);
  size_t dropped = 0;
  if (cuptiActivityGetNumDroppedRecords(context, stream_id, &dropped) == CUPTI_SUCCESS) {
    g_lost += dropped;
  }
  const std::lock_guard<std::mutex> lock(g_mutex);
  g_events.insert(g_events.end(), std::make_move_iterator(decoded.begin()),
                  std::make_move_iterator(decoded.end()));
}

void start_recording() {
  static std::once_flag registered;
  std::call_once(registered, [] {
    MF_CUPTI_CHECK(cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed));
  });
  {
    const std::lock_guard<std::mutex> lock(g_mutex);
    g_events.clear();
  }
  g_lost = 0;
  try {
    for (const CUpti_ActivityKind kind : kKinds) MF_CUPTI_CHECK(cuptiActivityEnable(kind));
  } catch (...) {
    for (const CUpti_ActivityKind kind : kKinds) cuptiActivityDisable(kind);
    throw;
  }
}

// Stops recording and hands over every record; false where the flush failed.
bool stop_recording() {
  for (const CUpti_ActivityKind kind : kKinds) cuptiActivityDisable(kind);
  return cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED) == CUPTI_SUCCESS;
}

std::vector<TimelineEvent> take_events() {
  const std::lock_guard<std::mutex> lock(g_mutex);
  std::vector<TimelineEvent> events = std::move(g_events);
  g_events.clear();
  return events;
}

#else

void start_recording() {
  MF_FAIL(
      "kernel timeline: moeforge was built without CUPTI (the CUDA toolkit's libcupti was not "
      "found at configure time)");
}

bool stop_recording() {
  return true;
}

std::vector<TimelineEvent> take_events() {
  return {};
}

#endif

}  // namespace

bool kernel_timeline_available() {
#ifdef MOEFORGE_HAVE_CUPTI
  return true;
#else
  return false;
#endif
}

std::ofstream open_timeline_file(const std::string& path, const char* who) {
  MF_CHECK(kernel_timeline_available(),
           "{}: --kernel-timeline needs a build with CUPTI (the CUDA toolkit's libcupti)", who);
  std::ofstream file(path);
  MF_CHECK(file.is_open(), "{}: cannot write --kernel-timeline {}", who, path);
  return file;
}

KernelTimeline::KernelTimeline() {
  MF_CHECK(!g_recording.exchange(true),
           "kernel timeline: another timeline is recording in this process");
  try {
    MF_CUDA_CHECK(cudaDeviceSynchronize());  // earlier work stays out of the recording
    start_recording();
  } catch (...) {
    g_recording = false;
    throw;
  }
  recording_ = true;
}

KernelTimeline::~KernelTimeline() {
  if (!recording_) return;
  cudaDeviceSynchronize();
  stop_recording();
  take_events();
  g_recording = false;
}

std::vector<TimelineEvent> KernelTimeline::finish() {
  MF_CHECK(recording_, "kernel timeline: finish() was already called");
  recording_ = false;
  const cudaError_t synced = cudaDeviceSynchronize();
  const bool flushed = stop_recording();
  std::vector<TimelineEvent> events = take_events();
  const size_t lost = g_lost;
  g_recording = false;
  MF_CUDA_CHECK(synced);
  MF_CHECK(flushed && lost == 0,
           "kernel timeline: CUPTI {} ({} records lost); the timeline would be incomplete",
           flushed ? "dropped records" : "could not flush its records", lost);
  std::stable_sort(
      events.begin(), events.end(),
      [](const TimelineEvent& a, const TimelineEvent& b) { return a.start_ns < b.start_ns; });
  return events;
}

}  // namespace moeforge::cuda
