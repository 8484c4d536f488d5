#include "model/continuous_batch.h"

#include <algorithm>

#include <ATen/CPUGeneratorImpl.h>

#include "core/error.h"

namespace brigade::model {

ContinuousBatch::ContinuousBatch(Transformer model, int64_t max_rows)
    : model_(std::move(model)),
      max_rows_(max_rows),
      max_seq_len_(model_->options().max_seq_len),
      device_(model_->embed_tokens->weight.device()) {
  BRIGADE_CHECK(max_rows_ >= 1, "continuous batch: max_rows must be >= 1, got ", max_rows_);
  model_->eval();
}

int64_t ContinuousBatch::add(std::vector<int64_t> prompt, const SamplingOptions& options, uint64_t seed) {
  options.validate();
  const auto len = static_cast<int64_t>(prompt.size());
  BRIGADE_CHECK(len > 0, "generation needs a non-empty prompt");
  BRIGADE_CHECK(len < max_seq_len_, "prompt of ", len, " tokens leaves no room in model.max_seq_len ", max_seq_len_);
  BRIGADE_CHECK(options.max_new_tokens >= 1, "max_new_tokens must be >= 1, got ", options.max_new_tokens);
  const int64_t vocab = model_->options().vocab_size;
  for (int64_t id : prompt)
    BRIGADE_CHECK(id >= 0 && id < vocab, "prompt token ", id, " is outside the vocabulary (", vocab, ")");
  Sequence s{.id = next_id_++, .prompt = std::move(prompt), .options = options,
             .generator = at::make_generator<at::CPUGeneratorImpl>(seed)};
  // As generate(): the last token sampled needs no cache position, so a prompt of L
  // tokens may sample max_seq_len - L + 1 before the context ends.
  s.options.max_new_tokens = std::min(s.options.max_new_tokens, max_seq_len_ - len + 1);
  queue_.push_back(std::move(s));
  return queue_.back().id;
}

void ContinuousBatch::cancel(int64_t sequence) {
  std::erase_if(queue_, [&](const Sequence& s) { return s.id == sequence; });
  std::vector<int64_t> keep;
  for (size_t r = 0; r < running_.size(); ++r)
    if (running_[r].id != sequence) keep.push_back(static_cast<int64_t>(r));
  if (keep.size() < running_.size()) keep_rows(keep);
}

bool ContinuousBatch::fits(const Sequence& s) const {
  if (running_.empty()) return true;  // positions start again at 0
  if (static_cast<int64_t>(running_.size()) >= max_rows_) return false;
  // Its prompt must end where the batch's positions are (cached keys carry their
  // rotary positions, so the batch cannot move back to make room for a longer one).
  if (static_cast<int64_t>(s.prompt.size()) > cache_.length) return false;
  int64_t need = s.options.max_new_tokens - 1;  // after its prefill
  for (const auto& r : running_) need = std::max(need, remaining(r));
  return cache_.length + need <= max_seq_len_;
}

DecodedToken ContinuousBatch::sample(Sequence& s, const torch::Tensor& row_logits) {
  auto logits = row_logits;
  const auto& o = s.options;
  if (o.vocab_limit > 0 && o.vocab_limit < logits.size(0)) logits = logits.narrow(0, 0, o.vocab_limit);
  DecodedToken out{.sequence = s.id};
  if (o.logprobs > 0) {
    auto [values, indices] = torch::log_softmax(logits, -1).topk(std::min(o.logprobs, logits.size(0)));
    out.topk_logprobs = values;
    out.topk_ids = indices.to(torch::kInt);
  }
  out.token = sample_token(logits, o, s.generator);
  ++s.produced;
  s.pending = out.token;
  out.stopped = std::find(o.stop_ids.begin(), o.stop_ids.end(), out.token) != o.stop_ids.end();
  out.finished = out.stopped || s.produced >= o.max_new_tokens;
  return out;
}

void ContinuousBatch::join(Sequence s, KVCache row) {
  const auto rows = static_cast<int64_t>(running_.size());
  const int64_t length = row.length;  // the batch's too: the row was prefilled to end there
  int64_t need = remaining(s);
  for (const auto& r : running_) need = std::max(need, remaining(r));
  const int64_t capacity = length + std::max<int64_t>(need, 1);
  auto place = [&](const torch::Tensor& batch, const torch::Tensor& one) {
    auto shape = one.sizes().vec();
    shape[0] = rows + 1;
    shape[2] = capacity;
    auto out = torch::empty(shape, one.options());
    if (rows > 0) out.narrow(0, 0, rows).narrow(2, 0, length).copy_(batch.narrow(2, 0, length));
    out.narrow(0, rows, 1).narrow(2, 0, length).copy_(one.narrow(2, 0, length));
    return out;
  };
  KVCache next;
  for (size_t l = 0; l < row.keys.size(); ++l)
    next.keys.push_back(place(rows > 0 ? cache_.keys[l] : torch::Tensor(), row.keys[l]));
  for (size_t l = 0; l < row.values.size(); ++l)
    next.values.push_back(place(rows > 0 ? cache_.values[l] : torch::Tensor(), row.values[l]));
  if (cache_.valid.defined() || row.valid.defined()) {
    auto valid = torch::ones({rows + 1, capacity}, torch::TensorOptions().dtype(torch::kBool).device(device_));
    if (cache_.valid.defined() && rows > 0) valid.narrow(0, 0, rows).narrow(1, 0, length).copy_(cache_.valid.narrow(1, 0, length));
    if (row.valid.defined()) valid.narrow(0, rows, 1).narrow(1, 0, length).copy_(row.valid.narrow(1, 0, length));
    next.valid = valid;
  }
  next.length = length;
  cache_ = std::move(next);
  running_.push_back(std::move(s));
}

void ContinuousBatch::keep_rows(const std::vector<int64_t>& rows) {
  std::vector<Sequence> kept;
  for (int64_t r : rows) kept.push_back(std::move(running_[static_cast<size_t>(r)]));
  running_ = std::move(kept);
  if (running_.empty()) {
    cache_ = KVCache{};
    return;
  }
  auto index = torch::tensor(rows, torch::kLong).to(device_);
  for (auto& k : cache_.keys) k = k.index_select(0, index);
  for (auto& v : cache_.values) v = v.index_select(0, index);
  if (cache_.valid.defined()) cache_.valid = cache_.valid.index_select(0, index);
}

std::vector<DecodedToken> ContinuousBatch::step() {
  torch::InferenceMode inference;
  std::vector<DecodedToken> out;
  // One token for every running sequence.
  if (!running_.empty()) {
    std::vector<int64_t> pending;
    for (const auto& s : running_) pending.push_back(s.pending);
    auto input = torch::tensor(pending, torch::kLong).unsqueeze(1).to(device_);
    auto logits = model_->forward(input, &cache_).select(1, -1).to(torch::kCPU, torch::kFloat);
    std::vector<int64_t> keep;
    for (size_t r = 0; r < running_.size(); ++r) {
      out.push_back(sample(running_[r], logits[static_cast<int64_t>(r)]));
      if (!out.back().finished) keep.push_back(static_cast<int64_t>(r));
    }
    if (keep.size() < running_.size()) keep_rows(keep);
  }
  // Then whoever fits joins, first come first served, with its first token.
  while (!queue_.empty() && fits(queue_.front())) {
    Sequence s = std::move(queue_.front());
    queue_.pop_front();
    // Prefilled alone, left-padded so that its prompt ends at the batch's position.
    const auto len = static_cast<int64_t>(s.prompt.size());
    const int64_t pad = running_.empty() ? 0 : cache_.length - len;
    KVCache row = model_->make_cache(1, pad + len);
    if (pad > 0) {
      row.valid = torch::ones({1, pad + len}, torch::TensorOptions().dtype(torch::kBool).device(device_));
      row.valid.narrow(1, 0, pad).fill_(false);
      row.length = pad;
    }
    auto input = torch::tensor(s.prompt, torch::kLong).unsqueeze(0).to(device_);
    auto logits = model_->forward(input, &row).select(1, -1).to(torch::kCPU, torch::kFloat);
    out.push_back(sample(s, logits[0]));
    if (!out.back().finished) join(std::move(s), std::move(row));
  }
  return out;
}

}  // namespace brigade::model
