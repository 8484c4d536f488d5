#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <vector>

#include "distill/kd.h"
#include "tests/testing.h"

namespace brigade::distill {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// One batch of KD inputs: a teacher with a full random distribution over the
// vocabulary, of which the top-k was kept, and a random student.
struct Case {
  torch::Tensor student;          // [N, V] float32
  torch::Tensor teacher_full;     // [N, V] float64 logits the top-k came from
  torch::Tensor ids;              // [N, k] int32
  torch::Tensor logprobs;         // [N, k] float32
  torch::Tensor mask;             // [N] bool
};

Case make_case(int64_t n, int64_t vocab, int64_t k, uint64_t seed) {
  torch::manual_seed(seed);
  Case c;
  c.teacher_full = torch::randn({n, vocab}, torch::kDouble) * 2.0;
  auto [logprobs, ids] = torch::log_softmax(c.teacher_full, 1).topk(k, 1);
  c.ids = ids.to(torch::kInt);
  c.logprobs = logprobs.to(torch::kFloat);
  c.student = torch::randn({n, vocab}) * 1.5;
  c.mask = torch::ones({n}, torch::kBool);
  return c;
}

KdOptions options_for(KdLoss loss, double temperature = 1.0, double beta = 0.5) {
  KdOptions o;
  o.loss = loss;
  o.temperature = temperature;
  o.beta = beta;
  return o;
}

// The loss written directly from the definitions in kd.h, in float64 with plain
// loops: teacher bucket masses exp(l_i) and 1 - sum, tempered as mass^(1/T); the
// student's softmax summed into the same buckets.
double reference_loss(const torch::Tensor& student, const torch::Tensor& ids, const torch::Tensor& logprobs,
                      const torch::Tensor& mask, const KdOptions& o) {
  const torch::Tensor z = student.to(torch::kDouble).contiguous();
  const torch::Tensor id = ids.to(torch::kLong).contiguous();
  const torch::Tensor lp = logprobs.to(torch::kDouble).contiguous();
  const torch::Tensor m = mask.contiguous();
  const int64_t n = z.size(0), vocab = z.size(1), k = id.size(1);
  const double t = o.temperature, beta = o.beta;
  double total = 0.0;
  int64_t counted = 0;
  for (int64_t r = 0; r < n; ++r) {
    if (!m[r].item<bool>()) continue;
    ++counted;
    std::vector<double> mass(k);
    double top = 0.0;
    for (int64_t i = 0; i < k; ++i) top += mass[i] = std::exp(lp[r][i].item<double>());
    if (k < vocab) mass.push_back(std::max(0.0, 1.0 - top));
    std::vector<double> p(mass.size());
    double p_sum = 0.0;
    for (size_t j = 0; j < mass.size(); ++j) p_sum += p[j] = std::pow(mass[j], 1.0 / t);
    for (double& x : p) x /= p_sum;

    std::vector<double> q_full(vocab);
    double z_max = -kInf, q_sum = 0.0;
    for (int64_t v = 0; v < vocab; ++v) z_max = std::max(z_max, z[r][v].item<double>() / t);
    for (int64_t v = 0; v < vocab; ++v) q_sum += q_full[v] = std::exp(z[r][v].item<double>() / t - z_max);
    std::vector<double> q(p.size(), 0.0);
    std::vector<bool> in_top(vocab, false);
    for (int64_t i = 0; i < k; ++i) {
      const int64_t v = id[r][i].item<int64_t>();
      in_top[v] = true;
      q[i] = q_full[v] / q_sum;
    }
    if (k < vocab)
      for (int64_t v = 0; v < vocab; ++v)
        if (!in_top[v]) q[k] += q_full[v] / q_sum;

    double d = 0.0;
    for (size_t j = 0; j < p.size(); ++j) {
      switch (o.loss) {
        case KdLoss::kForwardKl:
          if (p[j] > 0) d += p[j] * std::log(p[j] / q[j]);
          break;
        case KdLoss::kReverseKl:
          d += q[j] * (std::log(q[j]) - std::max(std::log(p[j]), kKdLogProbFloor));
          break;
        case KdLoss::kJsd: {
          const double mix = beta * p[j] + (1 - beta) * q[j];
          if (p[j] > 0) d += beta * p[j] * std::log(p[j] / mix);
          d += (1 - beta) * q[j] * std::log(q[j] / mix);
          break;
        }
        case KdLoss::kNone:
        case KdLoss::kUld:  // tests/distill/uld_test.cpp
          ADD_FAILURE();
      }
    }
    total += d * t * t;
  }
  return counted == 0 ? 0.0 : total / static_cast<double>(counted);
}

double loss_value(const Case& c, const KdOptions& o) {
  return kd_loss(c.student, c.ids, c.logprobs, c.mask, o).item<double>();
}

// Gradient of kd_loss w.r.t. the student logits.
torch::Tensor loss_grad(const torch::Tensor& student, const Case& c, const KdOptions& o) {
  torch::Tensor x = student.detach().clone().requires_grad_(true);
  torch::Tensor loss = kd_loss(x, c.ids, c.logprobs, c.mask, o);
  return torch::autograd::grad({loss}, {x})[0];
}

void expect_close(double got, double want, const std::string& what) {
  EXPECT_NEAR(got, want, 1e-5 * std::max(1.0, std::abs(want)) + 1e-7) << what;
}

const KdLoss kLosses[] = {KdLoss::kForwardKl, KdLoss::kReverseKl, KdLoss::kJsd};

TEST(DistillKd, ParsesAndPrintsEveryLoss) {
  for (KdLoss loss : {KdLoss::kNone, KdLoss::kForwardKl, KdLoss::kReverseKl, KdLoss::kJsd})
    EXPECT_EQ(parse_kd_loss(to_string(loss)), loss);
  EXPECT_EQ(to_string(KdLoss::kJsd), "jsd");
  EXPECT_EQ(parse_kd_loss("forward_kl"), KdLoss::kForwardKl);
  EXPECT_BRIGADE_ERROR(parse_kd_loss("kl"), "none, forward_kl, reverse_kl, jsd");
  EXPECT_BRIGADE_ERROR(parse_kd_loss("Forward_KL"), "unknown KD loss \"Forward_KL\"");
}

TEST(DistillKd, OptionsAreValidated) {
  KdOptions ok;
  EXPECT_NO_THROW(ok.validate());
  KdOptions o;
  o.temperature = 0.0;
  EXPECT_BRIGADE_ERROR(o.validate(), "temperature");
  o = {};
  o.temperature = kInf;
  EXPECT_BRIGADE_ERROR(o.validate(), "temperature");
  o = {};
  o.beta = 0.0;
  EXPECT_BRIGADE_ERROR(o.validate(), "beta must be in (0, 1)");
  o.beta = 1.0;
  EXPECT_BRIGADE_ERROR(o.validate(), "beta must be in (0, 1)");
  o = {};
  o.weight = 1.5;
  EXPECT_BRIGADE_ERROR(o.validate(), "weight");
  // kd_loss refuses "none" and invalid options.
  Case c = make_case(2, 5, 2, 1);
  EXPECT_BRIGADE_ERROR(loss_value(c, KdOptions{}), "loss none");
  EXPECT_BRIGADE_ERROR(loss_value(c, options_for(KdLoss::kJsd, -1.0)), "temperature");
}

TEST(DistillKd, EveryDivergenceMatchesTheFloat64Reference) {
  for (int64_t k : {1, 3, 6}) {
    Case c = make_case(6, 9, k, 10 + k);
    c.mask = torch::tensor({true, false, true, true, false, true});
    for (KdLoss loss : kLosses)
      for (double t : {1.0, 0.5, 2.5})
        for (double beta : {0.1, 0.5, 0.9}) {
          if (loss != KdLoss::kJsd && beta != 0.5) continue;
          const KdOptions o = options_for(loss, t, beta);
          const double want = reference_loss(c.student, c.ids, c.logprobs, c.mask, o);
          EXPECT_GT(want, 1e-3);  // a real divergence, not a trivially zero one
          expect_close(loss_value(c, o), want,
                       to_string(loss) + " k=" + std::to_string(k) + " T=" + std::to_string(t) +
                           " beta=" + std::to_string(beta));
        }
  }
}

TEST(DistillKd, FullVocabularyTopKIsThePlainKl) {
  // k = V: no tail bucket, and re-tempering the top-k equals softmax(teacher / T).
  const int64_t vocab = 7;
  Case c = make_case(4, vocab, vocab, 3);
  for (double t : {1.0, 2.0}) {
    const torch::Tensor log_p = torch::log_softmax(c.teacher_full / t, 1);
    const torch::Tensor log_q = torch::log_softmax(c.student.to(torch::kDouble) / t, 1);
    const double forward =
        t * t * torch::kl_div(log_q, log_p, at::Reduction::Sum, /*log_target=*/true).item<double>() / 4;
    const double reverse =
        t * t * torch::kl_div(log_p, log_q, at::Reduction::Sum, /*log_target=*/true).item<double>() / 4;
    expect_close(loss_value(c, options_for(KdLoss::kForwardKl, t)), forward, "forward T=" + std::to_string(t));
    expect_close(loss_value(c, options_for(KdLoss::kReverseKl, t)), reverse, "reverse T=" + std::to_string(t));
  }
}

TEST(DistillKd, ZeroWhenTheStudentMatchesTheTeachersBuckets) {
  // Student logits whose softmax at T puts exactly the teacher's tempered bucket
  // probabilities on the k ids and spreads the tail evenly over the other ids.
  const int64_t n = 3, vocab = 10, k = 4;
  const double t = 2.0;
  Case c = make_case(n, vocab, k, 5);
  const torch::Tensor lp = c.logprobs.to(torch::kDouble);
  const torch::Tensor tail = torch::log1p(-torch::exp(lp).sum(1, true));
  const torch::Tensor buckets = torch::log_softmax(torch::cat({lp, tail}, 1) / t, 1);  // [n, k + 1]
  torch::Tensor z = (t * (buckets.narrow(1, k, 1) - std::log(vocab - k))).expand({n, vocab}).clone();
  z.scatter_(1, c.ids.to(torch::kLong), t * buckets.narrow(1, 0, k));
  c.student = z.to(torch::kFloat);
  for (KdLoss loss : kLosses) {
    const KdOptions o = options_for(loss, t, 0.3);
    EXPECT_NEAR(loss_value(c, o), 0.0, 1e-6) << to_string(loss);
    EXPECT_LT(loss_grad(c.student, c, o).abs().max().item<double>(), 1e-6) << to_string(loss);
  }
  // And the same student at another temperature is not a match.
  EXPECT_GT(loss_value(c, options_for(KdLoss::kForwardKl, 1.0)), 1e-3);
}

TEST(DistillKd, GradientMatchesFiniteDifferences) {
  Case c = make_case(3, 6, 3, 7);
  c.mask = torch::tensor({true, false, true});
  const torch::Tensor x0 = c.student.to(torch::kDouble);
  for (KdLoss loss : kLosses) {
    const KdOptions o = options_for(loss, 1.5, 0.3);
    const torch::Tensor grad = loss_grad(x0, c, o);
    ASSERT_EQ(grad.scalar_type(), torch::kDouble);
    const double h = 1e-6;
    for (int64_t r = 0; r < 3; ++r)
      for (int64_t v = 0; v < 6; ++v) {
        torch::Tensor plus = x0.clone(), minus = x0.clone();
        plus[r][v] += h;
        minus[r][v] -= h;
        const double numeric = (kd_loss(plus, c.ids, c.logprobs, c.mask, o).item<double>() -
                                kd_loss(minus, c.ids, c.logprobs, c.mask, o).item<double>()) /
                               (2 * h);
        EXPECT_NEAR(grad[r][v].item<double>(), numeric, 1e-7) << to_string(loss) << " at " << r << "," << v;
      }
    EXPECT_EQ(grad[1].abs().sum().item<double>(), 0.0) << "an uncounted position gets no gradient";
    EXPECT_GT(grad.abs().sum().item<double>(), 1e-3);
  }
}

TEST(DistillKd, ForwardKlGradientIsStudentMinusTeacherSoftmax) {
  // With k = V: d/dz of T^2 KL(p_T || softmax(z / T)), averaged over n rows, is
  // T (softmax(z / T) - p_T) / n.
  const int64_t n = 4, vocab = 8;
  const double t = 1.7;
  Case c = make_case(n, vocab, vocab, 8);
  c.mask = torch::tensor({true, true, false, true});
  const torch::Tensor grad = loss_grad(c.student, c, options_for(KdLoss::kForwardKl, t));
  const torch::Tensor want = t * (torch::softmax(c.student.to(torch::kDouble) / t, 1) -
                                  torch::softmax(c.teacher_full / t, 1)) /
                             3.0 * c.mask.unsqueeze(1);
  EXPECT_LT((grad.to(torch::kDouble) - want).abs().max().item<double>(), 1e-6);
}

TEST(DistillKd, UncountedPositionsAreIgnoredEvenWhenTheyHoldJunk) {
  Case c = make_case(5, 12, 3, 9);
  c.mask = torch::tensor({true, false, true, false, true});
  Case junk = c;
  junk.ids = c.ids.clone();
  junk.logprobs = c.logprobs.clone();
  junk.student = c.student.clone();
  junk.ids[1].fill_(500);  // out of vocabulary
  junk.ids[3].fill_(2);    // repeated
  junk.logprobs[3].fill_(std::numeric_limits<float>::quiet_NaN());
  junk.student[1].fill_(1e30f);
  // Only the counted rows, on their own.
  const torch::Tensor keep = torch::tensor({0, 2, 4});
  Case subset = c;
  subset.student = c.student.index_select(0, keep);
  subset.ids = c.ids.index_select(0, keep);
  subset.logprobs = c.logprobs.index_select(0, keep);
  subset.mask = torch::ones({3}, torch::kBool);
  for (KdLoss loss : kLosses) {
    const KdOptions o = options_for(loss, 1.3);
    const double want = loss_value(subset, o);
    EXPECT_GT(want, 1e-3);
    expect_close(loss_value(c, o), want, to_string(loss));
    expect_close(loss_value(junk, o), want, to_string(loss) + " with junk");
    const torch::Tensor grad = loss_grad(junk.student, junk, o);
    EXPECT_TRUE(torch::isfinite(grad).all().item<bool>());
    EXPECT_EQ(grad[1].abs().sum().item<double>(), 0.0);
    EXPECT_EQ(grad[3].abs().sum().item<double>(), 0.0);
  }
}

TEST(DistillKd, NoCountedPositionGivesZeroAndAZeroGradient) {
  Case c = make_case(4, 6, 2, 11);
  c.mask = torch::zeros({4}, torch::kBool);
  for (KdLoss loss : kLosses) {
    torch::Tensor x = c.student.clone().requires_grad_(true);
    torch::Tensor value = kd_loss(x, c.ids, c.logprobs, c.mask, options_for(loss));
    EXPECT_EQ(value.item<double>(), 0.0);
    const torch::Tensor grad = torch::autograd::grad({value}, {x})[0];
    ASSERT_TRUE(grad.defined());
    EXPECT_EQ(grad.abs().sum().item<double>(), 0.0);
  }
  // An empty batch too.
  Case empty = make_case(0, 6, 2, 12);
  EXPECT_EQ(loss_value(empty, options_for(KdLoss::kJsd)), 0.0);
}

TEST(DistillKd, ZeroProbabilityTeacherBucketsGiveNoNan) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  // (a) -inf log-probs among the top-k, with a tail.
  Case a = make_case(3, 8, 4, 13);
  a.logprobs.select(1, 3).fill_(neg_inf);
  a.logprobs[0][2] = neg_inf;
  // (b) a top-k holding more than all the mass (rounding, or a sloppy server): the
  // tail is empty and the k buckets are renormalised.
  Case b = make_case(2, 8, 3, 14);
  b.logprobs = torch::log(torch::tensor({{0.7f, 0.2f, 0.2f}, {0.6f, 0.3f, 0.3f}}));
  // (c) k = V with -inf entries: no tail at all.
  Case c = make_case(3, 5, 5, 15);
  c.logprobs.select(1, 4).fill_(neg_inf);
  const std::pair<const char*, const Case*> examples[] = {{"-inf in top-k", &a}, {"empty tail", &b}, {"k = V", &c}};
  for (const auto& [name, example] : examples)
    for (KdLoss loss : kLosses)
      for (double t : {1.0, 2.0}) {
        SCOPED_TRACE(name);
        const KdOptions o = options_for(loss, t, 0.4);
        const double value = loss_value(*example, o);
        EXPECT_TRUE(std::isfinite(value)) << to_string(loss);
        expect_close(value, reference_loss(example->student, example->ids, example->logprobs, example->mask, o),
                     to_string(loss) + " T=" + std::to_string(t));
        EXPECT_TRUE(torch::isfinite(loss_grad(example->student, *example, o)).all().item<bool>())
            << to_string(loss);
      }
  // The floor makes student mass on a zero-probability bucket expensive, not infinite.
  EXPECT_GT(loss_value(c, options_for(KdLoss::kReverseKl)), 1.0);
}

