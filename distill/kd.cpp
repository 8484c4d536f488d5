#include "distill/kd.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.h"

namespace brigade::distill {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// Checks the counted rows (ids [n, k] int64, logprobs [n, k]) for bad input. The
// common case costs one host sync; the messages are only worked out on failure.
void check_teacher(const torch::Tensor& ids, const torch::Tensor& logprobs, int64_t vocab) {
  const int64_t n = ids.size(0);
  const int64_t k = ids.size(1);
  if (n == 0) return;
  const torch::Tensor sorted = std::get<0>(ids.sort(1));
  const torch::Tensor out_of_range = (ids < 0) | (ids >= vocab);
  const torch::Tensor repeated = sorted.slice(1, 1).eq(sorted.slice(1, 0, k - 1));
  const torch::Tensor bad_logprob = torch::isnan(logprobs) | torch::isposinf(logprobs);
  torch::Tensor flags = torch::stack({out_of_range.any(), repeated.any(), bad_logprob.any(),
                                      k == vocab ? torch::isneginf(logprobs).all(1).any()
                                                 : torch::zeros({}, ids.options().dtype(torch::kBool))});
  flags = flags.cpu();
  const bool* f = flags.data_ptr<bool>();
  if (!(f[0] || f[1] || f[2] || f[3])) return;

  if (f[0]) {
    const int64_t id = ids.masked_select(out_of_range)[0].item<int64_t>();
    BRIGADE_FAIL("teacher token id ", id, " is outside the student's vocabulary (", vocab, ")");
  }
  if (f[1]) {
    const int64_t row = repeated.any(1).nonzero()[0][0].item<int64_t>();
    BRIGADE_FAIL("teacher token ids repeat within a position (counted position ", row,
                 "): the top-k candidates must be distinct");
  }
  if (f[2]) {
    const int64_t row = bad_logprob.any(1).nonzero()[0][0].item<int64_t>();
    BRIGADE_FAIL("teacher log-prob is NaN or +inf (counted position ", row, ")");
  }
  const int64_t row = torch::isneginf(logprobs).all(1).nonzero()[0][0].item<int64_t>();
  BRIGADE_FAIL("teacher log-probs are all -inf at counted position ", row,
               " and k equals the vocabulary, so the teacher's distribution is empty");
}

// The teacher's bucket log-probabilities at T: [n, k] log-probs at T = 1 in, [n, k + 1]
// (or [n, k] without a tail) out. No gradient flows here.
torch::Tensor teacher_buckets(const torch::Tensor& logprobs, bool tail, double temperature) {
  torch::Tensor u = logprobs;
  if (tail) {
    // log(1 - sum exp(l)) = log(-expm1(logsumexp(l))); clamping at 0 turns a top-k
    // that rounds to all the mass (or more) into an empty tail, log 0 = -inf.
    const torch::Tensor rest = (-torch::expm1(torch::logsumexp(logprobs, 1, true))).clamp_min(0);
    u = torch::cat({logprobs, torch::log(rest)}, 1);
  }
  return torch::log_softmax(u / temperature, 1);
}

// The student's bucket log-probabilities at T: logits [n, V], ids [n, k] int64 in,
// [n, k + 1] (or [n, k] without a tail) out, differentiable.
torch::Tensor student_buckets(const torch::Tensor& logits, const torch::Tensor& ids, bool tail, double temperature) {
  const torch::Tensor z = logits / temperature;
  const torch::Tensor log_norm = torch::logsumexp(z, 1, true);
  const torch::Tensor top = z.gather(1, ids) - log_norm;
  if (!tail) return top;
  // The tail directly from the other logits: at least one is left (k < V, ids
  // distinct), and the gradient through the scattered -inf entries is zero.
  const torch::Tensor others = z.scatter(1, ids, -kInf);
  return torch::cat({top, torch::logsumexp(others, 1, true) - log_norm}, 1);
}

// sum_j exp(a_j) * (a_j - b_j) for teacher-side a (no gradient, may hold -inf) and
// b (finite): buckets with exp(a_j) = 0 contribute exactly 0.
torch::Tensor kl_from_teacher_side(const torch::Tensor& a, const torch::Tensor& b) {
  const torch::Tensor p = torch::exp(a);
  const torch::Tensor a_finite = torch::where(torch::isneginf(a), torch::zeros_like(a), a);
  return (p * (a_finite - b)).sum(1);
}

// Per-position divergence, [n], between teacher buckets a and student buckets b.
torch::Tensor divergence(const torch::Tensor& a, const torch::Tensor& b, const KdOptions& options) {
  switch (options.loss) {
    case KdLoss::kForwardKl:
      return kl_from_teacher_side(a, b);
    case KdLoss::kReverseKl:
      return (torch::exp(b) * (b - a.clamp_min(kKdLogProbFloor))).sum(1);
    case KdLoss::kJsd: {
      const double beta = options.beta;
      // log M; finite because the student's buckets are and 1 - beta > 0.
      const torch::Tensor log_m = torch::logaddexp(a + std::log(beta), b + std::log1p(-beta));
      const torch::Tensor teacher_term = kl_from_teacher_side(a, log_m);
      const torch::Tensor student_term = (torch::exp(b) * (b - log_m)).sum(1);
      return beta * teacher_term + (1.0 - beta) * student_term;
    }
    case KdLoss::kNone:
    case KdLoss::kUld:  // not a divergence of buckets: kd_loss computes it apart
      break;
  }
  BRIGADE_ASSERT(false, "divergence() called without a KD loss");
  return {};
}

// ULD per position (see kd.h): [n, V] student logits and [n, k] teacher log-probs at
// T = 1 in, [n] out.
torch::Tensor uld(const torch::Tensor& logits, const torch::Tensor& teacher_logprobs, double temperature) {
  const int64_t k = std::min(teacher_logprobs.size(1), logits.size(1));
  BRIGADE_CHECK(!torch::isnan(teacher_logprobs).any().item<bool>() && !torch::isposinf(teacher_logprobs).any().item<bool>(),
                "teacher log-prob is NaN or +inf");
  // The teacher's k largest at T, sorted, and its tail (clamped: a top-k that rounds to
  // all the mass leaves none).
  const torch::Tensor teacher = teacher_buckets(teacher_logprobs, /*tail=*/true, temperature).exp();  // [n, k_t + 1]
  const int64_t kt = teacher_logprobs.size(1);
  const torch::Tensor p = std::get<0>(teacher.narrow(1, 0, kt).sort(1, /*descending=*/true)).narrow(1, 0, k);
  const torch::Tensor p_tail = (1.0 - p.sum(1)).clamp_min(0);
  const torch::Tensor q_all = torch::softmax(logits / temperature, 1);
  const torch::Tensor q = std::get<0>(q_all.topk(k, 1));
  const torch::Tensor q_tail = (1.0 - q.sum(1)).clamp_min(0);
  return (p - q).abs().sum(1) + (p_tail - q_tail).abs();
}

}  // namespace

