// Validation metrics of a model on a token dataset: mean cross-entropy, perplexity and bits per
// byte, over the validation split's windows (data/windows.h), or an evenly spread subset of them,
// in order (no shuffling), split across ranks.
#pragma once

#include <cstdint>
#include <functional>

#include "comm/communicator.h"
#include "data/loader.h"
#include "data/tokenizer.h"
#include "data/windows.h"
#include "model/transformer.h"

namespace moeforge {

struct EvalResult {
  double loss = 0.0;           // mean nats per target token
  double perplexity = 0.0;     // exp(loss)
  double bits_per_byte = 0.0;  // total nats / ln 2 / bytes of the target tokens' text
  int64_t num_tokens = 0;
  int64_t num_bytes = 0;
};

// A forward pass of whatever runs the model (CPU reference, GPU): tokens and targets
// [batch, seq] -> the loss breakdown (ce_loss and num_counted are what evaluation reads).
using ForwardFn = std::function<LossBreakdown(const int32_t* tokens, const int32_t* targets,
                                              int64_t batch, int64_t seq)>;

// max_batches <= 0 evaluates every window; otherwise max_batches * batch_size windows (or all, if
// fewer) spread evenly over the split: window floor(i * num_windows / num_scored). Every rank of dp
// must call it (the sums are reduced). Throws when no target of the scored windows counts (a loss
// mask can exclude them all), rather than report a loss of 0.
EvalResult evaluate(const ForwardFn& forward, const data::Windows& windows,
                    const data::Tokenizer& tokenizer, int64_t batch_size, int64_t max_batches,
                    Communicator& dp);
// The same with the CPU reference model.
EvalResult evaluate(Transformer<float>& model, const data::Windows& windows,
                    const data::Tokenizer& tokenizer, int64_t batch_size, int64_t max_batches,
                    Communicator& dp);

// The targets the loss counts in the windows evaluate() scores, over all ranks together: the
// trainer checks before its first step that there is one (a loss mask can exclude them all).
int64_t count_scored_targets(const data::Windows& windows, int64_t batch_size, int64_t max_batches);

// Cross-entropy (nats per token) of the unigram model fitted on `train` (add-one smoothing over the
// vocabulary), measured on every token of `eval` after its first: the baseline a trained model must
// clearly beat. With loss masks (prepare.h), only the tokens the masks count are fitted and scored.
double unigram_baseline_loss(const data::TokenDataset& train, const data::TokenDataset& eval);

}  // namespace moeforge
