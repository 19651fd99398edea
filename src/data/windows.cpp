// Cutting a split into training and evaluation windows (windows.h).
#include "data/windows.h"

#include <fmt/format.h>

#include <algorithm>

#include "core/error.h"

namespace moeforge::data {

namespace {

constexpr std::pair<WindowLayout, std::string_view> kLayoutNames[] = {
    {WindowLayout::kStream, "stream"},
    {WindowLayout::kPacked, "packed"},
    {WindowLayout::kSingle, "single"},
};

// The windows of documents [starts[i], starts[i + 1]) (the last one to num_tokens).
std::vector<WindowSpan> document_windows(const std::vector<int64_t>& starts, int64_t num_tokens,
                                         int64_t seq_len, bool pack) {
  const auto num_documents = static_cast<int64_t>(starts.size());
  auto end_of = [&](int64_t doc_idx) {
    return doc_idx + 1 < num_documents ? starts[doc_idx + 1] : num_tokens;
  };
  std::vector<WindowSpan> spans;
  for (int64_t doc_idx = 0; doc_idx < num_documents; ++doc_idx) {
    const int64_t begin = starts[doc_idx];
    if (end_of(doc_idx) - begin > seq_len + 1) {
      for (int64_t chunk = begin; chunk + 1 < end_of(doc_idx); chunk += seq_len) {
        spans.push_back({chunk, std::min(chunk + seq_len + 1, end_of(doc_idx))});
      }
      continue;
    }
    while (pack && doc_idx + 1 < num_documents && end_of(doc_idx + 1) - begin <= seq_len + 1) {
      ++doc_idx;
    }
    // A window needs one target: a one-token piece (the end of a document cut by the
    // stream_tail split rule) has none.
    if (end_of(doc_idx) - begin >= 2) spans.push_back({begin, end_of(doc_idx)});
  }
  return spans;
}

}  // namespace

std::string window_layout_name(WindowLayout layout) {
  for (const auto& [value, name] : kLayoutNames) {
    if (value == layout) return std::string(name);
  }
  MF_FAIL("unknown window layout {}", static_cast<int>(layout));
}

WindowLayout parse_window_layout(std::string_view name, std::string_view where) {
  for (const auto& [value, layout_name] : kLayoutNames) {
    if (name == layout_name) return value;
  }
  MF_FAIL("{} must be one of stream, packed, single, got \"{}\"", where, name);
}

Windows::Windows(const TokenDataset& dataset, int64_t seq_len, WindowLayout layout)
    : dataset_(&dataset), seq_len_(seq_len), layout_(layout) {
  MF_CHECK(seq_len >= 1, "seq_len {} must be >= 1", seq_len);
  if (layout == WindowLayout::kStream) {
    num_windows_ = dataset.num_tokens() < 2 ? 0 : (dataset.num_tokens() - 1) / seq_len;
    return;
  }
  MF_CHECK(dataset.document_starts().has_value() && dataset.eos_id().has_value(),
           "dataset '{}' has no document list or no tokenizer EOS id in its dataset.json; window "
           "layout \"{}\" needs both (prepare the dataset again with `moeforge data prepare`)",
           dataset.dir().string(), window_layout_name(layout));
  spans_ = document_windows(*dataset.document_starts(), dataset.num_tokens(), seq_len,
                            layout == WindowLayout::kPacked);
  num_windows_ = static_cast<int64_t>(spans_.size());
}

WindowSpan Windows::span(int64_t window_idx) const {
  MF_CHECK(window_idx >= 0 && window_idx < num_windows_,
           "dataset '{}' split '{}': window {} is outside its {} windows of seq_len {} (layout "
           "{})",
           dataset_->dir().string(), dataset_->split(), window_idx, num_windows_, seq_len_,
           window_layout_name(layout_));
  if (layout_ == WindowLayout::kStream) {
    return {window_idx * seq_len_, window_idx * seq_len_ + seq_len_ + 1};
  }
  return spans_[static_cast<size_t>(window_idx)];
}

std::string Windows::one_window_needs() const {
  if (layout_ == WindowLayout::kStream) {
    return fmt::format("seq_len {} needs {} tokens", seq_len_, seq_len_ + 1);
  }
  return fmt::format("window layout \"{}\" needs a document of 2 or more tokens",
                     window_layout_name(layout_));
}

void Windows::read(int64_t window_idx, int32_t* inputs, int32_t* targets) const {
  const WindowSpan window = span(window_idx);
  const int64_t num_targets = window.end - window.begin - 1;
  dataset_->read(window.begin, num_targets, inputs);
  dataset_->read(window.begin + 1, num_targets, targets);
  if (num_targets < seq_len_) {
    std::fill(inputs + num_targets, inputs + seq_len_, static_cast<int32_t>(*dataset_->eos_id()));
    std::fill(targets + num_targets, targets + seq_len_, -1);
  }
  if (!dataset_->has_loss_mask()) return;
  std::vector<int32_t> mask(static_cast<size_t>(num_targets));
  dataset_->read_loss_mask(window.begin + 1, num_targets, mask.data());
  for (int64_t i = 0; i < num_targets; ++i) {
    if (mask[static_cast<size_t>(i)] == 0) targets[i] = -1;
  }
}

}  // namespace moeforge::data
