// GpuAdamW: decay runs from the parameter names, then one fused kernel launch per run.
#include "cuda/gpu_adamw.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "cuda/adamw.h"
#include "cuda/cuda_check.h"
#include "cuda/reductions.h"

namespace moeforge::cuda {

std::vector<DecayRun> decay_runs(const ParameterLayout& layout,
                                 const std::vector<std::string>& no_decay_substrings, int64_t begin,
                                 int64_t end) {
  const std::vector<uint8_t> decays = decay_flags(layout, no_decay_substrings);
  const std::vector<ParamSpec>& specs = layout.specs();
  std::vector<DecayRun> runs;
  for (size_t i = 0; i < specs.size(); ++i) {
    const int64_t first = std::max(specs[i].offset, begin);
    const int64_t last = std::min(specs[i].offset + specs[i].numel, end);
    if (first >= last) continue;
    const bool decay = decays[i] != 0;
    if (!runs.empty() && runs.back().decay == decay &&
        runs.back().begin + runs.back().count == first) {
      runs.back().count += last - first;
    } else {
      runs.push_back(DecayRun{first, last - first, decay});
    }
  }
  return runs;
}

GpuAdamW::GpuAdamW(GpuTransformer& model, const AdamWHyper& hyper,
                   const std::vector<std::string>& no_decay_substrings, Communicator* expert_group)
    : model_(model),
      hyper_(hyper),
      expert_group_(expert_group),
      runs_(decay_runs(model.layout(), no_decay_substrings, 0, model.num_params())) {
  const auto n = static_cast<size_t>(model.num_params());
  exp_avg_.resize(n);
  exp_avg_sq_.resize(n);
  exp_avg_.fill_zero(model.stream());
  exp_avg_sq_.fill_zero(model.stream());
  scratch_.resize(static_cast<size_t>(reduction_scratch_doubles(model.num_params())));
  pieces_ = grad_squares_pieces(model.layout(), 0, model.num_params());
  norm_sq_.resize(std::max<size_t>(1, pieces_.size()));
  std::vector<uint8_t> expert_piece(pieces_.size());
  for (size_t i = 0; i < pieces_.size(); ++i) expert_piece[i] = pieces_[i].experts ? 1 : 0;
  if (!expert_piece.empty()) expert_piece_.upload(expert_piece);
  host_step_.resize(1);
  step_.resize(1);
  host_norm_.resize(1);
  norm_.resize(1);
  MF_CUDA_CHECK(cudaEventCreateWithFlags(&norm_copied_, cudaEventDisableTiming));
}

GpuAdamW::~GpuAdamW() {
  // The graphs wait for their last replay on the model's stream.
  norm_work_ = ReplayedWork{};
  update_work_ = ReplayedWork{};
  if (norm_copied_ != nullptr) cudaEventDestroy(norm_copied_);
  if (stream_ == nullptr) return;
  model_.set_weights_needed_hook(nullptr);
  cudaStreamSynchronize(stream_);
  for (cudaEvent_t event : range_done_) cudaEventDestroy(event);
  cudaEventDestroy(grads_final_);
  cudaStreamDestroy(stream_);
}

void GpuAdamW::enable_overlap() {
  if (stream_ != nullptr) return;
  MF_CHECK(!graphs_enabled_, "GpuAdamW: the overlapped update runs eagerly (no CUDA graphs)");
  MF_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  MF_CUDA_CHECK(cudaEventCreateWithFlags(&grads_final_, cudaEventDisableTiming));
  range_done_.resize(model_.grad_ready_ranges().size());
  for (cudaEvent_t& event : range_done_) {
    MF_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  }
  model_.set_weights_needed_hook([this](size_t index) {
    MF_CUDA_CHECK(cudaStreamWaitEvent(model_.stream(), range_done_.at(index), 0));
  });
}

void GpuAdamW::synchronize() {
  if (stream_ != nullptr) MF_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

cudaStream_t GpuAdamW::update_stream() const {
  return stream_ != nullptr ? stream_ : model_.stream();
}

std::vector<float> GpuAdamW::download_exp_avg() {
  synchronize();
  return exp_avg_.download();
}

std::vector<float> GpuAdamW::download_exp_avg_sq() {
  synchronize();
  return exp_avg_sq_.download();
}

void GpuAdamW::upload_state(const std::vector<float>& exp_avg,
                            const std::vector<float>& exp_avg_sq) {
  MF_CHECK(exp_avg.size() == exp_avg_.size() && exp_avg_sq.size() == exp_avg_sq_.size(),
           "optimizer state has {} / {} values for a model of {} parameters", exp_avg.size(),
           exp_avg_sq.size(), exp_avg_.size());
  synchronize();
  MF_CUDA_CHECK(cudaStreamSynchronize(model_.stream()));
  exp_avg_.upload(exp_avg);
  exp_avg_sq_.upload(exp_avg_sq);
}

GpuAdamWResult clipping_for(double grad_norm, double max_norm) {
  GpuAdamWResult result;
  result.grad_norm = grad_norm;
  if (std::isfinite(grad_norm) && max_norm > 0.0 && grad_norm > max_norm) {
    result.clip_factor = max_norm / (grad_norm + 1e-6);
  }
  return result;
}

AdamWStep kernel_step(const AdamWStepConstants& c, double clip_factor) {
  return AdamWStep{c.b1,
                   c.b2,
                   c.eps,
                   c.step_size,
                   c.bc2_sqrt,
                   c.decay_factor,
                   c.no_decay_factor,
                   static_cast<float>(clip_factor),
                   0};
}

void enqueue_grad_squares(const std::vector<GradSquaresPiece>& pieces, const float* values,
                          int64_t begin, double* slots, double* scratch, cudaStream_t stream) {
  for (size_t i = 0; i < pieces.size(); ++i) {
    sum_squares(slots + i, values + (pieces[i].range.offset - begin), pieces[i].range.count,
                scratch, stream);
  }
}

GradSquares device_grad_squares(const ParameterLayout& layout, const float* values, int64_t begin,
                                int64_t end, DeviceBuffer<double>& slots, double* scratch,
                                cudaStream_t stream) {
  const std::vector<GradSquaresPiece> pieces = grad_squares_pieces(layout, begin, end);
  GradSquares out;
  if (pieces.empty()) return out;
  if (slots.size() < pieces.size()) slots.resize(pieces.size());
  enqueue_grad_squares(pieces, values, begin, slots.data(), scratch, stream);
  std::vector<double> sums(pieces.size());
  MF_CUDA_CHECK(cudaMemcpyAsync(sums.data(), slots.data(), sums.size() * sizeof(double),
                                cudaMemcpyDeviceToHost, stream));
  MF_CUDA_CHECK(cudaStreamSynchronize(stream));
  for (size_t i = 0; i < pieces.size(); ++i) {
    (pieces[i].experts ? out.experts : out.replicated) += sums[i];
  }
  return out;
}

double GpuAdamW::grad_norm() {
  return model_grad_norm(
      device_grad_squares(model_.layout(), model_.grads(), 0, model_.num_params(), norm_sq_,
                          scratch_.data(), model_.stream()),
      expert_group_);
}

void GpuAdamW::set_cuda_graphs(bool enabled) {
  if (enabled) {
    MF_CHECK(expert_group_ == nullptr,
             "GpuAdamW: CUDA graphs need the whole gradient on this GPU (with sharded experts the "
             "norm is a host collective)");
    MF_CHECK(stream_ == nullptr, "GpuAdamW: the overlapped update runs eagerly (no CUDA graphs)");
  }
  norm_work_ = ReplayedWork{};
  update_work_ = ReplayedWork{};
  graphs_enabled_ = enabled;
}

void GpuAdamW::upload_step() {
  MF_CUDA_CHECK(cudaMemcpyAsync(step_.data(), host_step_.data(), sizeof(AdamWStep),
                                cudaMemcpyHostToDevice, model_.stream()));
}

void GpuAdamW::enqueue_norm(double max_norm) {
  const cudaStream_t stream = model_.stream();
  upload_step();
  enqueue_grad_squares(pieces_, model_.grads(), 0, norm_sq_.data(), scratch_.data(), stream);
  finish_grad_clipping(norm_.data(), step_.data(), norm_sq_.data(), expert_piece_.data(),
                       static_cast<int64_t>(pieces_.size()), max_norm, stream);
  MF_CUDA_CHECK(cudaMemcpyAsync(host_norm_.data(), norm_.data(), sizeof(double),
                                cudaMemcpyDeviceToHost, stream));
}

void GpuAdamW::enqueue_update() {
  const auto update = [&](int64_t begin, int64_t end, cudaStream_t stream) {
    for (const DecayRun& run : runs_) {
      const int64_t first = std::max(begin, run.begin);
      const int64_t last = std::min(end, run.begin + run.count);
      if (first >= last) continue;
      adamw_update(model_.params() + first, model_.params_bf16() + first, exp_avg_.data() + first,
                   exp_avg_sq_.data() + first, model_.grads() + first, last - first, step_.data(),
                   run.decay, stream);
    }
  };
  if (stream_ == nullptr) {
    update(0, model_.num_params(), model_.stream());
    return;
  }
  // After the gradients and the step's constants are final on the model's stream, range by
  // range in forward order.
  MF_CUDA_CHECK(cudaEventRecord(grads_final_, model_.stream()));
  MF_CUDA_CHECK(cudaStreamWaitEvent(stream_, grads_final_, 0));
  const std::vector<GradRange>& ranges = model_.grad_ready_ranges();
  for (size_t i = ranges.size(); i-- > 0;) {
    update(ranges[i].offset, ranges[i].offset + ranges[i].count, stream_);
    MF_CUDA_CHECK(cudaEventRecord(range_done_[i], stream_));
  }
}

void GpuAdamW::run_graphed(ReplayedWork& work, const std::function<void()>& enqueue) {
  if (!graphs_enabled_) {
    enqueue();
  } else if (work.run(model_.stream(), enqueue)) {
    ++graph_captures_;
  }
}

GpuAdamWResult GpuAdamW::step(double lr, double max_norm) {
  const AdamWStepConstants c(hyper_, lr, step_count_ + 1);
  double norm = 0.0;
  if (expert_group_ != nullptr) {
    // The experts' squares need the other shards' (a host collective), so the clipping is
    // decided on the host. grad_norm() has synchronised the stream: the last upload is done.
    norm = grad_norm();
    const GpuAdamWResult clip = clipping_for(norm, max_norm);
    *host_step_.data() = kernel_step(c, clip.clip_factor);
    host_step_.data()->skip = std::isfinite(norm) ? 0 : 1;
    upload_step();
    enqueue_update();
  } else {
    // The last step waited for its norm's copy, which came after its upload of host_step_.
    *host_step_.data() = kernel_step(c, 1.0);
    if (graphs_enabled_ && max_norm != graph_max_norm_) {
      norm_work_ = ReplayedWork{};
      update_work_ = ReplayedWork{};
      graph_max_norm_ = max_norm;
    }
    run_graphed(norm_work_, [&] { enqueue_norm(max_norm); });
    MF_CUDA_CHECK(cudaEventRecord(norm_copied_, model_.stream()));
    run_graphed(update_work_, [&] { enqueue_update(); });
    MF_CUDA_CHECK(cudaEventSynchronize(norm_copied_));
    norm = *host_norm_.data();
  }
  GpuAdamWResult result = clipping_for(norm, max_norm);
  result.applied = std::isfinite(norm);
  if (result.applied) ++step_count_;
  return result;
}

}  // namespace moeforge::cuda
