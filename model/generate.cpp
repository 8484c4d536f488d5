#include "model/generate.h"

#include <algorithm>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include "core/error.h"

namespace brigade::model {

void SamplingOptions::validate() const {
  BRIGADE_CHECK(max_new_tokens >= 0, "max_new_tokens must be >= 0, got ", max_new_tokens);
  BRIGADE_CHECK(temperature >= 0, "temperature must be >= 0, got ", temperature);
  BRIGADE_CHECK(top_k >= 0, "top_k must be >= 0, got ", top_k);
  BRIGADE_CHECK(top_p > 0 && top_p <= 1, "top_p must be in (0, 1], got ", top_p);
  BRIGADE_CHECK(logprobs >= 0, "logprobs must be >= 0, got ", logprobs);
  BRIGADE_CHECK(vocab_limit >= 0, "vocab_limit must be >= 0, got ", vocab_limit);
}

int64_t sample_token(const torch::Tensor& logits, const SamplingOptions& options,
                     torch::Generator& generator) {
  auto scores = logits.to(torch::kFloat).flatten();
  if (options.temperature == 0.0) return scores.argmax().item<int64_t>();
  scores = scores / options.temperature;
  if (options.top_k > 0 && options.top_k < scores.size(0)) {
    auto kth = std::get<0>(scores.topk(options.top_k)).min();
    scores = scores.masked_fill(scores < kth, -std::numeric_limits<float>::infinity());
  }
  auto probs = torch::softmax(scores, 0);
  if (options.top_p < 1.0) {
    // Keep the smallest set of tokens whose probability reaches top_p (the most
    // likely token always stays).
    auto [sorted, order] = probs.sort(0, /*descending=*/true);
    auto before = sorted.cumsum(0) - sorted;
    sorted = sorted.masked_fill(before >= options.top_p, 0.0);
    probs = torch::zeros_like(probs).scatter(0, order, sorted);
    probs = probs / probs.sum();
  }
  return torch::multinomial(probs, 1, false, generator).item<int64_t>();
}

Generation generate(Transformer& model, const std::vector<int64_t>& prompt,
                    const SamplingOptions& options) {
  BRIGADE_CHECK(!prompt.empty(), "generation needs a non-empty prompt");
  return generate_batch(model, {prompt}, options, {options.seed}).front();
}

std::vector<Generation> generate_batch(Transformer& model, const std::vector<std::vector<int64_t>>& prompts,
                                       const SamplingOptions& options, const std::vector<uint64_t>& seeds) {
  options.validate();
  BRIGADE_CHECK(seeds.size() == prompts.size(), "generate_batch: ", prompts.size(), " prompts but ", seeds.size(),
                " seeds");
  const auto& mo = model->options();
  int64_t longest = 0;
  bool padded = false;
  for (const auto& prompt : prompts) {
    BRIGADE_CHECK(!prompt.empty(), "generation needs a non-empty prompt");
    for (int64_t id : prompt) {
      BRIGADE_CHECK(id >= 0 && id < mo.vocab_size, "prompt token ", id, " is outside the vocabulary (",
                    mo.vocab_size, ")");
    }
    const int64_t len = static_cast<int64_t>(prompt.size());
    BRIGADE_CHECK(len < mo.max_seq_len, "prompt of ", len, " tokens leaves no room in model.max_seq_len ",
                  mo.max_seq_len);
    padded = padded || (longest > 0 && len != longest);
    longest = std::max(longest, len);
  }
  std::vector<Generation> results(prompts.size());
  if (prompts.empty()) return results;

  const bool was_training = model->is_training();
  model->eval();
  torch::InferenceMode inference;
  const auto batch = static_cast<int64_t>(prompts.size());
  const int64_t capacity = std::min(mo.max_seq_len, longest + options.max_new_tokens);
  auto cache = model->make_cache(batch, capacity);
  const auto device = model->embed_tokens->weight.device();
  // Left padding: every row's last prompt token sits at position longest - 1.
  auto input = torch::zeros({batch, longest}, torch::kLong);
  if (padded) cache.valid = torch::ones({batch, capacity}, torch::TensorOptions().dtype(torch::kBool).device(device));
  for (int64_t i = 0; i < batch; ++i) {
    const auto& prompt = prompts[static_cast<size_t>(i)];
    const int64_t pad = longest - static_cast<int64_t>(prompt.size());
    input[i].narrow(0, pad, static_cast<int64_t>(prompt.size())).copy_(torch::tensor(prompt, torch::kLong));
    if (pad > 0) cache.valid[i].narrow(0, 0, pad).fill_(false);
  }
  input = input.to(device);
  std::vector<torch::Generator> generators;
  for (uint64_t seed : seeds) generators.push_back(at::make_generator<at::CPUGeneratorImpl>(seed));
  std::vector<std::vector<torch::Tensor>> ids(prompts.size()), logprobs(prompts.size());
  std::vector<int64_t> rows(prompts.size());  // batch row -> prompt index, for the rows still running
  for (size_t i = 0; i < rows.size(); ++i) rows[i] = static_cast<int64_t>(i);

  for (int64_t step = 0; step < options.max_new_tokens && cache.length + input.size(1) <= capacity; ++step) {
    auto logits = model->forward(input, &cache).select(1, -1).to(torch::kCPU, torch::kFloat);  // [rows, vocab]
    if (options.vocab_limit > 0 && options.vocab_limit < logits.size(1)) logits = logits.narrow(1, 0, options.vocab_limit);
    torch::Tensor top_ids, top_lp;
    if (options.logprobs > 0) {
      auto [values, indices] = torch::log_softmax(logits, -1).topk(std::min(options.logprobs, logits.size(1)));
      top_lp = values;
      top_ids = indices.to(torch::kInt);
    }
    std::vector<int64_t> next(rows.size());
    std::vector<int64_t> keep;  // batch rows that go on
    for (size_t r = 0; r < rows.size(); ++r) {
      auto& out = results[static_cast<size_t>(rows[r])];
      next[r] = sample_token(logits[static_cast<int64_t>(r)], options, generators[static_cast<size_t>(rows[r])]);
      out.tokens.push_back(next[r]);
      if (options.logprobs > 0) {
        ids[static_cast<size_t>(rows[r])].push_back(top_ids[static_cast<int64_t>(r)]);
        logprobs[static_cast<size_t>(rows[r])].push_back(top_lp[static_cast<int64_t>(r)]);
      }
      out.stopped = std::find(options.stop_ids.begin(), options.stop_ids.end(), next[r]) != options.stop_ids.end();
      if (!out.stopped) keep.push_back(static_cast<int64_t>(r));
    }
    if (keep.empty()) break;
    if (keep.size() < rows.size()) {
      // Finished rows leave the batch and the cache.
      auto index = torch::tensor(keep, torch::kLong).to(device);
      for (auto& k : cache.keys) k = k.index_select(0, index);
      for (auto& v : cache.values) v = v.index_select(0, index);
      if (cache.valid.defined()) cache.valid = cache.valid.index_select(0, index.to(cache.valid.device()));
      std::vector<int64_t> still, tokens;
      for (int64_t r : keep) {
        still.push_back(rows[static_cast<size_t>(r)]);
        tokens.push_back(next[static_cast<size_t>(r)]);
      }
      rows = std::move(still);
      next = std::move(tokens);
    }
    input = torch::tensor(next, torch::kLong).unsqueeze(1).to(device);
  }
  if (options.logprobs > 0) {
    for (size_t i = 0; i < results.size(); ++i) {
      const int64_t vocab = options.vocab_limit > 0 ? std::min(options.vocab_limit, mo.vocab_size) : mo.vocab_size;
      const int64_t k = std::min(options.logprobs, vocab);
      results[i].topk_ids = ids[i].empty() ? torch::empty({0, k}, torch::kInt) : torch::stack(ids[i]);
      results[i].topk_logprobs = logprobs[i].empty() ? torch::empty({0, k}, torch::kFloat) : torch::stack(logprobs[i]);
    }
  }
  if (was_training) model->train();
  return results;
}

}  // namespace brigade::model
