// GpuZeroAdamW: the shard's decay runs, the gradient reduce-scatter, the sharded update and the
// all-gathers of the updated weights (see gpu_zero_adamw.h).
#include "cuda/gpu_zero_adamw.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "cuda/adamw.h"
#include "cuda/cuda_check.h"
#include "cuda/reductions.h"

namespace moeforge::cuda {

GpuZeroAdamW::GpuZeroAdamW(GpuTransformer& model, const AdamWHyper& hyper,
                           const std::vector<std::string>& no_decay_substrings, Communicator& dp,
                           Communicator* expert_group)
    : model_(model),
      hyper_(hyper),
      dp_(dp),
      expert_group_(expert_group),
      shard_len_(zero_shard_len(model.num_params(), dp.size())),
      shard_(zero_shard(model.num_params(), dp.size(), dp.rank())),
      runs_(decay_runs(model.layout(), no_decay_substrings, shard_.begin, shard_.end)) {
  model_.pad_flat_buffers(shard_len_ * dp.size());
  const auto n = static_cast<size_t>(shard_.size());
  exp_avg_.resize(n);
  exp_avg_sq_.resize(n);
  exp_avg_.fill_zero(model.stream());
  exp_avg_sq_.fill_zero(model.stream());
  norm_sq_.resize(1);
  scratch_.resize(static_cast<size_t>(reduction_scratch_doubles(std::max<int64_t>(1, shard_len_))));
  found_.resize(static_cast<size_t>(dp.size()));
  const std::vector<GradRange> fp32_ranges = model.fp32_weight_ranges();
  for (int r = 0; r < dp.size(); ++r) {
    const ZeroShard owned = zero_shard(model.num_params(), dp.size(), r);
    std::vector<GradRange>& pieces = fp32_pieces_.emplace_back();
    int64_t packed = 0;
    for (const GradRange& range : fp32_ranges) {
      const int64_t begin = std::max(range.offset, owned.begin);
      const int64_t end = std::min(range.offset + range.count, owned.end);
      if (begin >= end) continue;
      pieces.push_back(GradRange{begin, end - begin});
      packed += end - begin;
    }
    fp32_chunk_ = std::max(fp32_chunk_, packed);
  }
  if (dp.size() > 1 && fp32_chunk_ > 0) {
    fp32_send_.resize(static_cast<size_t>(fp32_chunk_));
    fp32_recv_.resize(static_cast<size_t>(fp32_chunk_ * dp.size()));
  }
  model_.synchronize();
}

void GpuZeroAdamW::reduce_gradients(GradReduceDtype dtype) {
  if (dtype == GradReduceDtype::kFloat32) {
    // In place (NCCL's form): the model's chunk of this rank becomes the summed shard.
    if (dp_.size() > 1) {
      reducer_.reduce_scatter(model_.grads(), static_cast<size_t>(shard_len_),
                              model_.grads() + dp_.rank() * shard_len_, dp_, dtype,
                              model_.stream());
    }
    sums_in_model_grads_ = true;
    return;
  }
  if (bf16_sums_.size() == 0) bf16_sums_.resize(static_cast<size_t>(shard_len_));
  reducer_.reduce_scatter(model_.grads(), static_cast<size_t>(shard_len_), bf16_sums_.data(), dp_,
                          dtype, model_.stream());
  sums_in_model_grads_ = false;
}

void GpuZeroAdamW::use_owner_reduced_gradients() {
  sums_in_model_grads_ = true;
}

const float* GpuZeroAdamW::summed_shard() const {
  return sums_in_model_grads_ ? model_.grads() + shard_.begin : bf16_sums_.data();
}

double GpuZeroAdamW::grad_norm() {
  const cudaStream_t stream = model_.stream();
  const GradSquares own = device_grad_squares(model_.layout(), summed_shard(), shard_.begin,
                                              shard_.end, norm_sq_, scratch_.data(), stream);
  double parts[2] = {own.replicated, own.experts};
  if (dp_.size() > 1) {
    // Through the device communicator: the parts go to the device and back.
    norm_sq_.resize(std::max<size_t>(norm_sq_.size(), 2));
    MF_CUDA_CHECK(
        cudaMemcpyAsync(norm_sq_.data(), parts, sizeof(parts), cudaMemcpyHostToDevice, stream));
    dp_.all_reduce_sum(norm_sq_.data(), 2, CommDType::kFloat64);
    MF_CUDA_CHECK(
        cudaMemcpyAsync(parts, norm_sq_.data(), sizeof(parts), cudaMemcpyDeviceToHost, stream));
    MF_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  return model_grad_norm({parts[0], parts[1]}, expert_group_);
}

GpuAdamWResult GpuZeroAdamW::step(double lr, double max_norm) {
  GpuAdamWResult result = clipping_for(grad_norm(), max_norm);
  if (!std::isfinite(result.grad_norm)) return result;
  ++step_count_;
  const AdamWStepConstants c(hyper_, lr, step_count_);
  // grad_norm() synchronised the stream: the last step's upload of host_step_ is done.
  host_step_.resize(1);
  step_.resize(1);
  *host_step_.data() = kernel_step(c, result.clip_factor);
  const cudaStream_t stream = model_.stream();
  MF_CUDA_CHECK(cudaMemcpyAsync(step_.data(), host_step_.data(), sizeof(AdamWStep),
                                cudaMemcpyHostToDevice, stream));
  for (const DecayRun& run : runs_) {
    const int64_t local = run.begin - shard_.begin;
    adamw_update(model_.params() + run.begin, model_.params_bf16() + run.begin,
                 exp_avg_.data() + local, exp_avg_sq_.data() + local, summed_shard() + local,
                 run.count, step_.data(), run.decay, stream);
  }
  if (dp_.size() > 1) all_gather_updated_weights();
  result.applied = true;
  return result;
}

void GpuZeroAdamW::all_gather_updated_weights() {
  const cudaStream_t stream = model_.stream();
  // In place: this rank's chunk of the padded buffers is its shard.
  bf16* weights = model_.params_bf16();
  dp_.all_gather(weights + dp_.rank() * shard_len_, weights, static_cast<size_t>(shard_len_),
                 CommDType::kBFloat16);
  if (fp32_chunk_ == 0) return;
  float* params = model_.params();
  const auto copy = [&](float* dst, const float* src, int64_t count) {
    MF_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<size_t>(count) * sizeof(float),
                                  cudaMemcpyDeviceToDevice, stream));
  };
  int64_t packed = 0;
  for (const GradRange& piece : fp32_pieces_[static_cast<size_t>(dp_.rank())]) {
    copy(fp32_send_.data() + packed, params + piece.offset, piece.count);
    packed += piece.count;
  }
  dp_.all_gather(fp32_send_.data(), fp32_recv_.data(), static_cast<size_t>(fp32_chunk_),
                 CommDType::kFloat32);
  for (int r = 0; r < dp_.size(); ++r) {
    if (r == dp_.rank()) continue;
    const float* from = fp32_recv_.data() + r * fp32_chunk_;
    for (const GradRange& piece : fp32_pieces_[static_cast<size_t>(r)]) {
      copy(params + piece.offset, from, piece.count);
      from += piece.count;
    }
  }
}