KdLoss parse_kd_loss(const std::string& name) {
  if (name == "none") return KdLoss::kNone;
  if (name == "forward_kl") return KdLoss::kForwardKl;
  if (name == "reverse_kl") return KdLoss::kReverseKl;
  if (name == "jsd") return KdLoss::kJsd;
  if (name == "uld") return KdLoss::kUld;
  BRIGADE_FAIL("unknown KD loss \"", name, "\"; choose one of: none, forward_kl, reverse_kl, jsd, uld");
}

std::string to_string(KdLoss loss) {
  switch (loss) {
    case KdLoss::kNone:
      return "none";
    case KdLoss::kForwardKl:
      return "forward_kl";
    case KdLoss::kReverseKl:
      return "reverse_kl";
    case KdLoss::kJsd:
      return "jsd";
    case KdLoss::kUld:
      return "uld";
  }
  BRIGADE_ASSERT(false, "unknown KdLoss value ", static_cast<int>(loss));
  return {};
}

void KdOptions::validate() const {
  BRIGADE_CHECK(weight >= 0.0 && weight <= 1.0, "KD weight must be in [0, 1], got ", weight);
  BRIGADE_CHECK(std::isfinite(temperature) && temperature > 0.0,
                "KD temperature must be finite and > 0, got ", temperature);
  BRIGADE_CHECK(beta > 0.0 && beta < 1.0, "KD beta must be in (0, 1) (the JSD vanishes at 0 and 1; use ",
                "forward_kl or reverse_kl for those limits), got ", beta);
}

