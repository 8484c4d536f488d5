// Speculative decoding with the model's own multi-token-prediction modules as the
// draft (DeepSeek-V3 §2.2 and §5.4.3: the MTP module "can be repurposed for
// speculative decoding"). Each round the MTP modules propose up to D tokens beyond
// the pending one, chained (module k's hidden state feeds module k + 1, as in
// training), and one main-model forward over the pending token and the drafts
// scores them all: the drafts that equal the main model's greedy choice are kept,
// and the first choice after them comes free. The tokens are therefore greedy
// decoding's (generate() at temperature 0); only the number of main-model
// forwards changes. Exact in exact arithmetic: a verification forward over several
// positions sums in another order than one over a single position, so a
// near-tie between two logits could in principle resolve differently.
//
// Caches: the main model's, and one per MTP module (its block attends over its
// own earlier positions). Rejected drafts are undone by shortening the caches: the
// main cache to the accepted tokens, module k's to the positions whose inputs (the
// tokens up to k ahead) are all accepted. The hidden states each module passes on
// are kept per position for the positions the next round recomputes.
#pragma once

#include <cstdint>
#include <vector>

#include "model/generate.h"
#include "model/transformer.h"

namespace brigade::model {

struct SpeculativeStats {
  int64_t rounds = 0;    // verification forwards of the main model after the prompt
  int64_t drafted = 0;   // tokens the MTP modules proposed
  int64_t accepted = 0;  // of them, equal to the main model's choice
  // New tokens per main-model forward (plain greedy decoding: 1).
  double tokens_per_round() const { return rounds > 0 ? static_cast<double>(accepted + rounds) / rounds : 0.0; }
  double acceptance() const { return drafted > 0 ? static_cast<double>(accepted) / drafted : 0.0; }
};

// Greedy continuation of `prompt` (one sequence) drafted by the first `depth` MTP
// modules (0: all of model.mtp.depth). options.temperature must be 0 and
// options.logprobs 0; stop ids, max_new_tokens, vocab_limit and the context limit
// act as in generate(). Runs in inference mode; the training state is restored.
Generation generate_speculative(Transformer& model, const std::vector<int64_t>& prompt,
                                const SamplingOptions& options, int64_t depth = 0,
                                SpeculativeStats* stats = nullptr);

}  // namespace brigade::model
