// Tests of Windows (windows.h): the "stream", "packed" and "single" layouts on hand-built datasets
// whose windows are known exactly, padding and loss masks in read(), the document list that
// TokenDataset reads from dataset.json (including the document the stream_tail rule cuts), the
// errors, BatchSampler over packed windows, and the layouts of a dataset from prepare_dataset.
#include "data/windows.h"

#include "core/error.h"
#include "core/rng.h"
#include "data/byte_tokenizer.h"
#include "data/loader.h"
#include "data/prepare.h"
#include "data/token_shard.h"
#include "test_util.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <numeric>
#include <optional>
#include <set>
#include <utility>

namespace moeforge::data {
namespace {

namespace fs = std::filesystem;
using testing::add_loss_mask;
using testing::byte_document_tokens;
using testing::mask_value;
using testing::read_file;
using testing::read_split;
using testing::TempDir;
using testing::write_file;

constexpr int64_t kVocabSize = 100000;
constexpr int32_t kEosId = 99999;
// The val stream is kValFirstToken, kValFirstToken + 1, ... (train's is 0, 1, ...).
constexpr int32_t kValFirstToken = 1000;

struct Document {
  std::string split;  // "train", "val" or "train+val"
  int64_t num_tokens = 0;
};

std::vector<Document> train_documents(const std::vector<int64_t>& lengths) {
  std::vector<Document> documents;
  for (int64_t length : lengths) documents.push_back({"train", length});
  return documents;
}

// Writes the shards of one split (its stream is first_token, first_token + 1, ...) and returns
// its dataset.json entry.
nlohmann::json write_split(const fs::path& dir, const std::string& split,
                           const std::vector<int64_t>& shard_sizes, int32_t first_token) {
  nlohmann::json shards = nlohmann::json::array();
  int64_t num_tokens = 0;
  for (size_t shard_idx = 0; shard_idx < shard_sizes.size(); ++shard_idx) {
    std::vector<int32_t> tokens(static_cast<size_t>(shard_sizes[shard_idx]));
    std::iota(tokens.begin(), tokens.end(), static_cast<int32_t>(first_token + num_tokens));
    num_tokens += shard_sizes[shard_idx];
    const std::string name = split + "-0000" + std::to_string(shard_idx) + ".bin";
    write_token_shard(dir / name, tokens, kVocabSize);
    shards.push_back({{"file", name}, {"num_tokens", shard_sizes[shard_idx]}});
  }
  return {{"num_tokens", num_tokens}, {"shards", shards}};
}

// A dataset whose train stream is 0, 1, 2, ... (so a window is known by its tokens) and whose
// val stream is kValFirstToken, ..., cut into shards of the given sizes; dataset.json records
// the tokenizer's EOS id kEosId and, unless nullopt, the document list.
void write_dataset(const fs::path& dir, const std::vector<int64_t>& train_shard_sizes,
                   const std::vector<int64_t>& val_shard_sizes,
                   const std::optional<std::vector<Document>>& documents) {
  fs::create_directories(dir);
  nlohmann::json dataset = {
      {"format_version", 1},
      {"tokenizer", {{"kind", "test"}, {"vocab_size", kVocabSize}, {"eos_id", kEosId}}},
      {"vocab_size", kVocabSize},
      {"splits",
       {{"train", write_split(dir, "train", train_shard_sizes, 0)},
        {"val", write_split(dir, "val", val_shard_sizes, kValFirstToken)}}}};
  if (documents.has_value()) {
    nlohmann::json list = nlohmann::json::array();
    for (const Document& document : *documents) {
      list.push_back({{"split", document.split}, {"num_tokens", document.num_tokens}});
    }
    dataset["documents"] = list;
  }
  write_file(dir / kDatasetJsonName, dataset.dump());
}

// The train stream 0..43 in shards {10, 1, 20, 13}, documents of lengths 5, 4, 9, 3, 3, 20
// (starts 0, 5, 9, 18, 21, 24).
void write_six_documents(const fs::path& dir) {
  write_dataset(dir, {10, 1, 20, 13}, {}, train_documents({5, 4, 9, 3, 3, 20}));
}

using Spans = std::vector<std::pair<int64_t, int64_t>>;

Spans spans_of(const Windows& windows) {
  Spans spans;
  for (int64_t window_idx = 0; window_idx < windows.num_windows(); ++window_idx) {
    const WindowSpan span = windows.span(window_idx);
    spans.emplace_back(span.begin, span.end);
  }
  return spans;
}

struct WindowTokens {
  std::vector<int32_t> inputs;
  std::vector<int32_t> targets;
};

WindowTokens read_window(const Windows& windows, int64_t window_idx) {
  WindowTokens window{std::vector<int32_t>(windows.seq_len(), -7),
                      std::vector<int32_t>(windows.seq_len(), -7)};
  windows.read(window_idx, window.inputs.data(), window.targets.data());
  return window;
}

// What read() gives for the span [begin, end) of the train stream 0, 1, 2, ... without a mask.
WindowTokens expected_window(int64_t begin, int64_t end, int64_t seq_len) {
  WindowTokens window{std::vector<int32_t>(seq_len, kEosId), std::vector<int32_t>(seq_len, -1)};
  for (int64_t t = 0; t < end - begin - 1; ++t) {
    window.inputs[t] = static_cast<int32_t>(begin + t);
    window.targets[t] = static_cast<int32_t>(begin + t + 1);
  }
  return window;
}

void expect_window(const Windows& windows, int64_t window_idx, const WindowTokens& expected) {
  const WindowTokens window = read_window(windows, window_idx);
  EXPECT_EQ(window.inputs, expected.inputs) << "window " << window_idx;
  EXPECT_EQ(window.targets, expected.targets) << "window " << window_idx;
}

TEST(Windows, StreamLayoutCutsFixedStridesAcrossDocuments) {
  TempDir dir;
  write_six_documents(dir.path());
  const TokenDataset dataset = TokenDataset::open(dir.path(), "train");
  ASSERT_EQ(dataset.num_tokens(), 44);
  constexpr int64_t kSeqLen = 8;
  const Windows windows(dataset, kSeqLen, WindowLayout::kStream);
  EXPECT_EQ(windows.layout(), WindowLayout::kStream);
  EXPECT_EQ(windows.seq_len(), kSeqLen);
  ASSERT_EQ(windows.num_windows(), (44 - 1) / kSeqLen);
  for (int64_t window_idx = 0; window_idx < windows.num_windows(); ++window_idx) {
    EXPECT_EQ(windows.span(window_idx), (WindowSpan{window_idx * 8, window_idx * 8 + 9}));
    // No padding: the window crosses document boundaries (5, 9, ...) and shard boundaries.
    expect_window(windows, window_idx, expected_window(window_idx * 8, window_idx * 8 + 9, 8));
  }
  EXPECT_EQ(read_window(windows, 4).targets,
            (std::vector<int32_t>{33, 34, 35, 36, 37, 38, 39, 40}));
  EXPECT_THROW(windows.span(5), Error);

  EXPECT_EQ(Windows(dataset, 43, WindowLayout::kStream).num_windows(), 1);
  EXPECT_EQ(Windows(dataset, 44, WindowLayout::kStream).num_windows(), 0);
  EXPECT_EQ(Windows(dataset, 1, WindowLayout::kStream).num_windows(), 43);
  // The stream layout needs no document list.
  TempDir plain_dir;
  write_dataset(plain_dir.path(), {44}, {}, std::nullopt);
  const TokenDataset plain = TokenDataset::open(plain_dir.path(), "train");
  EXPECT_FALSE(plain.document_starts().has_value());
  const Windows plain_windows(plain, kSeqLen, WindowLayout::kStream);
  ASSERT_EQ(plain_windows.num_windows(), 5);
  expect_window(plain_windows, 2, expected_window(16, 25, kSeqLen));
}

TEST(Windows, DatasetReadsTheDocumentStartsAndEosId) {
  TempDir dir;
  write_six_documents(dir.path());
  const TokenDataset dataset = TokenDataset::open(dir.path(), "train");
  ASSERT_TRUE(dataset.document_starts().has_value());
  EXPECT_EQ(*dataset.document_starts(), (std::vector<int64_t>{0, 5, 9, 18, 21, 24}));
  ASSERT_TRUE(dataset.eos_id().has_value());
  EXPECT_EQ(*dataset.eos_id(), kEosId);
  const TokenDataset val = TokenDataset::open(dir.path(), "val");
  ASSERT_TRUE(val.document_starts().has_value());
  EXPECT_TRUE(val.document_starts()->empty());
}

// Documents 5, 4, 9, 3, 3, 20 (starts 0, 5, 9, 18, 21, 24, end 44) with seq_len 8 (windows of
// at most 9 tokens): [0, 9) holds documents 0 and 1; document 2 fills [9, 18) alone; documents 3
// and 4 share [18, 24) (adding document 5 would overflow); document 5 is cut at strides of 8
// into [24, 33), [32, 41), [40, 44).
TEST(Windows, PackedLayoutPacksWholeDocumentsGreedily) {
  TempDir dir;
  write_six_documents(dir.path());
  const TokenDataset dataset = TokenDataset::open(dir.path(), "train");
  constexpr int64_t kSeqLen = 8;
  const Windows windows(dataset, kSeqLen, WindowLayout::kPacked);
  EXPECT_EQ(windows.layout(), WindowLayout::kPacked);
  EXPECT_EQ(&windows.dataset(), &dataset);
  const Spans expected = {{0, 9}, {9, 18}, {18, 24}, {24, 33}, {32, 41}, {40, 44}};
  ASSERT_EQ(spans_of(windows), expected);
  ASSERT_EQ(windows.num_windows(), 6);
  for (int64_t window_idx = 0; window_idx < windows.num_windows(); ++window_idx) {
    const auto [begin, end] = expected[window_idx];
    expect_window(windows, window_idx, expected_window(begin, end, kSeqLen));
  }
  // Spelled out: documents 3 and 4 (tokens 18..23), then padding. The last real target is
  // document 4's last token 23, not document 5's first token 24.
  const WindowTokens shared = read_window(windows, 2);
  EXPECT_EQ(shared.inputs, (std::vector<int32_t>{18, 19, 20, 21, 22, kEosId, kEosId, kEosId}));
  EXPECT_EQ(shared.targets, (std::vector<int32_t>{19, 20, 21, 22, 23, -1, -1, -1}));
  // A full window: no padding, the documents 0 and 1 across shards 0 and 1 (token 10).
  const WindowTokens full = read_window(windows, 0);
  EXPECT_EQ(full.inputs, (std::vector<int32_t>{0, 1, 2, 3, 4, 5, 6, 7}));
  EXPECT_EQ(full.targets, (std::vector<int32_t>{1, 2, 3, 4, 5, 6, 7, 8}));
  // The last chunk of document 5.
  const WindowTokens tail = read_window(windows, 5);
  EXPECT_EQ(tail.inputs,
            (std::vector<int32_t>{40, 41, 42, kEosId, kEosId, kEosId, kEosId, kEosId}));
  EXPECT_EQ(tail.targets, (std::vector<int32_t>{41, 42, 43, -1, -1, -1, -1, -1}));

  const std::string message = MF_ERROR_MESSAGE(windows.span(6));
  EXPECT_NE(message.find("window 6 is outside its 6 windows of seq_len 8 (layout packed)"),
            std::string::npos)
      << message;
  EXPECT_THROW(windows.span(-1), Error);
}

TEST(Windows, SingleLayoutHoldsOneDocumentPerWindow) {
  TempDir dir;
  write_six_documents(dir.path());
  const TokenDataset dataset = TokenDataset::open(dir.path(), "train");
  constexpr int64_t kSeqLen = 8;
  const Windows windows(dataset, kSeqLen, WindowLayout::kSingle);
  EXPECT_EQ(windows.layout(), WindowLayout::kSingle);
  const Spans expected = {{0, 5},   {5, 9},   {9, 18},  {18, 21},
                          {21, 24}, {24, 33}, {32, 41}, {40, 44}};
  ASSERT_EQ(spans_of(windows), expected);
  for (int64_t window_idx = 0; window_idx < windows.num_windows(); ++window_idx) {
    const auto [begin, end] = expected[window_idx];
    expect_window(windows, window_idx, expected_window(begin, end, kSeqLen));
  }
  const WindowTokens third = read_window(windows, 3);
  EXPECT_EQ(third.inputs,
            (std::vector<int32_t>{18, 19, kEosId, kEosId, kEosId, kEosId, kEosId, kEosId}));
  EXPECT_EQ(third.targets, (std::vector<int32_t>{19, 20, -1, -1, -1, -1, -1, -1}));
  // A larger seq_len does not pack: still one window per document.
  const Windows wide(dataset, 64, WindowLayout::kSingle);
  EXPECT_EQ(spans_of(wide), (Spans{{0, 5}, {5, 9}, {9, 18}, {18, 21}, {21, 24}, {24, 44}}));
  const Windows wide_packed(dataset, 64, WindowLayout::kPacked);
  EXPECT_EQ(spans_of(wide_packed), (Spans{{0, 44}}));
}

// A document of seq_len + 1 tokens is one full window; one of seq_len + 2 is two, the second
// holding its last two tokens.
TEST(Windows, DocumentsAroundTheWindowSize) {
  TempDir dir;
  // Starts 0, 9, 19, end 21.
  write_dataset(dir.path(), {21}, {}, train_documents({9, 10, 2}));
  const TokenDataset dataset = TokenDataset::open(dir.path(), "train");
  for (WindowLayout layout : {WindowLayout::kPacked, WindowLayout::kSingle}) {
    const Windows windows(dataset, 8, layout);
    EXPECT_EQ(spans_of(windows), (Spans{{0, 9}, {9, 18}, {17, 19}, {19, 21}}))
        << window_layout_name(layout);
  }
  // seq_len 1: windows of two tokens; documents of 2 tokens are one window each.
  TempDir pairs_dir;
  write_dataset(pairs_dir.path(), {7}, {}, train_documents({2, 3, 2}));
  const TokenDataset pairs = TokenDataset::open(pairs_dir.path(), "train");
  for (WindowLayout layout : {WindowLayout::kPacked, WindowLayout::kSingle}) {
    const Windows windows(pairs, 1, layout);
    EXPECT_EQ(spans_of(windows), (Spans{{0, 2}, {2, 4}, {3, 5}, {5, 7}}))
        << window_layout_name(layout);
    expect_window(windows, 2, expected_window(3, 5, 1));
  }
}

// Random document lengths and seq_lens: every window lies inside one document ("single") or
// holds whole documents or a piece of one long document ("packed"); each token is a target
// exactly once, except the first token of each window that starts a document (never a target);
// a packed window of whole documents could not take the next document too.
TEST(Windows, EveryTokenIsATargetOnceOutsideWindowStarts) {
  Rng rng(2024);
  for (int case_idx = 0; case_idx < 40; ++case_idx) {
    std::vector<int64_t> lengths(1 + rng.below(12));
    for (int64_t& length : lengths) length = 2 + static_cast<int64_t>(rng.below(30));
    const int64_t seq_len = 1 + static_cast<int64_t>(rng.below(16));
    const int64_t num_tokens = std::accumulate(lengths.begin(), lengths.end(), int64_t{0});
    std::vector<int64_t> starts;
    std::vector<int64_t> doc_of(num_tokens);
    for (int64_t length : lengths) {
      const int64_t begin = starts.empty() ? 0 : starts.back() + lengths[starts.size() - 1];
      starts.push_back(begin);
      std::fill(doc_of.begin() + begin, doc_of.begin() + begin + length,
                static_cast<int64_t>(starts.size()) - 1);
    }
    auto end_of = [&](int64_t doc_idx) { return starts[doc_idx] + lengths[doc_idx]; };
    TempDir dir;
    write_dataset(dir.path(), {num_tokens}, {}, train_documents(lengths));
    const TokenDataset dataset = TokenDataset::open(dir.path(), "train");
    ASSERT_EQ(*dataset.document_starts(), starts);
    for (WindowLayout layout : {WindowLayout::kPacked, WindowLayout::kSingle}) {
      SCOPED_TRACE("case " + std::to_string(case_idx) + " seq_len " + std::to_string(seq_len) +
                   " layout " + window_layout_name(layout));
      const Windows windows(dataset, seq_len, layout);
      std::vector<int> times_target(num_tokens, 0);
      std::set<int64_t> window_begins;
      for (int64_t window_idx = 0; window_idx < windows.num_windows(); ++window_idx) {
        const WindowSpan span = windows.span(window_idx);
        ASSERT_GE(span.end - span.begin, 2) << window_idx;
        ASSERT_LE(span.end - span.begin, seq_len + 1) << window_idx;
        if (window_idx > 0) {
          ASSERT_GT(span.begin, windows.span(window_idx - 1).begin);
        }
        const int64_t first_doc = doc_of[span.begin];
        const int64_t last_doc = doc_of[span.end - 1];
        if (first_doc != last_doc) {
          // Only "packed" spans documents, and then whole ones.
          EXPECT_EQ(layout, WindowLayout::kPacked) << window_idx;
          EXPECT_EQ(span.begin, starts[first_doc]) << window_idx;
          EXPECT_EQ(span.end, end_of(last_doc)) << window_idx;
        }
        if (layout == WindowLayout::kPacked && span.begin == starts[first_doc] &&
            span.end == end_of(last_doc) && last_doc + 1 < static_cast<int64_t>(lengths.size()) &&
            lengths[last_doc + 1] <= seq_len + 1) {
          EXPECT_GT(end_of(last_doc + 1) - span.begin, seq_len + 1)
              << "window " << window_idx << " could take the next document";
        }
        if (span.begin == starts[first_doc]) window_begins.insert(span.begin);
        for (int64_t t = span.begin + 1; t < span.end; ++t) ++times_target[t];
        expect_window(windows, window_idx, expected_window(span.begin, span.end, seq_len));
      }
      for (int64_t t = 0; t < num_tokens; ++t) {
        EXPECT_EQ(times_target[t], window_begins.count(t) ? 0 : 1) << "token " << t;
      }
      if (layout == WindowLayout::kSingle) {
        EXPECT_EQ(window_begins, std::set<int64_t>(starts.begin(), starts.end()));
      }
    }
  }
}

TEST(Windows, LossMaskAndPaddingAreMinusOneInPackedWindows) {
  TempDir dir;
  write_six_documents(dir.path());
  add_loss_mask(dir.path());
  const TokenDataset dataset = TokenDataset::open(dir.path(), "train");
  ASSERT_TRUE(dataset.has_loss_mask());
  constexpr int64_t kSeqLen = 8;
  const Windows windows(dataset, kSeqLen, WindowLayout::kPacked);
  ASSERT_EQ(windows.num_windows(), 6);
  // [0, 9): targets 1..8, masked where t % 7 < 3 (1, 2, 7, 8).
  WindowTokens window = read_window(windows, 0);
  EXPECT_EQ(window.inputs, (std::vector<int32_t>{0, 1, 2, 3, 4, 5, 6, 7}));
  EXPECT_EQ(window.targets, (std::vector<int32_t>{-1, -1, 3, 4, 5, 6, -1, -1}));
  // [18, 24): targets 19..23 (21, 22, 23 masked), then padding.
  window = read_window(windows, 2);
  EXPECT_EQ(window.inputs, (std::vector<int32_t>{18, 19, 20, 21, 22, kEosId, kEosId, kEosId}));
  EXPECT_EQ(window.targets, (std::vector<int32_t>{19, 20, -1, -1, -1, -1, -1, -1}));
  // [40, 44): targets 41..43 (42, 43 masked), then padding.
  window = read_window(windows, 5);
  EXPECT_EQ(window.inputs,
            (std::vector<int32_t>{40, 41, 42, kEosId, kEosId, kEosId, kEosId, kEosId}));
  EXPECT_EQ(window.targets, (std::vector<int32_t>{41, -1, -1, -1, -1, -1, -1, -1}));
  // Every window: the unmasked targets where the mask counts them, else -1.
  for (int64_t window_idx = 0; window_idx < windows.num_windows(); ++window_idx) {
    const WindowSpan span = windows.span(window_idx);
    WindowTokens expected = expected_window(span.begin, span.end, kSeqLen);
    for (int32_t& target : expected.targets) {
      if (target >= 0 && mask_value(target) == 0) target = -1;
    }
    expect_window(windows, window_idx, expected);
  }
}

TEST(Windows, PackedAndSingleNeedTheDocumentListAndEosId) {
  TempDir dir;
  write_dataset(dir.path(), {44}, {}, std::nullopt);
  const TokenDataset dataset = TokenDataset::open(dir.path(), "train");
  EXPECT_FALSE(dataset.document_starts().has_value());
  for (WindowLayout layout : {WindowLayout::kPacked, WindowLayout::kSingle}) {
    const std::string message = MF_ERROR_MESSAGE(Windows(dataset, 8, layout));
    EXPECT_NE(message.find("has no document list or no tokenizer EOS id"), std::string::npos)
        << message;
    EXPECT_NE(message.find("window layout \"" + window_layout_name(layout) + "\" needs both"),
              std::string::npos)
        << message;
    EXPECT_NE(message.find("prepare the dataset again with `moeforge data prepare`"),
              std::string::npos)
        << message;
    EXPECT_NE(message.find(dir.path().string()), std::string::npos) << message;
  }

  // A document list but no EOS id.
  TempDir no_eos_dir;
  write_six_documents(no_eos_dir.path());
  nlohmann::json json = nlohmann::json::parse(read_file(no_eos_dir / kDatasetJsonName));
  json["tokenizer"].erase("eos_id");
  write_file(no_eos_dir / kDatasetJsonName, json.dump());
  const TokenDataset no_eos = TokenDataset::open(no_eos_dir.path(), "train");
  EXPECT_FALSE(no_eos.eos_id().has_value());
  EXPECT_TRUE(no_eos.document_starts().has_value());
  const std::string message = MF_ERROR_MESSAGE(Windows(no_eos, 8, WindowLayout::kPacked));
  EXPECT_NE(message.find("window layout \"packed\" needs both"), std::string::npos) << message;
  EXPECT_EQ(MF_ERROR_MESSAGE(Windows(no_eos, 8, WindowLayout::kStream)), "");
  EXPECT_THROW(Windows(no_eos, 0, WindowLayout::kStream), Error);
}

TEST(Windows, DocumentListMustAddUpToEachSplit) {
  TempDir dir;
  // The train shards hold 44 tokens; the list gives train 43.
  write_dataset(dir.path(), {44}, {}, train_documents({5, 4, 9, 3, 3, 19}));
  std::string message = MF_ERROR_MESSAGE(TokenDataset::open(dir.path(), "train"));
  EXPECT_NE(message.find("the document list gives split 'train' 43 tokens, but its shards hold 44"),
            std::string::npos)
      << message;

  // The val shards hold 6 tokens; the list gives val 7.
  write_dataset(dir.path(), {9}, {6}, std::vector<Document>{{"train", 9}, {"val", 7}});
  EXPECT_EQ(MF_ERROR_MESSAGE(TokenDataset::open(dir.path(), "train")), "");
  message = MF_ERROR_MESSAGE(TokenDataset::open(dir.path(), "val"));
  EXPECT_NE(message.find("the document list gives split 'val' 7 tokens, but its shards hold 6"),
            std::string::npos)
      << message;

  // An unknown split name.
  write_dataset(dir.path(), {9}, {}, std::vector<Document>{{"train", 5}, {"test", 4}});
  message = MF_ERROR_MESSAGE(TokenDataset::open(dir.path(), "train"));
  EXPECT_NE(message.find("a document's split is \"test\" (train, val or train+val)"),
            std::string::npos)
      << message;

  // A cut document with no train tokens left for it.
  write_dataset(dir.path(), {5}, {6}, std::vector<Document>{{"train", 5}, {"train+val", 6}});
  message = MF_ERROR_MESSAGE(TokenDataset::open(dir.path(), "train"));
  EXPECT_NE(message.find("the document cut between train and val holds 6 tokens, but 0 train "
                         "tokens are left for it"),
            std::string::npos)
      << message;

  // A negative count that the others make up for would move the boundaries silently.
  write_dataset(dir.path(), {10}, {}, train_documents({6, -2, 6}));
  message = MF_ERROR_MESSAGE(TokenDataset::open(dir.path(), "train"));
  EXPECT_NE(message.find("a document of the document list holds -2 tokens"), std::string::npos)
      << message;

  // A document without its token count.
  write_dataset(dir.path(), {5}, {}, train_documents({5}));
  nlohmann::json json = nlohmann::json::parse(read_file(dir / kDatasetJsonName));
  json["documents"][0].erase("num_tokens");
  write_file(dir / kDatasetJsonName, json.dump());
  message = MF_ERROR_MESSAGE(TokenDataset::open(dir.path(), "train"));
  EXPECT_NE(message.find("num_tokens"), std::string::npos) << message;
}

TEST(Windows, LayoutNamesRoundTrip) {
  EXPECT_EQ(window_layout_name(WindowLayout::kStream), "stream");
  EXPECT_EQ(window_layout_name(WindowLayout::kPacked), "packed");
  EXPECT_EQ(window_layout_name(WindowLayout::kSingle), "single");
  for (WindowLayout layout :
       {WindowLayout::kStream, WindowLayout::kPacked, WindowLayout::kSingle}) {
    EXPECT_EQ(parse_window_layout(window_layout_name(layout), "data.windows"), layout);
  }
  for (const char* bad : {"bogus", "", "Packed", "stream "}) {
    const std::string message = MF_ERROR_MESSAGE(parse_window_layout(bad, "data.windows"));
    EXPECT_NE(message.find("data.windows must be one of stream, packed, single, got \"" +
                           std::string(bad) + "\""),
              std::string::npos)
        << message;
  }
}

// stream_tail: documents 5 (train), 6 (cut: 2 train, 4 val), 4 (val). Train is 0..6 with starts
// 0, 5; val is kValFirstToken + 0..7 with starts 0 (the rest of the cut document), 4.
TEST(Windows, StreamTailCutDocumentStartsBothSplits) {
  TempDir dir;
  write_dataset(dir.path(), {7}, {3, 5},
                std::vector<Document>{{"train", 5}, {"train+val", 6}, {"val", 4}});
  const TokenDataset train = TokenDataset::open(dir.path(), "train");
  const TokenDataset val = TokenDataset::open(dir.path(), "val");
  EXPECT_EQ(*train.document_starts(), (std::vector<int64_t>{0, 5}));
  EXPECT_EQ(*val.document_starts(), (std::vector<int64_t>{0, 4}));

  EXPECT_EQ(spans_of(Windows(train, 8, WindowLayout::kSingle)), (Spans{{0, 5}, {5, 7}}));
  EXPECT_EQ(spans_of(Windows(train, 8, WindowLayout::kPacked)), (Spans{{0, 7}}));
  EXPECT_EQ(spans_of(Windows(val, 8, WindowLayout::kSingle)), (Spans{{0, 4}, {4, 8}}));
  EXPECT_EQ(spans_of(Windows(val, 8, WindowLayout::kPacked)), (Spans{{0, 8}}));
  EXPECT_EQ(spans_of(Windows(val, 3, WindowLayout::kPacked)), (Spans{{0, 4}, {4, 8}}));
  const Windows val_single(val, 8, WindowLayout::kSingle);
  const WindowTokens first = read_window(val_single, 0);
  EXPECT_EQ(first.inputs,
            (std::vector<int32_t>{1000, 1001, 1002, kEosId, kEosId, kEosId, kEosId, kEosId}));
  EXPECT_EQ(first.targets, (std::vector<int32_t>{1001, 1002, 1003, -1, -1, -1, -1, -1}));

  // A cut leaving one token in train: train's last start is that token, which makes no window.
  write_dataset(dir.path(), {6}, {5}, std::vector<Document>{{"train", 5}, {"train+val", 6}});
  const TokenDataset short_train = TokenDataset::open(dir.path(), "train");
  const TokenDataset long_val = TokenDataset::open(dir.path(), "val");
  EXPECT_EQ(*short_train.document_starts(), (std::vector<int64_t>{0, 5}));
  EXPECT_EQ(*long_val.document_starts(), (std::vector<int64_t>{0}));
  EXPECT_EQ(spans_of(Windows(short_train, 8, WindowLayout::kSingle)), (Spans{{0, 5}}));
  EXPECT_EQ(spans_of(Windows(short_train, 8, WindowLayout::kPacked)), (Spans{{0, 6}}));
  EXPECT_EQ(spans_of(Windows(long_val, 8, WindowLayout::kSingle)), (Spans{{0, 5}}));

  // A cut leaving one token in val (at the end of the stream): val's only document makes no
  // window.
  write_dataset(dir.path(), {10}, {1}, std::vector<Document>{{"train", 5}, {"train+val", 6}});
  const TokenDataset one_token_val = TokenDataset::open(dir.path(), "val");
  EXPECT_EQ(*one_token_val.document_starts(), (std::vector<int64_t>{0}));
  EXPECT_EQ(Windows(one_token_val, 8, WindowLayout::kPacked).num_windows(), 0);
}

TEST(Windows, BatchSamplerVisitsEveryPackedWindowOncePerEpoch) {
  TempDir dir;
  write_six_documents(dir.path());
  const TokenDataset dataset = TokenDataset::open(dir.path(), "train");
  constexpr int64_t kSeqLen = 8;
  const Windows windows(dataset, kSeqLen, WindowLayout::kPacked);
  BatchSampler sampler(windows, 17);
  ASSERT_EQ(sampler.num_windows(), 6);
  EXPECT_EQ(sampler.seq_len(), kSeqLen);
  // Windows are told apart by their first input (their span's begin).
  std::vector<int32_t> begins;
  for (int64_t window_idx = 0; window_idx < windows.num_windows(); ++window_idx) {
    begins.push_back(static_cast<int32_t>(windows.span(window_idx).begin));
  }
  for (uint64_t epoch = 0; epoch < 3; ++epoch) {
    std::vector<int32_t> inputs(6 * kSeqLen);
    std::vector<int32_t> targets(6 * kSeqLen);
    sampler.next_batch(6, inputs.data(), targets.data());
    std::vector<int64_t> seen;
    for (int64_t row_idx = 0; row_idx < 6; ++row_idx) {
      const auto found = std::find(begins.begin(), begins.end(), inputs[row_idx * kSeqLen]);
      ASSERT_NE(found, begins.end()) << "epoch " << epoch << " row " << row_idx;
      const int64_t window_idx = found - begins.begin();
      seen.push_back(window_idx);
      const WindowTokens expected = read_window(windows, window_idx);
      EXPECT_EQ(std::vector<int32_t>(inputs.begin() + row_idx * kSeqLen,
                                     inputs.begin() + (row_idx + 1) * kSeqLen),
                expected.inputs);
      EXPECT_EQ(std::vector<int32_t>(targets.begin() + row_idx * kSeqLen,
                                     targets.begin() + (row_idx + 1) * kSeqLen),
                expected.targets);
    }
    EXPECT_EQ(seen, sampler.epoch_order(epoch)) << "epoch " << epoch;
    std::sort(seen.begin(), seen.end());
    EXPECT_EQ(seen, (std::vector<int64_t>{0, 1, 2, 3, 4, 5})) << "epoch " << epoch;
    EXPECT_EQ(sampler.state(), (LoaderState{epoch + 1, 0}));
  }
}

TEST(Windows, BatchSamplerNeedsOnePackedWindow) {
  TempDir dir;
  // Train holds one token, the start of the cut document: no window.
  write_dataset(dir.path(), {1}, {5}, std::vector<Document>{{"train+val", 6}});
  const TokenDataset dataset = TokenDataset::open(dir.path(), "train");
  const Windows windows(dataset, 8, WindowLayout::kPacked);
  EXPECT_EQ(windows.num_windows(), 0);
  const std::string message = MF_ERROR_MESSAGE(BatchSampler(windows, 0));
  EXPECT_NE(message.find("has 1 tokens, too few for one window: window layout \"packed\" needs a "
                         "document of 2 or more tokens"),
            std::string::npos)
      << message;
}

// Three documents of 7, 10 and 32 tokens.
const std::vector<std::pair<std::string, std::string>> kPreparedDocuments = {
    {"a.txt", "hello"}, {"b.txt", "hi there"}, {"c.txt", "a document of thirty bytes...."}};

PrepareOptions prepare_options(const TempDir& dir, const std::string& name, double val_fraction) {
  for (const auto& [file_name, text] : kPreparedDocuments) {
    write_file(dir / "corpus" / file_name, text);
  }
  PrepareOptions options;
  options.inputs = {dir / "corpus"};
  options.out_dir = dir / name;
  options.val_fraction = val_fraction;
  options.shard_tokens = 10;
  return options;
}

TEST(WindowsPrepared, PackedWindowsStartWithBosAtDocumentStarts) {
  TempDir dir;
  const PrepareSummary summary = prepare_dataset(prepare_options(dir, "out", 0.0));
  ASSERT_EQ(summary.val_rule, "none");
  const TokenDataset dataset = TokenDataset::open(dir / "out", "train");
  ASSERT_TRUE(dataset.eos_id().has_value());
  EXPECT_EQ(*dataset.eos_id(), ByteTokenizer::kEosId);
  ASSERT_TRUE(dataset.document_starts().has_value());
  const std::vector<int64_t>& starts = *dataset.document_starts();
  ASSERT_EQ(starts, (std::vector<int64_t>{0, 7, 17}));
  ASSERT_EQ(dataset.num_tokens(), 49);
  const std::vector<int32_t> tokens = read_split(dir / "out", "train");
  for (size_t doc_idx = 0; doc_idx < starts.size(); ++doc_idx) {
    const int64_t end = doc_idx + 1 < starts.size() ? starts[doc_idx + 1] : dataset.num_tokens();
    EXPECT_EQ(std::vector<int32_t>(tokens.begin() + starts[doc_idx], tokens.begin() + end),
              byte_document_tokens(kPreparedDocuments[doc_idx].second))
        << doc_idx;
  }

  // seq_len 16: documents 0 and 1 fill [0, 17); document 2 (32 tokens) is [17, 34), [33, 49).
  const Windows windows(dataset, 16, WindowLayout::kPacked);
  ASSERT_EQ(spans_of(windows), (Spans{{0, 17}, {17, 34}, {33, 49}}));
  for (int64_t window_idx = 0; window_idx < windows.num_windows(); ++window_idx) {
    const WindowTokens window = read_window(windows, window_idx);
    const bool at_document_start =
        std::find(starts.begin(), starts.end(), windows.span(window_idx).begin) != starts.end();
    EXPECT_EQ(window.inputs[0] == ByteTokenizer::kBosId, at_document_start) << window_idx;
  }
  // The last window: the end of document 2, its EOS as the last target, then padding EOS / -1.
  const WindowTokens last = read_window(windows, 2);
  const std::string& text = kPreparedDocuments[2].second;
  for (int64_t t = 0; t < 15; ++t) {
    EXPECT_EQ(last.inputs[t], static_cast<unsigned char>(text[15 + t])) << t;
  }
  EXPECT_EQ(last.inputs[15], ByteTokenizer::kEosId);
  EXPECT_EQ(last.targets[14], ByteTokenizer::kEosId);
  EXPECT_EQ(last.targets[15], -1);

  // With a larger seq_len every packed and single window starts with BOS and ends with EOS.
  for (WindowLayout layout : {WindowLayout::kPacked, WindowLayout::kSingle}) {
    const Windows wide(dataset, 40, layout);
    for (int64_t window_idx = 0; window_idx < wide.num_windows(); ++window_idx) {
      const WindowTokens window = read_window(wide, window_idx);
      const WindowSpan span = wide.span(window_idx);
      EXPECT_EQ(window.inputs[0], ByteTokenizer::kBosId) << window_idx;
      EXPECT_EQ(window.targets[span.end - span.begin - 2], ByteTokenizer::kEosId) << window_idx;
    }
    EXPECT_EQ(wide.num_windows(), layout == WindowLayout::kPacked ? 2 : 3);
  }
}

// One stream of 49 tokens, its last floor(0.5 * 49) = 24 are val: document 2 (tokens 17..48)
// keeps 8 tokens in train and 24 in val.
TEST(WindowsPrepared, StreamTailCutsADocumentBetweenTheSplits) {
  TempDir dir;
  const PrepareSummary summary = prepare_dataset(prepare_options(dir, "out", 0.5));
  ASSERT_EQ(summary.val_rule, "stream_tail") << "every document must hash to one split";
  const nlohmann::json json = nlohmann::json::parse(read_file(dir / "out" / kDatasetJsonName));
  EXPECT_EQ(json["documents"][2]["split"], "train+val");
  const TokenDataset train = TokenDataset::open(dir / "out", "train");
  const TokenDataset val = TokenDataset::open(dir / "out", "val");
  ASSERT_EQ(train.num_tokens(), 25);
  ASSERT_EQ(val.num_tokens(), 24);
  EXPECT_EQ(*train.document_starts(), (std::vector<int64_t>{0, 7, 17}));
  EXPECT_EQ(*val.document_starts(), (std::vector<int64_t>{0}));
  const std::vector<int32_t> cut = byte_document_tokens(kPreparedDocuments[2].second);
  const std::vector<int32_t> train_tokens = read_split(dir / "out", "train");
  EXPECT_EQ(std::vector<int32_t>(train_tokens.begin() + 17, train_tokens.end()),
            std::vector<int32_t>(cut.begin(), cut.begin() + 8));
  EXPECT_EQ(read_split(dir / "out", "val"), std::vector<int32_t>(cut.begin() + 8, cut.end()));

  EXPECT_EQ(spans_of(Windows(train, 16, WindowLayout::kPacked)), (Spans{{0, 17}, {17, 25}}));
  EXPECT_EQ(spans_of(Windows(train, 16, WindowLayout::kSingle)),
            (Spans{{0, 7}, {7, 17}, {17, 25}}));
  // Val's one document (the rest of the cut one) is cut at strides of 16.
  const Windows val_windows(val, 16, WindowLayout::kPacked);
  EXPECT_EQ(spans_of(val_windows), (Spans{{0, 17}, {16, 24}}));
  EXPECT_EQ(read_window(val_windows, 1).targets[6], ByteTokenizer::kEosId);
}

}  // namespace
}  // namespace moeforge::data
