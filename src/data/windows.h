// The windows a split is cut into for training and evaluation, under one of three layouts:
// - "stream": fixed strides over the concatenated stream (window w covers tokens
//   [w * seq_len, w * seq_len + seq_len + 1)), whatever the document boundaries. No padding.
// - "packed": each window starts at a document's start and holds as many whole documents as fit
//   in seq_len + 1 tokens (greedily, in stream order); the rest is padding.
// - "single": one document per window, the rest padding.
// In "packed" and "single" a document longer than seq_len + 1 tokens is cut into windows of its
// own at strides of seq_len (the last one padded), so a window never mixes the tail of one
// document with the start of the next, and a completion-only loss never asks for an answer whose
// context lies in another window. The document boundaries come from dataset.json's document list.
// Padding: inputs are the tokenizer's EOS id and targets -1 (ignored); causal attention keeps the
// padding from every counted position.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "data/loader.h"

namespace moeforge::data {

enum class WindowLayout { kStream, kPacked, kSingle };

std::string window_layout_name(WindowLayout layout);
// "stream", "packed" or "single"; anything else is an error naming `where` and the layouts.
WindowLayout parse_window_layout(std::string_view name, std::string_view where);

// Stream tokens [begin, end) of one window: end - begin is in [2, seq_len + 1].
struct WindowSpan {
  int64_t begin = 0;
  int64_t end = 0;
  bool operator==(const WindowSpan&) const = default;
};

// The windows of one split. The dataset must outlive it.
class Windows {
 public:
  // "packed" and "single" need dataset.json's document list (written by `data prepare`).
  Windows(const TokenDataset& dataset, int64_t seq_len, WindowLayout layout);

  const TokenDataset& dataset() const { return *dataset_; }
  int64_t seq_len() const { return seq_len_; }
  WindowLayout layout() const { return layout_; }
  int64_t num_windows() const { return num_windows_; }
  WindowSpan span(int64_t window_idx) const;
  // What one window needs, for the errors about a split without any: "seq_len 8 needs 9 tokens"
  // (stream) or "window layout \"packed\" needs a document of 2 or more tokens".
  std::string one_window_needs() const;

  // inputs, targets: [seq_len]. targets[t] = the token after inputs[t] inside the window, -1 where
  // the loss mask does not count it and past the window's tokens; inputs past them are padding.
  void read(int64_t window_idx, int32_t* inputs, int32_t* targets) const;

 private:
  const TokenDataset* dataset_;
  int64_t seq_len_;
  WindowLayout layout_;
  int64_t num_windows_ = 0;
  std::vector<WindowSpan> spans_;  // "packed" and "single"; "stream" computes its spans
};

}  // namespace moeforge::data
