// AdamW for a GpuTransformer (train/adamw.h is the spec): fp32 moments on the device, the global
// gradient norm in double, clipping folded into the update, and the bf16 weight copy refreshed in
// the same pass. Weight decay per tensor, by name, as the CPU optimizer decides it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "cuda/adamw.h"
#include "cuda/device_memory.h"
#include "cuda/gpu_transformer.h"
#include "cuda/stream_graph.h"
#include "train/adamw.h"

namespace moeforge::cuda {

struct GpuAdamWResult {
  double grad_norm = 0.0;    // before clipping
  double clip_factor = 1.0;  // applied to the gradient
  bool applied = false;      // false when the norm was not finite (nothing changed)
};

// The start of an update of GpuAdamW or GpuZeroAdamW from the gradient norm: the clipping factor
// at max_norm (<= 0: none), as clip_grad_norm computes it; applied stays false.
GpuAdamWResult clipping_for(double grad_norm, double max_norm);
// The kernel's constants of the update that c describes, with the clipping factor (skip 0).
AdamWStep kernel_step(const AdamWStepConstants& c, double clip_factor);
// train/adamw.h's grad_squares of the device gradient elements [begin, end) of layout (values
// points at element begin): each piece's squares summed on the device into a double of slots
// (grown as needed; scratch as reduction_scratch_doubles(end - begin) asks), read back once
// stream's work is done (a host synchronisation) and added up in piece order.
// slots[i] (device) = the squares of piece i of the gradient, values pointing at element begin of
// the flat buffer; scratch as reduction_scratch_doubles asks for the largest piece.
void enqueue_grad_squares(const std::vector<GradSquaresPiece>& pieces, const float* values,
                          int64_t begin, double* slots, double* scratch, cudaStream_t stream);
GradSquares device_grad_squares(const ParameterLayout& layout, const float* values, int64_t begin,
                                int64_t end, DeviceBuffer<double>& slots, double* scratch,
                                cudaStream_t stream);

// A contiguous range of the flat parameter buffer whose tensors share a weight-decay flag.
struct DecayRun {
  int64_t begin, count;
  bool decay;
};
// The layout's tensors clipped to [begin, end) (the whole buffer, or a ZeRO-1 shard), merged into
// runs of the same decay flag (decay_flags), in offset order.
std::vector<DecayRun> decay_runs(const ParameterLayout& layout,
                                 const std::vector<std::string>& no_decay_substrings, int64_t begin,
                                 int64_t end);

class GpuAdamW {
 public:
  // expert_group: with the model's experts sharded, the host communicator of the ranks holding
  // the other shards, over which the norm sums the expert ranges' squares (model_grad_norm).
  GpuAdamW(GpuTransformer& model, const AdamWHyper& hyper,
           const std::vector<std::string>& no_decay_substrings,
           Communicator* expert_group = nullptr);
  ~GpuAdamW();
  GpuAdamW(const GpuAdamW&) = delete;
  GpuAdamW& operator=(const GpuAdamW&) = delete;

  // Overlap with the next forward: step() then runs the update on a stream of its own, range by
  // range in the order the forward reads the weights (GpuTransformer::grad_ready_ranges() from
  // the last), and the model's next forward waits for each range's update just before it reads
  // it (the model's weights-needed hook) instead of for the whole update. The results are the
  // same. Host reads of the weights or of the moments must come after synchronize() (the
  // engine's store_to_host does it; download_exp_avg and friends do it themselves).
  void enable_overlap();
  // Waits for the update (a no-op without overlap).
  void synchronize();
  // The stream the update runs on (the model's without overlap).
  cudaStream_t update_stream() const;

  // Global norm of the model's gradient (double, fixed order; with sharded experts, collective
  // over the expert group).
  double grad_norm();
  // One update with learning rate lr and clipping at max_norm (<= 0: none). Skips the update
  // when the gradient norm is not finite. Without an expert group the norm, the clipping factor
  // and the skip are decided on the device (finish_grad_clipping) and the host reads the norm
  // once the update is enqueued; with one, the norm needs the host collective first.
  GpuAdamWResult step(double lr, double max_norm);
  // CUDA graphs: step() replays its device work (the step constants' upload, the norm, the
  // clipping, the update) as two captured graphs, one per max_norm: the first step runs eagerly,
  // the second captures. Needs no expert group and no overlap (enable_overlap).
  void set_cuda_graphs(bool enabled);
  // Graphs captured since construction (two per capture: the norm's and the update's).
  int64_t graph_captures() const { return graph_captures_; }

  int64_t step_count() const { return step_count_; }
  void set_step_count(int64_t n) { step_count_ = n; }
  std::vector<float> download_exp_avg();
  std::vector<float> download_exp_avg_sq();
  void upload_state(const std::vector<float>& exp_avg, const std::vector<float>& exp_avg_sq);

 private:
  GpuTransformer& model_;
  AdamWHyper hyper_;
  Communicator* expert_group_;
  std::vector<DecayRun> runs_;
  DeviceBuffer<float> exp_avg_, exp_avg_sq_;
  // The device work of step() without an expert group: the constants of host_step_ uploaded,
  // the norm's pieces summed and finished into norm_ and step_, the norm copied to host_norm_;
  // then the update of every run from step_.
  void enqueue_norm(double max_norm);
  void enqueue_update();
  // enqueue eagerly without graphs, else as work's ReplayedWork.
  void run_graphed(ReplayedWork& work, const std::function<void()>& enqueue);
  // Copies host_step_ into step_ on the model's stream.
  void upload_step();

  DeviceBuffer<double> norm_sq_, scratch_;
  std::vector<GradSquaresPiece> pieces_;   // the norm's pieces, in order
  DeviceBuffer<uint8_t> expert_piece_;     // [pieces] 1 for the experts' pieces
  PinnedHostBuffer<AdamWStep> host_step_;  // [1] written before each step's upload
  DeviceBuffer<AdamWStep> step_;           // [1] what the update reads
  PinnedHostBuffer<double> host_norm_;     // [1] the last step's gradient norm
  DeviceBuffer<double> norm_;              // [1]
  cudaEvent_t norm_copied_ = nullptr;      // after the norm's copy to host_norm_
  bool graphs_enabled_ = false;
  double graph_max_norm_ = 0.0;
  ReplayedWork norm_work_, update_work_;  // for graph_max_norm_
  int64_t graph_captures_ = 0;
  int64_t step_count_ = 0;
  // Overlap: the update's stream, an event on the model's stream before it, and one event per
  // range of GpuTransformer::grad_ready_ranges() after its update.
  cudaStream_t stream_ = nullptr;
  cudaEvent_t grads_final_ = nullptr;
  std::vector<cudaEvent_t> range_done_;
};

}  // namespace moeforge::cuda