torch::Tensor kd_loss(const torch::Tensor& student_logits, const torch::Tensor& teacher_ids,
                      const torch::Tensor& teacher_logprobs, const torch::Tensor& mask, const KdOptions& options) {
  options.validate();
  BRIGADE_CHECK(options.loss != KdLoss::kNone, "kd_loss called with loss none (SFT only): nothing to compute");
  BRIGADE_CHECK(student_logits.dim() == 2 && student_logits.is_floating_point(),
                "student logits must be a floating [N, V] tensor, got ", student_logits.sizes(), " ",
                student_logits.scalar_type());
  const int64_t positions = student_logits.size(0);
  const int64_t vocab = student_logits.size(1);
  BRIGADE_CHECK(teacher_ids.dim() == 2 && teacher_ids.size(0) == positions,
                "teacher ids must be [N, k] with N = ", positions, ", got ", teacher_ids.sizes());
  BRIGADE_CHECK(teacher_ids.scalar_type() == torch::kInt32 || teacher_ids.scalar_type() == torch::kInt64,
                "teacher ids must be int32 or int64, got ", teacher_ids.scalar_type());
  const int64_t k = teacher_ids.size(1);
  BRIGADE_CHECK(k >= 1 && (k <= vocab || options.loss == KdLoss::kUld), "teacher top-k must be in [1, V = ", vocab,
                "], got k = ", k);
  BRIGADE_CHECK(teacher_logprobs.sizes() == teacher_ids.sizes() && teacher_logprobs.is_floating_point(),
                "teacher log-probs must be a floating tensor shaped like the ids ", teacher_ids.sizes(), ", got ",
                teacher_logprobs.sizes(), " ", teacher_logprobs.scalar_type());
  BRIGADE_CHECK(mask.dim() == 1 && mask.size(0) == positions && mask.scalar_type() == torch::kBool,
                "mask must be bool [N] with N = ", positions, ", got ", mask.sizes(), " ", mask.scalar_type());

  // float32 at least: bf16/fp16 log-softmax over a large vocabulary loses the tail.
  const auto dtype = student_logits.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  const torch::Device device = student_logits.device();

  // Only the counted rows are read: padding rows may hold anything, and selecting
  // them out (rather than multiplying by the mask) keeps their junk out of the gradient.
  const torch::Tensor rows = mask.to(device).nonzero().squeeze(1);  // [n]
  const torch::Tensor logits = student_logits.index_select(0, rows).to(dtype);
  const torch::Tensor ids = teacher_ids.to(device).index_select(0, rows).to(torch::kLong);
  const torch::Tensor logprobs = teacher_logprobs.to(device).index_select(0, rows).to(dtype);
  if (options.loss == KdLoss::kUld) {
    return uld(logits, logprobs, options.temperature).sum() / static_cast<double>(std::max<int64_t>(rows.size(0), 1));
  }
  check_teacher(ids, logprobs, vocab);

  const bool tail = k < vocab;
  const double t = options.temperature;
  const torch::Tensor a = teacher_buckets(logprobs, tail, t);
  const torch::Tensor b = student_buckets(logits, ids, tail, t);
  const torch::Tensor per_position = divergence(a, b, options) * (t * t);  // [n]
  // An empty selection sums to 0 with a zero gradient, so "none counts" needs no branch.
  return per_position.sum() / static_cast<double>(std::max<int64_t>(rows.size(0), 1));
}

void check_same_tokenizer(const std::string& teacher_tokenizer, int64_t teacher_vocab,
                          const std::string& student_tokenizer, int64_t student_vocab) {
  BRIGADE_CHECK(teacher_tokenizer == student_tokenizer && teacher_vocab == student_vocab,
                "logit distillation needs the teacher and the student to share a tokenizer: teacher ",
                teacher_tokenizer, " (", teacher_vocab, " ids), student ", student_tokenizer, " (", student_vocab,
                " ids); set distill.kd.loss: none for SFT only");
}

}  // namespace brigade::distill