TEST(DistillKd, JsdLimitsAreTheTwoKls) {
  // JSD_beta ~ beta KL(P||Q) as beta -> 0 and ~ (1 - beta) KL(Q||P) as beta -> 1.
  Case c = make_case(4, 9, 4, 16);
  c.student = c.student.to(torch::kDouble);
  const double forward = loss_value(c, options_for(KdLoss::kForwardKl, 1.5));
  const double reverse = loss_value(c, options_for(KdLoss::kReverseKl, 1.5));
  const double eps = 1e-4;
  EXPECT_NEAR(loss_value(c, options_for(KdLoss::kJsd, 1.5, eps)) / eps, forward, 2e-3 * forward);
  EXPECT_NEAR(loss_value(c, options_for(KdLoss::kJsd, 1.5, 1 - eps)) / eps, reverse, 2e-3 * reverse);
  // The symmetric JSD is bounded by log 2 (times T^2).
  EXPECT_LT(loss_value(c, options_for(KdLoss::kJsd, 1.0, 0.5)), std::log(2.0));
}

TEST(DistillKd, LowPrecisionLogitsAreComputedInFloat32) {
  Case c = make_case(3, 16, 4, 17);
  Case half = c;
  half.student = c.student.to(torch::kBFloat16);
  Case upcast = c;
  upcast.student = half.student.to(torch::kFloat);
  for (KdLoss loss : kLosses) {
    const torch::Tensor value = kd_loss(half.student, half.ids, half.logprobs, half.mask, options_for(loss, 2.0));
    EXPECT_EQ(value.scalar_type(), torch::kFloat);
    EXPECT_NEAR(value.item<double>(), loss_value(upcast, options_for(loss, 2.0)), 1e-6);
  }
  // int64 ids work the same as int32.
  Case wide = c;
  wide.ids = c.ids.to(torch::kLong);
  EXPECT_EQ(loss_value(wide, options_for(KdLoss::kJsd)), loss_value(c, options_for(KdLoss::kJsd)));
}

