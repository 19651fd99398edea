// The inference engine of `moeforge generate` and `moeforge eval --task`: --device cpu (the fp32
// reference, infer/cpu_inference.h) or cuda (bf16 on one GPU, cuda/gpu_inference.h).
#pragma once

#include <CLI/CLI.hpp>

#include <memory>
#include <string>

#include "infer/inference_engine.h"
#include "model/prefill_attention.h"
#include "model/transformer.h"
#include "train/evaluate.h"

namespace moeforge::cli {

void add_inference_device_option(CLI::App* cmd, std::string& device);

// The engine for device with the given prefill attention. Under cuda the weights are copied to
// GPU local rank % GPUs of the host and the host model is released (model becomes null); under
// cpu the engine runs model, which must outlive it. Throws moeforge::Error for a build without CUDA
// or a machine without a usable GPU.
std::unique_ptr<InferenceEngine> make_inference_engine(const std::string& device,
                                                       std::unique_ptr<Transformer<float>>& model,
                                                       const PrefillAttention& attention);

// The loss of windows on GPU local rank % GPUs of the host (eval --data --device cuda): the
// training engine's forward (bf16, dense attention) with model's weights, which it copies; the
// function owns the engine. Throws moeforge::Error as make_inference_engine does.
ForwardFn make_gpu_loss_forward(const Transformer<float>& model);

}  // namespace moeforge::cli
