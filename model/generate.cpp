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
  options.validate();
  BRIGADE_CHECK(!prompt.empty(), "generation needs a non-empty prompt");
  const auto& mo = model->options();
  for (int64_t id : prompt) {
    BRIGADE_CHECK(id >= 0 && id < mo.vocab_size, "prompt token ", id, " is outside the vocabulary (",
                  mo.vocab_size, ")");
  }
  const int64_t prompt_len = static_cast<int64_t>(prompt.size());
  BRIGADE_CHECK(prompt_len < mo.max_seq_len, "prompt of ", prompt_len,
                " tokens leaves no room in model.max_seq_len ", mo.max_seq_len);

  const bool was_training = model->is_training();
  model->eval();
  torch::InferenceMode inference;
  auto generator = at::make_generator<at::CPUGeneratorImpl>(options.seed);

  const int64_t capacity = std::min(mo.max_seq_len, prompt_len + options.max_new_tokens);
  auto cache = model->make_cache(1, capacity);
  Generation result;
  const auto device = model->embed_tokens->weight.device();
  auto input = torch::tensor(prompt, torch::kLong).unsqueeze(0).to(device);
  while (static_cast<int64_t>(result.tokens.size()) < options.max_new_tokens &&
         cache.length + input.size(1) <= capacity) {
    auto logits = model->forward(input, &cache);  // [1, seq, vocab]
    int64_t next = sample_token(logits[0][-1].to(torch::kCPU), options, generator);
    result.tokens.push_back(next);
    if (std::find(options.stop_ids.begin(), options.stop_ids.end(), next) != options.stop_ids.end()) {
      result.stopped = true;
      break;
    }
    input = torch::tensor({next}, torch::kLong).unsqueeze(0).to(device);
  }
  if (was_training) model->train();
  return result;
}

}  // namespace brigade::model
