#include <gtest/gtest.h>

#include <numeric>
#include <set>
#include <tuple>

#include <torch/torch.h>

#include "data/sampler.h"
#include "tests/testing.h"

namespace brigade::data {
namespace {

// Tokens 0..n-1 (so a token's value is its position) with mask = position % 3 != 0.
TokenCorpus counting_corpus(int64_t n, bool with_mask) {
  std::vector<int64_t> tokens(static_cast<size_t>(n));
  std::iota(tokens.begin(), tokens.end(), 0);
  std::vector<uint8_t> mask;
  if (with_mask)
    for (int64_t i = 0; i < n; ++i) mask.push_back(i % 3 != 0);
  return TokenCorpus::from_tokens(std::move(tokens), std::move(mask));
}

SamplerOptions options(int64_t seq_len, int64_t rows, uint64_t seed = 7, int rank = 0,
                       int world = 1) {
  SamplerOptions o;
  o.seq_len = seq_len;
  o.micro_batch_size = rows;
  o.seed = seed;
  o.rank = rank;
  o.world_size = world;
  o.micro_batches = 4;
  return o;
}

TEST(BatchSampler, ShapesAndShift) {
  BatchSampler sampler(counting_corpus(1000, false), options(16, 4));
  Batch b = sampler.batch(3, 0);
  ASSERT_EQ(b.inputs.sizes(), (std::vector<int64_t>{4, 16}));
  ASSERT_EQ(b.targets.sizes(), (std::vector<int64_t>{4, 16}));
  EXPECT_EQ(b.inputs.dtype(), torch::kInt64);
  EXPECT_EQ(b.targets.dtype(), torch::kInt64);
  EXPECT_EQ(b.trained_tokens, 4 * 16);
  auto in = b.inputs.accessor<int64_t, 2>();
  auto tg = b.targets.accessor<int64_t, 2>();
  for (int64_t r = 0; r < 4; ++r) {
    // A window of consecutive corpus positions that fits in the corpus.
    EXPECT_GE(in[r][0], 0);
    EXPECT_LE(in[r][0] + 16, 999);
    for (int64_t t = 0; t < 16; ++t) {
      EXPECT_EQ(in[r][t], in[r][0] + t);
      EXPECT_EQ(tg[r][t], in[r][t] + 1);
    }
  }
}

TEST(BatchSampler, IsAPureFunctionOfItsArguments) {
  TokenCorpus corpus = counting_corpus(5000, false);
  BatchSampler a(corpus, options(32, 8));
  BatchSampler b(corpus, options(32, 8));
  Batch x = a.batch(11, 2);
  Batch y = b.batch(11, 2);
  EXPECT_TRUE(torch::equal(x.inputs, y.inputs));
  EXPECT_TRUE(torch::equal(x.targets, y.targets));
  // Asking again (after other batches) gives the same batch: there is no cursor.
  a.batch(12, 0);
  EXPECT_TRUE(torch::equal(a.batch(11, 2).inputs, x.inputs));

  EXPECT_FALSE(torch::equal(a.batch(12, 2).inputs, x.inputs));  // another step
  EXPECT_FALSE(torch::equal(a.batch(11, 3).inputs, x.inputs));  // another micro-batch
  BatchSampler rank1(corpus, options(32, 8, 7, /*rank=*/1, /*world=*/2));
  EXPECT_FALSE(torch::equal(rank1.batch(11, 2).inputs, x.inputs));  // another rank
  BatchSampler reseeded(corpus, options(32, 8, /*seed=*/8));
  EXPECT_FALSE(torch::equal(reseeded.batch(11, 2).inputs, x.inputs));  // another seed
}

// A step's rows do not depend on how they are split into ranks and micro-batches
// (data-parallel runs reproduce one process bit for bit from this).
TEST(BatchSampler, AStepHasTheSameRowsForAnySplit) {
  TokenCorpus corpus = counting_corpus(5000, true);
  auto split = [&](int world, int64_t micro_batches, int64_t rows) {
    std::vector<torch::Tensor> inputs, targets;
    for (int rank = 0; rank < world; ++rank) {
      auto o = options(16, rows, 7, rank, world);
      o.micro_batches = micro_batches;
      BatchSampler sampler(corpus, o);
      for (int64_t m = 0; m < micro_batches; ++m) {
        auto b = sampler.batch(9, m);
        inputs.push_back(b.inputs);
        targets.push_back(b.targets);
      }
    }
    return std::make_pair(torch::cat(inputs), torch::cat(targets));
  };
  const auto whole = split(1, 1, 8);
  for (const auto& [world, micro, rows] : {std::tuple{1, 4, 2}, {2, 2, 2}, {4, 1, 2}, {2, 1, 4}, {1, 8, 1}}) {
    const auto parts = split(world, micro, rows);
    EXPECT_TRUE(torch::equal(parts.first, whole.first)) << world << " ranks x " << micro << " x " << rows;
    EXPECT_TRUE(torch::equal(parts.second, whole.second)) << world << " ranks x " << micro << " x " << rows;
  }
  EXPECT_FALSE(torch::equal(split(1, 1, 8).first, split(1, 1, 16).first.narrow(0, 8, 8)));
}

TEST(BatchSampler, RowsDiffer) {
  BatchSampler sampler(counting_corpus(100000, false), options(8, 16));
  Batch b = sampler.batch(0, 0);
  std::set<int64_t> starts;
  for (int64_t r = 0; r < 16; ++r) starts.insert(b.inputs[r][0].item<int64_t>());
  EXPECT_GT(starts.size(), 12u);
}

TEST(BatchSampler, MaskedTargetsAreIgnored) {
  BatchSampler sampler(counting_corpus(300, true), options(10, 6));
  Batch b = sampler.batch(5, 1);
  auto in = b.inputs.accessor<int64_t, 2>();
  auto tg = b.targets.accessor<int64_t, 2>();
  int64_t trained = 0;
  for (int64_t r = 0; r < 6; ++r) {
    for (int64_t t = 0; t < 10; ++t) {
      const int64_t target_pos = in[r][t] + 1;  // tokens equal their positions
      if (target_pos % 3 == 0) {
        EXPECT_EQ(tg[r][t], kIgnoreIndex);
      } else {
        EXPECT_EQ(tg[r][t], target_pos);
        ++trained;
      }
    }
  }
  EXPECT_EQ(b.trained_tokens, trained);
  EXPECT_LT(trained, 60);
  EXPECT_EQ(b.trained_tokens, (b.targets != kIgnoreIndex).sum().item<int64_t>());
}

TEST(BatchSampler, SmallestCorpusUsesTheOnlyWindow) {
  BatchSampler sampler(counting_corpus(5, false), options(4, 3));
  Batch b = sampler.batch(0, 0);
  for (int64_t r = 0; r < 3; ++r) {
    EXPECT_TRUE(torch::equal(b.inputs[r], torch::arange(0, 4, torch::kInt64)));
    EXPECT_TRUE(torch::equal(b.targets[r], torch::arange(1, 5, torch::kInt64)));
  }
}

// Packed rows: batches take whole rows (each starting with a document's BOS) and
// number the documents of each row for the attention mask.
TEST(BatchSampler, PackedRowsAreSampledWholeWithDocumentIndices) {
  const int64_t T = 7, bos = 100;
  // Three rows of T + 1 = 8 tokens: [bos 1 2 bos 3 4 5 pad], [bos 6 ...], [bos 9 bos 8 bos 7 pad pad].
  std::vector<int64_t> tokens = {bos, 1, 2, bos, 3, 4, 5, 0, bos, 6, 6, 6, 6, 6, 6, 6, bos, 9, bos, 8, bos, 7, 0, 0};
  SamplerOptions o;
  o.seq_len = T;
  o.micro_batch_size = 6;
  o.document_start = bos;
  BatchSampler sampler(TokenCorpus::from_tokens(tokens), o);
  auto b = sampler.batch(0, 0);
  ASSERT_TRUE(b.segments.defined());
  for (int64_t r = 0; r < 6; ++r) {
    EXPECT_EQ(b.inputs[r][0].item<int64_t>(), bos) << "row " << r << " does not start a row of the corpus";
    const int64_t first = b.inputs[r][1].item<int64_t>();
    const std::vector<int64_t> expected = first == 1 ? std::vector<int64_t>{0, 0, 0, 1, 1, 1, 1}
                                          : first == 6 ? std::vector<int64_t>{0, 0, 0, 0, 0, 0, 0}
                                                       : std::vector<int64_t>{0, 0, 1, 1, 2, 2, 2};
    for (int64_t t = 0; t < T; ++t) EXPECT_EQ(b.segments[r][t].item<int64_t>(), expected[static_cast<size_t>(t)]) << r << " " << t;
  }
  tokens.push_back(0);  // no longer whole rows
  EXPECT_BRIGADE_ERROR(BatchSampler(TokenCorpus::from_tokens(tokens), o), "packed rows need a corpus of whole rows");
}

TEST(BatchSampler, ConstructorErrors) {
  EXPECT_BRIGADE_ERROR(BatchSampler(counting_corpus(10, false), options(10, 1)),
                       "the corpus has 10 tokens, but seq_len 10 needs at least 11");
  EXPECT_BRIGADE_ERROR(BatchSampler(counting_corpus(10, false), options(0, 1)),
                       "seq_len must be >= 1, got 0");
  EXPECT_BRIGADE_ERROR(BatchSampler(counting_corpus(10, false), options(4, 0)),
                       "micro_batch_size must be >= 1, got 0");
  EXPECT_BRIGADE_ERROR(BatchSampler(counting_corpus(10, false), options(4, 1, 0, 2, 2)),
                       "rank 2 is outside [0, 2)");
}

}  // namespace
}  // namespace brigade::data
