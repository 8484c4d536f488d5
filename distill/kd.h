// Logit distillation (KD): a divergence between the teacher's top-k distribution,
// as captured in the trace store's sidecar (distill/traces.h), and the student's.
//
// Per counted position the teacher gave k distinct token ids t_1..t_k with their
// log-probabilities l_1..l_k at temperature 1 (most likely first). The student gives
// logits z_1..z_V over its vocabulary. Both are reduced to the same k+1 buckets:
// the k teacher ids, plus one tail bucket holding every other token. With T the
// temperature:
//
//   teacher  The bucket log-masses at T = 1 are u_i = l_i (i = 1..k) and, for the
//            tail, u_tail = log(1 - sum_i exp(l_i)), computed as log(-expm1(s)) with
//            s = logsumexp(l) and clamped at 1 - sum >= 0 (a top-k that rounds to
//            more than all the mass leaves an empty tail, u_tail = -inf). The tail is
//            tempered as if it were one token:
//                P_j = exp(u_j / T) / sum_b exp(u_b / T),   j in {1..k, tail}.
//            At T = 1 this is the teacher's exact (k+1)-bucket distribution. At
//            T != 1 it is an approximation: tempering the tail's individual tokens,
//            which the sidecar does not record, would give the tail more mass at
//            T > 1 and less at T < 1.
//   student  q = softmax(z / T) over the whole vocabulary, then
//                Q_i = q[t_i],   Q_tail = sum of q over the ids that are not t_1..t_k,
//            with log Q_tail = logsumexp(z_v / T over the other ids) - logsumexp(z / T),
//            which stays accurate when the tail is tiny (no 1 - sum cancellation).
//
// When k = V (the top-k is the whole vocabulary) there is no tail bucket: P is the
// teacher's log-probs re-tempered and renormalised over the k ids, and each loss
// is the plain full-vocabulary divergence.
//
// The divergences, per position, over the buckets j (0 * log 0 = 0):
//
//   forward_kl  KL(P || Q) = sum_j P_j (log P_j - log Q_j)        mass-covering
//   reverse_kl  KL(Q || P) = sum_j Q_j (log Q_j - log P_j)        mode-seeking
//               A teacher bucket of probability 0 (a -inf log-prob, or an empty
//               tail) would make this infinite wherever the student has mass, so
//               for this loss log P_j is floored at kKdLogProbFloor (-100,
//               P = 3.7e-44): the loss stays finite and pushes that mass away hard.
//   jsd         generalised Jensen-Shannon with beta, P the teacher, Q the student:
//                 M = beta * P + (1 - beta) * Q,
//                 JSD_beta = beta * KL(P || M) + (1 - beta) * KL(Q || M).
//               beta = 0.5 is the symmetric JSD (bounded by log 2). beta must lie
//               in (0, 1): at either end JSD_beta is identically 0. Near the ends
//               it behaves like JSD_beta ~ beta * KL(P || Q) (beta -> 0) and
//               JSD_beta ~ (1 - beta) * KL(Q || P) (beta -> 1); use forward_kl or
//               reverse_kl for those.
//
//   uld         Universal Logit Distillation (Boizard et al. 2024), for a teacher
//               whose vocabulary differs from the student's: the token ids are not
//               compared, only the sorted distributions. With k' = min(k, V):
//                 sum_i |P_(i) - Q_(i)| over the k' largest of each (teacher: its
//                 top-k as given; student: its k' most likely tokens), plus
//                 |P_tail - Q_tail| for the mass outside them,
//               the L1 distance between the two sorted distributions (twice their
//               total variation when both have k' + 1 buckets). Teacher ids may be
//               anything (they index the teacher's vocabulary); they are not read.
//
// Each per-position divergence (uld excepted) is multiplied by T^2 (Hinton et al., 2015): the
// gradients of a divergence of softmax(z / T) scale as 1/T^2, so the product keeps
// the loss's gradient scale comparable across temperatures and with the
// cross-entropy term it is mixed with.
//
// The loss is the mean over counted positions: sum of the per-position values over
// the positions where mask is true, divided by their number (0, with a zero
// gradient, when none counts). Positions that do not count are never read beyond
// the mask, so their ids and log-probs may hold anything (packing padding).
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <string>

namespace brigade::distill {

enum class KdLoss { kNone, kForwardKl, kReverseKl, kJsd, kUld };

// "none" | "forward_kl" | "reverse_kl" | "jsd" | "uld"; anything else is an Error listing them.
KdLoss parse_kd_loss(const std::string& name);
std::string to_string(KdLoss loss);

// Floor on the teacher's bucket log-probabilities in the reverse KL (see above).
inline constexpr double kKdLogProbFloor = -100.0;

struct KdOptions {
  KdLoss loss = KdLoss::kNone;  // kNone: supervised fine-tuning only
  // The share of the KD term in the student's loss: the trainer combines
  // (1 - weight) * cross-entropy + weight * kd_loss. kd_loss itself does not apply it.
  double weight = 0.5;          // in [0, 1]
  double temperature = 1.0;     // T > 0, finite
  double beta = 0.5;            // jsd's mixture weight of the teacher, in (0, 1)

  // An Error naming the field when one is out of range (beta is checked whatever the loss).
  void validate() const;
};

// The KD loss described at the top of this file.
//
//   student_logits    [N, V]  any floating dtype; computed in float32 (float64 stays
//                             float64); the result is differentiable w.r.t. it
//   teacher_ids       [N, k]  int32 or int64, 1 <= k <= V, distinct within a position
//   teacher_logprobs  [N, k]  floating: log-probs at T = 1, no NaN or +inf
//   mask              [N]     bool: the positions that count
//
// Teacher tensors and the mask are moved to student_logits' device. Returns a
// scalar in the compute dtype. Errors: options.loss is kNone or options are invalid,
// shapes disagree, or a counted position has a teacher id outside [0, V) ("teacher
// token id 300 is outside the student's vocabulary (264)"), a repeated id, a NaN or
// +inf log-prob, or (k = V) no finite log-prob. The checks and the selection of the
// counted positions cost one host synchronisation per call.
torch::Tensor kd_loss(const torch::Tensor& student_logits, const torch::Tensor& teacher_ids,
                      const torch::Tensor& teacher_logprobs, const torch::Tensor& mask, const KdOptions& options);

// Logit distillation compares distributions id by id, so the teacher and the student
// must share a tokenizer: the same identity (Tokenizer::name(), or whatever names a
// vocabulary uniquely) and the same number of ids. An Error otherwise, e.g.
// "logit distillation needs the teacher and the student to share a tokenizer:
// teacher byte (261 ids), student bpe (32000 ids); set distill.kd.loss: none for SFT only".
// The sizes are the tokenizers' vocabularies, not a model's padded output width.
void check_same_tokenizer(const std::string& teacher_tokenizer, int64_t teacher_vocab,
                          const std::string& student_tokenizer, int64_t student_vocab);

}  // namespace brigade::distill
