#include "model/speculative.h"

#include <algorithm>

#include <torch/torch.h>

#include "core/error.h"

namespace brigade::model {
namespace {

// Greedy choice per row of logits [rows, vocab], within the vocabulary limit.
std::vector<int64_t> argmax_rows(torch::Tensor logits, int64_t vocab_limit) {
  if (vocab_limit > 0 && vocab_limit < logits.size(-1)) logits = logits.narrow(-1, 0, vocab_limit);
  const auto best = logits.to(torch::kFloat).argmax(-1).to(torch::kCPU).contiguous();
  return {best.data_ptr<int64_t>(), best.data_ptr<int64_t>() + best.numel()};
}

torch::Tensor token_row(const std::vector<int64_t>& ids, int64_t from, int64_t count, const torch::Device& device) {
  return torch::tensor(std::vector<int64_t>(ids.begin() + from, ids.begin() + from + count), torch::kLong)
      .unsqueeze(0)
      .to(device);
}

}  // namespace

Generation generate_speculative(Transformer& model, const std::vector<int64_t>& prompt,
                                const SamplingOptions& options, int64_t depth, SpeculativeStats* stats) {
  options.validate();
  const auto& mo = model->options();
  BRIGADE_CHECK(mo.mtp.enabled(), "speculative decoding with MTP needs MTP modules, and this model has none "
                "(model.mtp.depth is 0)");
  BRIGADE_CHECK(depth >= 0 && depth <= mo.mtp.depth, "speculative depth ", depth, " exceeds the model's ",
                mo.mtp.depth, " MTP modules");
  BRIGADE_CHECK(options.temperature == 0.0, "speculative decoding with MTP is greedy: temperature must be 0, got ",
                options.temperature);
  BRIGADE_CHECK(options.logprobs == 0, "speculative decoding with MTP keeps no log-probabilities (logprobs must be 0)");
  BRIGADE_CHECK(!prompt.empty(), "generation needs a non-empty prompt");
  for (int64_t id : prompt)
    BRIGADE_CHECK(id >= 0 && id < mo.vocab_size, "prompt token ", id, " is outside the vocabulary (", mo.vocab_size, ")");
  const auto prompt_len = static_cast<int64_t>(prompt.size());
  BRIGADE_CHECK(prompt_len < mo.max_seq_len, "prompt of ", prompt_len, " tokens leaves no room in model.max_seq_len ",
                mo.max_seq_len);
  const int64_t modules = depth == 0 ? mo.mtp.depth : depth;
  SpeculativeStats local;
  SpeculativeStats& st = stats != nullptr ? *stats : local;
  st = {};
  Generation out;
  if (options.max_new_tokens == 0) return out;

  const bool was_training = model->is_training();
  model->eval();
  torch::InferenceMode inference;
  const auto device = model->embed_tokens->weight.device();
  // As generate(): the cache holds the prompt and every new token but the last.
  const int64_t capacity = std::min(mo.max_seq_len, prompt_len + options.max_new_tokens);
  KVCache main_cache = model->make_cache(1, capacity);
  std::vector<KVCache> caches;              // per MTP module
  std::vector<torch::Tensor> hidden;        // [0]: the main model's, [k]: module k's; [1, capacity, d_model]
  for (int64_t k = 0; k < modules; ++k) caches.push_back(model->make_mtp_cache(1, capacity));
  std::vector<int64_t> seq = prompt;        // the prompt, accepted tokens, then this round's drafts

  // Emits `token`; false when generation ends with it.
  auto emit = [&](int64_t token) {
    out.tokens.push_back(token);
    out.stopped = std::find(options.stop_ids.begin(), options.stop_ids.end(), token) != options.stop_ids.end();
    return !out.stopped && static_cast<int64_t>(out.tokens.size()) < options.max_new_tokens;
  };
  auto keep_hidden = [&](size_t slot, int64_t from, const torch::Tensor& h) {
    if (hidden.size() <= slot) hidden.resize(slot + 1);
    if (!hidden[slot].defined()) hidden[slot] = torch::zeros({1, capacity, h.size(-1)}, h.options());
    hidden[slot].narrow(1, from, h.size(1)).copy_(h);
  };

  auto h = model->decode_hidden(token_row(seq, 0, prompt_len, device), main_cache);
  keep_hidden(0, 0, h);
  int64_t pending = argmax_rows(model->decode_logits(h.narrow(1, -1, 1)).flatten(0, 1), options.vocab_limit)[0];
  seq.push_back(pending);
  bool running = emit(pending);
  while (running && main_cache.length < capacity) {
    const int64_t n = main_cache.length;  // seq[n] is the pending token, not yet in the main cache
    const int64_t left = options.max_new_tokens - static_cast<int64_t>(out.tokens.size());
    const int64_t drafts = std::min({modules, left - 1, capacity - n - 1});
    // Drafts: module k catches up on positions caches[k-1].length .. n-1 (its input at
    // position i: the hidden state below it there and the token k ahead, seq[i + k]);
    // its last position proposes seq[n + k].
    for (int64_t k = 1; k <= drafts; ++k) {
      auto& cache = caches[static_cast<size_t>(k - 1)];
      const int64_t from = cache.length, count = n - from;
      const auto below = hidden[static_cast<size_t>(k - 1)].narrow(1, from, count);
      auto g = model->mtp_decode_hidden(k, below, token_row(seq, from + k, count, device), cache);
      keep_hidden(static_cast<size_t>(k), from, g);
      seq.push_back(argmax_rows(model->mtp_decode_logits(k, g.narrow(1, -1, 1)).flatten(0, 1), options.vocab_limit)[0]);
    }
    // Verify the pending token and the drafts in one forward: choice j follows seq[n + j].
    h = model->decode_hidden(token_row(seq, n, drafts + 1, device), main_cache);
    keep_hidden(0, n, h);
    const auto choices = argmax_rows(model->decode_logits(h).flatten(0, 1), options.vocab_limit);
    int64_t accepted = 0;
    while (accepted < drafts && seq[static_cast<size_t>(n + 1 + accepted)] == choices[static_cast<size_t>(accepted)])
      ++accepted;
    ++st.rounds;
    st.drafted += drafts;
    st.accepted += accepted;
    // Keep the accepted drafts and the choice after them; emitted tokens are exactly
    // the main model's choices 0..accepted.
    seq.resize(static_cast<size_t>(n + 1));
    for (int64_t j = 0; j <= accepted && running; ++j) {
      seq.push_back(choices[static_cast<size_t>(j)]);
      running = emit(choices[static_cast<size_t>(j)]);
    }
    const int64_t committed = static_cast<int64_t>(seq.size()) - 1;  // index of the new pending token
    main_cache.length = committed;  // its inputs: the accepted tokens
    for (int64_t k = 1; k <= modules; ++k) {
      auto& cache = caches[static_cast<size_t>(k - 1)];
      cache.length = std::min(cache.length, committed - k + 1);  // positions i with seq[i + k] accepted
    }
  }
  if (was_training) model->train();
  return out;
}

}  // namespace brigade::model