TEST(DistillKd, TokenizerMismatchIsAClearError) {
  EXPECT_NO_THROW(check_same_tokenizer("byte", 261, "byte", 261));
  EXPECT_BRIGADE_ERROR(check_same_tokenizer("byte", 261, "bpe", 32000),
                       "logit distillation needs the teacher and the student to share a tokenizer: teacher byte "
                       "(261 ids), student bpe (32000 ids); set distill.kd.loss: none for SFT only");
  EXPECT_BRIGADE_ERROR(check_same_tokenizer("bpe", 32000, "bpe", 32001), "student bpe (32001 ids)");
}

TEST(DistillKd, BadTeacherIdsAreErrors) {
  Case c = make_case(2, 264, 3, 18);
  c.ids[1][2] = 300;
  EXPECT_BRIGADE_ERROR(loss_value(c, options_for(KdLoss::kForwardKl)),
                       "teacher token id 300 is outside the student's vocabulary (264)");
  c.ids[1][2] = -1;
  EXPECT_BRIGADE_ERROR(loss_value(c, options_for(KdLoss::kForwardKl)), "teacher token id -1 is outside");
  c.ids[1][2] = c.ids[1][0].item<int>();
  EXPECT_BRIGADE_ERROR(loss_value(c, options_for(KdLoss::kForwardKl)), "repeat");
  Case nan = make_case(2, 10, 3, 19);
  nan.logprobs[0][1] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_BRIGADE_ERROR(loss_value(nan, options_for(KdLoss::kJsd)), "NaN");
  Case empty = make_case(2, 4, 4, 20);
  empty.logprobs[1].fill_(-std::numeric_limits<float>::infinity());
  EXPECT_BRIGADE_ERROR(loss_value(empty, options_for(KdLoss::kJsd)), "all -inf");
}

TEST(DistillKd, ShapeMismatchesAreErrors) {
  Case c = make_case(3, 10, 4, 21);
  const KdOptions o = options_for(KdLoss::kForwardKl);
  EXPECT_BRIGADE_ERROR(kd_loss(c.student, c.ids.narrow(0, 0, 2), c.logprobs, c.mask, o), "teacher ids");
  EXPECT_BRIGADE_ERROR(kd_loss(c.student, c.ids, c.logprobs.narrow(1, 0, 3), c.mask, o), "teacher log-probs");
  EXPECT_BRIGADE_ERROR(kd_loss(c.student, c.ids, c.logprobs, c.mask.to(torch::kInt), o), "mask must be bool");
  EXPECT_BRIGADE_ERROR(kd_loss(c.student.narrow(1, 0, 3), c.ids, c.logprobs, c.mask, o), "top-k must be in");
  EXPECT_BRIGADE_ERROR(kd_loss(c.student, c.ids.to(torch::kFloat), c.logprobs, c.mask, o), "int32 or int64");
}

}  // namespace
}  // namespace brigade::distill