void GpuZeroAdamW::gather_weights() {
  if (dp_.size() == 1) return;
  float* params = model_.params();
  dp_.all_gather(params + dp_.rank() * shard_len_, params, static_cast<size_t>(shard_len_),
                 CommDType::kFloat32);
  model_.synchronize();
}

int64_t GpuZeroAdamW::first_nonfinite_spec() {
  const std::vector<float> grads = download_grad_shard();
  const int64_t found = last_nonfinite_spec(model_.layout(), shard_, grads.data());
  if (dp_.size() == 1) return found;
  copy_to_device(found_.data() + dp_.rank(), &found, sizeof(found));
  dp_.all_gather(found_.data() + dp_.rank(), found_.data(), 1, CommDType::kInt64);
  model_.synchronize();
  const std::vector<int64_t> per_rank = found_.download();
  return *std::max_element(per_rank.begin(), per_rank.end());
}

std::vector<float> GpuZeroAdamW::download_exp_avg() const {
  model_.synchronize();
  return exp_avg_.download();
}

std::vector<float> GpuZeroAdamW::download_exp_avg_sq() const {
  model_.synchronize();
  return exp_avg_sq_.download();
}

std::vector<float> GpuZeroAdamW::download_grad_shard() const {
  model_.synchronize();
  std::vector<float> host(static_cast<size_t>(shard_.size()));
  copy_to_host(host.data(), summed_shard(), host.size() * sizeof(float));
  return host;
}

void GpuZeroAdamW::upload_state(const std::vector<float>& exp_avg,
                                const std::vector<float>& exp_avg_sq) {
  MF_CHECK(static_cast<int64_t>(exp_avg.size()) == shard_.size() &&
               static_cast<int64_t>(exp_avg_sq.size()) == shard_.size(),
           "ZeRO-1 optimizer state has {} / {} values for a shard of {} parameters", exp_avg.size(),
           exp_avg_sq.size(), shard_.size());
  model_.synchronize();
  exp_avg_.upload(exp_avg);
  exp_avg_sq_.upload(exp_avg_sq);
}

}  // namespace moeforge::cuda
