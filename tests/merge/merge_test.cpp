// Tests of merge_checkpoints on small model directories: identity merges, agreement with the kernel
// per tensor, thread-count independence, sharded inputs and outputs, carried-over files and
// merge.json, progress and summary, and bad inputs failing clearly with nothing left behind.
#include "merge/merge.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <fstream>

#include "merge/merge_kernel.h"
#include "merge/merge_test_util.h"

namespace moeforge::merge {
namespace {

namespace fs = std::filesystem;
using io::testing::expect_error;
using io::testing::list_dir;
using io::testing::read_bytes;
using io::testing::ScratchDir;
using nlohmann::json;
using testing::make_tensors;
using testing::OwnedTensor;
using testing::read_all;
using testing::staging_leftovers;
using testing::TensorSpec;
using testing::tiny_config;
using testing::write_model;

// A MoE-like table: matrices (BF16), a norm and a scalar (F32), an I64 buffer (copied, not
// averaged).
std::vector<TensorSpec> model_specs(io::DType matrix_dtype = io::DType::kBF16,
                                    io::DType vector_dtype = io::DType::kF32) {
  return {{"model.embed_tokens.weight", matrix_dtype, {64, 32}},
          {"model.layers.0.block_sparse_moe.experts.0.w1.weight", matrix_dtype, {48, 32}},
          {"model.layers.0.block_sparse_moe.gate.weight", matrix_dtype, {4, 32}},
          {"model.layers.0.input_layernorm.weight", vector_dtype, {32}},
          {"model.rotary_emb.positions", io::DType::kI64, {16}},
          {"lm_head.scale", vector_dtype, {}}};
}

MergeOptions sma_options(const std::vector<fs::path>& inputs, const fs::path& output) {
  MergeOptions options;
  options.inputs = inputs;
  options.output = output;
  options.weights = merge_weights(Method::kSma, static_cast<int64_t>(inputs.size()), 0.0, {});
  options.method = Method::kSma;
  options.num_threads = 2;
  return options;
}

// Seeds 1..n written as <scratch>/ckpt-i (steps 100 i), oldest first.
std::vector<fs::path> write_inputs(const ScratchDir& scratch, int n,
                                   const std::vector<TensorSpec>& specs,
                                   uint64_t max_shard_bytes = io::kDefaultMaxShardBytes) {
  std::vector<fs::path> dirs;
  for (int i = 1; i <= n; ++i) {
    dirs.push_back(scratch / fmt::format("ckpt-{}", i));
    write_model(dirs.back(), make_tensors(specs, static_cast<uint64_t>(i)), tiny_config(), 100 * i,
                max_shard_bytes);
  }
  return dirs;
}

// The two model directories hold the same tensors with the same bytes.
void expect_same_tensors(const fs::path& a, const fs::path& b) {
  const auto tensors_a = read_all(a);
  const auto tensors_b = read_all(b);
  ASSERT_EQ(tensors_a.size(), tensors_b.size());
  for (size_t i = 0; i < tensors_a.size(); ++i) {
    EXPECT_EQ(tensors_a[i].first, tensors_b[i].first);
    EXPECT_TRUE(tensors_a[i].second == tensors_b[i].second)
        << "tensor " << tensors_a[i].first << " differs between " << a << " and " << b;
  }
}

json read_json(const fs::path& path) {
  return json::parse(read_bytes(path));
}

// The merge must have failed without an output and without a staging directory beside it.
void expect_nothing_left(const fs::path& output) {
  EXPECT_FALSE(fs::exists(output)) << output;
  EXPECT_EQ(staging_leftovers(output.parent_path()), std::vector<std::string>{});
}

TEST(MergeCheckpoints, CopiesMergeToThemselves) {
  ScratchDir scratch;
  // BF16 with fp32 accumulation: identity for every N (kernel_test); here N = 3.
  const std::vector<OwnedTensor> tensors =
      make_tensors(model_specs(io::DType::kBF16, io::DType::kBF16), 5);
  std::vector<fs::path> copies;
  for (int i = 0; i < 3; ++i) {
    copies.push_back(scratch / fmt::format("copy-{}", i));
    write_model(copies.back(), tensors);
  }
  merge_checkpoints(sma_options(copies, scratch / "bf16"));
  expect_same_tensors(scratch / "bf16", copies[0]);
  EXPECT_TRUE(read_bytes(scratch / "bf16" / "model.safetensors") ==
              read_bytes(copies[0] / "model.safetensors"))
      << "the same header and layout as io::write_model_weights";

  // F32 with fp32 accumulation: identity for N = 4 (not 3 or 8); with fp64 for N = 3.
  const std::vector<OwnedTensor> f32 =
      make_tensors(model_specs(io::DType::kF32, io::DType::kF32), 6);
  std::vector<fs::path> f32_copies;
  for (int i = 0; i < 4; ++i) {
    f32_copies.push_back(scratch / fmt::format("f32-copy-{}", i));
    write_model(f32_copies.back(), f32);
  }
  merge_checkpoints(sma_options(f32_copies, scratch / "f32"));
  expect_same_tensors(scratch / "f32", f32_copies[0]);
  MergeOptions fp64 = sma_options({f32_copies[0], f32_copies[1], f32_copies[2]}, scratch / "fp64");
  fp64.accumulate = Accumulate::kFp64;
  merge_checkpoints(fp64);
  expect_same_tensors(scratch / "fp64", f32_copies[0]);
}

TEST(MergeCheckpoints, EachTensorIsTheKernelOverItsInputs) {
  ScratchDir scratch;
  const std::vector<fs::path> inputs = write_inputs(scratch, 3, model_specs());
  MergeOptions options = sma_options(inputs, scratch / "out");
  options.method = Method::kEma;
  options.alpha = 0.2;
  options.weights = merge_weights(Method::kEma, 3, 0.2, {});
  options.output_dtype = io::DType::kF16;
  merge_checkpoints(options);

  std::vector<io::ModelWeights> opened;
  for (const fs::path& input : inputs) opened.push_back(io::ModelWeights::open(input));
  const io::ModelWeights merged = io::ModelWeights::open(scratch / "out");
  ASSERT_EQ(merged.names(), opened[0].names());
  for (const std::string& name : merged.names()) {
    const io::TensorInfo& info = opened[0].info(name);
    EXPECT_EQ(merged.info(name).shape, info.shape) << name;
    if (!io::is_convertible_float(info.dtype)) {
      EXPECT_EQ(merged.info(name).dtype, info.dtype) << name;
      const auto copied = merged.data(name);
      const auto original = opened[2].data(name);
      EXPECT_TRUE(std::equal(copied.begin(), copied.end(), original.begin(), original.end()));
      continue;
    }
    EXPECT_EQ(merged.info(name).dtype, io::DType::kF16) << name;
    std::vector<const std::byte*> sources;
    for (const io::ModelWeights& input : opened) sources.push_back(input.data(name).data());
    std::vector<std::byte> expected(static_cast<size_t>(info.numel()) * 2);
    merge_elements(sources, info.dtype, options.weights, Accumulate::kFp32, io::DType::kF16,
                   info.numel(), expected.data());
    const auto data = merged.data(name);
    EXPECT_TRUE(std::equal(data.begin(), data.end(), expected.begin(), expected.end())) << name;
  }
}

TEST(MergeCheckpoints, ThreadCountDoesNotChangeAByte) {
  ScratchDir scratch;
  // 1.5 M elements: more than one work piece, so threads split tensors as well.
  const std::vector<TensorSpec> specs = {{"big", io::DType::kF32, {1536, 1024}},
                                         {"small", io::DType::kBF16, {7, 3}},
                                         {"norm", io::DType::kF32, {1024}}};
  const std::vector<fs::path> inputs = write_inputs(scratch, 3, specs, 4'000'000);
  MergeOptions options = sma_options(inputs, scratch / "one");
  options.method = Method::kWma;
  options.weights = merge_weights(Method::kWma, 3, 0.0, {});
  options.max_shard_bytes = 3'000'000;
  options.num_threads = 1;
  merge_checkpoints(options);
  options.output = scratch / "three";
  options.num_threads = 3;
  merge_checkpoints(options);
  const std::vector<std::string> files = list_dir(scratch / "one");
  EXPECT_EQ(files, list_dir(scratch / "three"));
  for (const std::string& file : files) {
    EXPECT_TRUE(read_bytes(scratch / "one" / file) == read_bytes(scratch / "three" / file)) << file;
  }
}

TEST(MergeCheckpoints, ShardedInputsAndOutputWithIndex) {
  ScratchDir scratch;
  const std::vector<TensorSpec> specs = model_specs(io::DType::kF32);
  const std::vector<fs::path> single = write_inputs(scratch, 2, specs);
  std::vector<fs::path> sharded;
  for (int i = 1; i <= 2; ++i) {
    sharded.push_back(scratch / fmt::format("sharded-{}", i));
    write_model(sharded.back(), make_tensors(specs, static_cast<uint64_t>(i)), tiny_config(),
                100 * i, 5000);
  }
  ASSERT_TRUE(fs::exists(sharded[0] / io::kWeightsIndexFile));
  MergeOptions options = sma_options(sharded, scratch / "out");
  options.max_shard_bytes = 6000;
  const MergeSummary summary = merge_checkpoints(options);
  merge_checkpoints(sma_options(single, scratch / "reference"));

  const fs::path out = scratch / "out";
  EXPECT_FALSE(fs::exists(out / "model.safetensors"));
  const json index = read_json(out / io::kWeightsIndexFile);
  uint64_t total_tensor_bytes = 0;
  uint64_t file_bytes = 0;
  std::set<std::string> shard_files;
  for (const auto& [name, file] : index["weight_map"].items()) shard_files.insert(file);
  for (const std::string& file : shard_files) {
    EXPECT_TRUE(file.starts_with("model-0000") &&
                file.ends_with(fmt::format("-of-{:05d}.safetensors", shard_files.size())))
        << file;
    const io::SafetensorsFile shard = io::SafetensorsFile::open(out / file);
    uint64_t shard_tensor_bytes = 0;
    for (const io::TensorInfo& info : shard.tensors()) {
      EXPECT_EQ(index["weight_map"][info.name], file);
      shard_tensor_bytes += info.end - info.begin;
    }
    EXPECT_TRUE(shard_tensor_bytes <= 6000 || shard.tensors().size() == 1) << file;
    EXPECT_EQ(shard.metadata().at("format"), "pt");
    total_tensor_bytes += shard_tensor_bytes;
    file_bytes += fs::file_size(out / file);
  }
  EXPECT_GE(shard_files.size(), 2u);
  EXPECT_EQ(index["metadata"]["total_size"].get<uint64_t>(), total_tensor_bytes);
  EXPECT_EQ(summary.bytes_written, file_bytes);
  EXPECT_EQ(summary.bytes_read, 2 * total_tensor_bytes);
  EXPECT_EQ(summary.num_tensors, static_cast<int64_t>(specs.size()));
  // The same numbers as from single-file inputs into a single-file output.
  expect_same_tensors(out, scratch / "reference");
}

TEST(MergeCheckpoints, CarriesConfigAndTokenizerAndRecordsProvenance) {
  ScratchDir scratch;
  const std::vector<fs::path> inputs = write_inputs(scratch, 2, model_specs());
  json newest_config = tiny_config();
  newest_config["torch_dtype"] = "bfloat16";
  newest_config["transformers_version"] = "4.50.0";
  io::write_file_atomic(inputs[1] / "config.json", newest_config.dump(4));
  MergeOptions options = sma_options(inputs, scratch / "same-dtype");
  merge_checkpoints(options);
  EXPECT_EQ(read_bytes(scratch / "same-dtype" / "config.json"),
            read_bytes(inputs[1] / "config.json"));
  EXPECT_EQ(read_bytes(scratch / "same-dtype" / "tokenizer.json"),
            read_bytes(inputs[1] / "tokenizer.json"));
  EXPECT_FALSE(fs::exists(scratch / "same-dtype" / "trainer_state.json"));

  options.output = scratch / "f32";
  options.output_dtype = io::DType::kF32;
  options.accumulate = Accumulate::kFp64;
  merge_checkpoints(options);
  const json config = read_json(scratch / "f32" / "config.json");
  EXPECT_EQ(config["torch_dtype"], "float32");
  EXPECT_EQ(config["hidden_size"], 8);
  const io::ModelWeights merged = io::ModelWeights::open(scratch / "f32");
  EXPECT_EQ(merged.info("model.embed_tokens.weight").dtype, io::DType::kF32);
  EXPECT_EQ(merged.info("model.rotary_emb.positions").dtype, io::DType::kI64);

  const json info = read_json(scratch / "f32" / kMergeInfoFile);
  EXPECT_EQ(info["format_version"], kMergeInfoFormatVersion);
  EXPECT_EQ(info["method"], "sma");
  EXPECT_EQ(info["accumulate"], "fp64");
  EXPECT_EQ(info["output_dtype"], "F32");
  EXPECT_TRUE(info["alpha"].is_null());
  EXPECT_FALSE(info["moeforge_version"].get<std::string>().empty());
  ASSERT_EQ(info["inputs"].size(), 2u);
  EXPECT_EQ(info["inputs"][0]["path"], fs::canonical(inputs[0]).string());
  EXPECT_EQ(info["inputs"][0]["step"], 100);
  EXPECT_EQ(info["inputs"][1]["tokens_seen"], 200000);
  EXPECT_EQ(info["inputs"][1]["weight"], 0.5);
  const json fp32_info = read_json(scratch / "same-dtype" / kMergeInfoFile);
  EXPECT_EQ(fp32_info["output_dtype"], "input");
}

TEST(MergeCheckpoints, ReportsProgressUpToTheEnd) {
  ScratchDir scratch;
  const std::vector<fs::path> inputs = write_inputs(scratch, 2, model_specs());
  std::vector<MergeProgress> reports;
  merge_checkpoints(sma_options(inputs, scratch / "out"),
                    [&](const MergeProgress& p) { reports.push_back(p); });
  ASSERT_FALSE(reports.empty());
  const MergeProgress& last = reports.back();
  EXPECT_EQ(last.num_tensors, static_cast<int64_t>(model_specs().size()));
  EXPECT_EQ(last.tensors_done, last.num_tensors);
  EXPECT_EQ(last.bytes_read, last.total_bytes);
  EXPECT_GT(last.total_bytes, 0u);
}

// A model that differs from the one model_specs() describes in one respect.
void rewrite_input(const fs::path& dir, std::vector<TensorSpec> specs) {
  fs::remove_all(dir);
  write_model(dir, make_tensors(specs, 9), tiny_config(), 900);
}

TEST(MergeCheckpoints, MismatchedInputsFailNamingInputAndTensor) {
  ScratchDir scratch;
  const std::vector<fs::path> inputs = write_inputs(scratch, 3, model_specs());
  const fs::path output = scratch / "out";
  const auto expect_merge_error = [&](const std::vector<std::string>& fragments) {
    expect_error([&] { merge_checkpoints(sma_options(inputs, output)); }, fragments);
    expect_nothing_left(output);
  };

  std::vector<TensorSpec> specs = model_specs();
  specs[2].shape = {4, 16};
  rewrite_input(inputs[2], specs);
  expect_merge_error({"tensor 'model.layers.0.block_sparse_moe.gate.weight'", "shape [4, 16]",
                      inputs[2].string(), "[4, 32]"});

  specs = model_specs();
  specs.erase(specs.begin() + 3);
  rewrite_input(inputs[2], specs);
  expect_merge_error(
      {"tensor 'model.layers.0.input_layernorm.weight'", "missing from input", inputs[2].string()});

  specs = model_specs();
  specs.push_back({"extra.weight", io::DType::kF32, {2}});
  rewrite_input(inputs[2], specs);
  expect_merge_error({"has tensor 'extra.weight'", "lacks"});

  specs = model_specs();
  specs[0].dtype = io::DType::kF16;
  rewrite_input(inputs[2], specs);
  expect_merge_error(
      {"tensor 'model.embed_tokens.weight' has dtype F16", "but BF16", inputs[2].string()});

  rewrite_input(inputs[2], model_specs());
  json config = tiny_config();
  config["num_hidden_layers"] = 2;
  config["torch_dtype"] = "bfloat16";  // dtype fields may differ; the layer count may not
  io::write_file_atomic(inputs[2] / "config.json", config.dump());
  expect_merge_error(
      {"config.json of input", inputs[2].string(), "'/num_hidden_layers'", "(2 vs 1)"});

  rewrite_input(inputs[2], model_specs());
  std::vector<OwnedTensor> other_ints = make_tensors(model_specs(), 3);
  other_ints[4].data[0] = std::byte{0x7F};
  fs::remove_all(inputs[1]);
  write_model(inputs[1], other_ints, tiny_config(), 200);
  expect_merge_error({"tensor 'model.rotary_emb.positions' (I64) differs", "must be equal"});
}

TEST(MergeCheckpoints, TruncatedShardFails) {
  ScratchDir scratch;
  const std::vector<fs::path> inputs = write_inputs(scratch, 2, model_specs(), 3000);
  const fs::path shard = inputs[1] / "model-00002-of-00003.safetensors";
  ASSERT_TRUE(fs::exists(shard));
  fs::resize_file(shard, fs::file_size(shard) - 10);
  const fs::path output = scratch / "out";
  expect_error([&] { merge_checkpoints(sma_options(inputs, output)); },
               {shard.string(), "truncated"});
  expect_nothing_left(output);
}

TEST(MergeCheckpoints, UnmergeableDtypeFails) {
  ScratchDir scratch;
  std::vector<TensorSpec> specs = model_specs();
  specs.push_back({"scales", io::DType::kF8E4M3, {4}});
  const std::vector<fs::path> inputs = write_inputs(scratch, 2, specs);
  expect_error([&] { merge_checkpoints(sma_options(inputs, scratch / "out")); },
               {"tensor 'scales'", "dtype F8_E4M3", "cannot average"});
  expect_nothing_left(scratch / "out");
}

TEST(MergeCheckpoints, RefusesBadPaths) {
  ScratchDir scratch;
  const std::vector<fs::path> inputs = write_inputs(scratch, 2, model_specs());
  const auto expect_merge_error = [&](const std::vector<fs::path>& in, const fs::path& out,
                                      const std::vector<std::string>& fragments) {
    const std::vector<std::string> before = list_dir(scratch.path());
    expect_error([&] { merge_checkpoints(sma_options(in, out)); }, fragments);
    EXPECT_EQ(list_dir(scratch.path()), before);
    EXPECT_EQ(staging_leftovers(out.parent_path()), std::vector<std::string>{});
  };
  expect_merge_error({inputs[0], inputs[1], scratch / "ckpt-1" / ".." / "ckpt-1"}, scratch / "out",
                     {"is given twice", "inputs 1 and 3"});
  expect_merge_error(inputs, inputs[1], {"is the same directory as input", inputs[1].string()});
  expect_merge_error(inputs, scratch / "ckpt-1" / ".." / "ckpt-2" / "",
                     {"is the same directory as input"});
  expect_merge_error(inputs, inputs[0] / "merged", {"lies inside input", inputs[0].string()});
  EXPECT_FALSE(fs::exists(inputs[0] / "merged"));
  fs::create_directories(scratch / "taken");
  expect_merge_error(inputs, scratch / "taken", {"already exists", "never overwrites"});
  expect_merge_error({inputs[0], scratch / "absent"}, scratch / "out",
                     {"input", "absent", "does not exist"});
  MergeOptions options = sma_options(inputs, scratch / "out");
  options.weights = {1.0};
  expect_error([&] { merge_checkpoints(options); }, {"got 1 weights for 2 inputs"});
  expect_nothing_left(scratch / "out");
}

}  // namespace
}  // namespace moeforge::merge
