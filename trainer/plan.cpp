#include "trainer/plan.h"

#include <algorithm>
#include <cstdio>
#include <sstream>

#include "core/error.h"

namespace brigade::trainer {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

// Activation bytes one block keeps for backward, per token (see plan.h).
double block_activation_bytes(const model::TransformerOptions& o, int64_t layer, double c) {
  const double d = static_cast<double>(o.d_model), heads = static_cast<double>(o.n_heads);
  double bytes = 2 * d * 4 + 2 * d * c;  // FP32 residual stream into both norms; both norm outputs
  if (o.is_mla()) {
    const auto& a = o.mla;
    const double dn = static_cast<double>(a.qk_nope_head_dim), dr = static_cast<double>(a.qk_rope_head_dim);
    const double dv = static_cast<double>(a.v_head_dim), r = static_cast<double>(a.kv_lora_rank);
    const double q_latent = 2.0 * static_cast<double>(a.q_lora_rank);  // projected, normalised
    bytes += c * (q_latent + 2 * heads * (dn + dr) /* q before and after RoPE */ + (r + dr) + r /* latent, normalised */ +
                  heads * (dn + dv) /* expanded k_nope, v */ + heads * (dn + dr) /* k with the rope key */ +
                  heads * dv /* attention output */);
  } else {
    const double hd = static_cast<double>(o.head_size()), kv = static_cast<double>(o.kv_heads());
    bytes += c * (3 * heads * hd + 3 * kv * hd);  // q and k before and after RoPE, v, the output
  }
  const double ff = static_cast<double>(o.ff_size());
  // SwiGLU: gate, silu(gate), up and their product (autograd keeps each for backward).
  if (!o.is_moe_layer(layer)) return bytes + c * 4 * ff;
  const auto& m = o.moe;
  const double experts = static_cast<double>(m.num_experts), k = static_cast<double>(m.top_k);
  const double expert_ff = static_cast<double>(m.expert_size(o.ff_size()));
  bytes += 2 * experts * 4;                         // router logits and scores, FP32
  bytes += k * c * (2 * d + 3 * expert_ff);         // each routed copy: input, gate, up, product, output
  if (m.num_shared_experts > 0) bytes += c * 4 * static_cast<double>(m.shared_size(o.ff_size()));
  return bytes;
}

std::string human(double value, const char* const* units, int count, double step) {
  int i = 0;
  while (i + 1 < count && std::abs(value) >= step) value /= step, ++i;
  char buf[64];
  const char* format = value >= 100 ? "%.0f%s" : value >= 10 ? "%.1f%s" : value >= 1 || value == 0 ? "%.2f%s" : "%.2g%s";
  std::snprintf(buf, sizeof buf, format, value, units[i]);
  return buf;
}

std::string count_text(double n) {
  static const char* units[] = {"", "K", "M", "B", "T"};
  return human(n, units, 5, 1000.0);
}

std::string gib(double bytes) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.2f GiB", bytes / kGiB);
  return buf;
}

std::string fixed(double v, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

// Each block's parameters (MTP modules not included): what one more layer adds.
std::vector<int64_t> block_parameters(const model::TransformerOptions& o) {
  auto fewer = o;
  fewer.mtp.depth = 0;
  fewer.n_layers = 0;
  std::vector<int64_t> blocks;
  int64_t below = model::count_parameters(fewer).total;
  for (int64_t layer = 1; layer <= o.n_layers; ++layer) {
    fewer.n_layers = layer;
    const int64_t total = model::count_parameters(fewer).total;
    blocks.push_back(total - below);
    below = total;
  }
  return blocks;
}

}  // namespace

std::vector<int64_t> pipeline_boundaries(const model::TransformerOptions& o, const parallel::ParallelOptions& p) {
  auto main = o;
  main.mtp.depth = 0;
  const auto blocks = block_parameters(o);
  const auto all = model::count_parameters(o);
  const int64_t embedding = all.embedding;
  const int64_t head = o.vocab_size * o.d_model + o.d_model;  // the final norm and the head (a copy when tied)
  // interleaved_1f1b: P x V chunks, chunk c on rank c mod P.
  const int64_t chunks = p.pipeline_parallel * p.pp_chunks();
  if (chunks > p.pipeline_parallel) {
    BRIGADE_CHECK(chunks <= o.n_layers, "parallel.pipeline_parallel (", p.pipeline_parallel, ") x pp_virtual_stages (",
                  p.pp_chunks(), ") = ", chunks, " chunks is more than model.n_layers (", o.n_layers,
                  "): every chunk needs at least one block");
    BRIGADE_CHECK(p.pp_layers.empty() || static_cast<int64_t>(p.pp_layers.size()) == chunks, "parallel.pp_layers lists ",
                  p.pp_layers.size(), " entries; with ", parallel::to_string(p.pp_schedule),
                  " it lists the blocks of each of the ", chunks, " chunks (pipeline_parallel x ", p.pp_chunks(),
                  "), in model order");
  }
  return parallel::stage_boundaries(blocks, embedding, head + (all.total - model::count_parameters(main).total),
                                    static_cast<int>(chunks), p.pp_layers);
}

GpuSpec gpu_spec(const std::string& name) {
  // Memory as the driver reports it (nvidia-smi's total), dense peaks from NVIDIA's
  // datasheets (SXM parts, without sparsity).
  if (name == "h100") return {"h100", 81559.0 * 1024 * 1024, 989.4e12, 1978.9e12};
  if (name == "h800") return {"h800", 81559.0 * 1024 * 1024, 989.4e12, 1978.9e12};
  if (name == "h200") return {"h200", 143771.0 * 1024 * 1024, 989.4e12, 1978.9e12};
  BRIGADE_FAIL("--gpu '", name, "' is not one brigade knows (h100, h200, h800)");
}

void PlanOptions::validate() const {
  BRIGADE_CHECK(gpus >= 1, "--gpus must be at least 1, got ", gpus);
  BRIGADE_CHECK(tokens >= 0, "--tokens must be >= 0, got ", tokens);
  BRIGADE_CHECK(mfu > 0 && mfu <= 1, "--mfu must be in (0, 1], got ", mfu);
  gpu_spec(gpu);
}

double TrainingPlan::memory_total() const {
  double total = 0;
  for (const auto& item : memory) total += item.bytes;
  return total;
}

TrainingPlan plan_training(const PlanInputs& in, const PlanOptions& options) {
  options.validate();
  const auto& o = in.model;
  const int64_t ep = in.parallel.expert_parallel;
  BRIGADE_CHECK(options.gpus % ep == 0, "parallel.expert_parallel (", ep, ") must divide --gpus (", options.gpus, ")");
  BRIGADE_CHECK(!o.moe.enabled() || o.moe.num_experts % ep == 0, "parallel.expert_parallel (", ep,
                ") must divide model.moe.num_experts (", o.moe.num_experts, ")");
  BRIGADE_CHECK(in.seq_len > 0, "data.seq_len must be positive, got ", in.seq_len);
  const int64_t pp = in.parallel.pipeline_parallel;
  BRIGADE_CHECK(options.gpus % pp == 0, "parallel.pipeline_parallel (", pp, ") must divide --gpus (", options.gpus, ")");
  BRIGADE_CHECK(pp <= o.n_layers, "parallel.pipeline_parallel (", pp, ") is more than model.n_layers (", o.n_layers, ")");
  if (pp > 1) parallel::check_pipeline_micro_batches(in.parallel.pp_schedule, pp, in.trainer.grad_accum_steps);
  TrainingPlan p;
  p.gpu = gpu_spec(options.gpu);
  p.params = model::count_parameters(o);
  auto main = o;
  main.mtp.depth = 0;
  p.main_params = model::count_parameters(main);
  const double s = static_cast<double>(in.seq_len);
  const int64_t qk = o.is_mla() ? o.mla.qk_head_dim() : o.head_size();
  const int64_t v = o.is_mla() ? o.mla.v_head_dim : o.head_size();
  const double blocks = static_cast<double>(o.n_layers + o.mtp.depth);
  p.flops_per_token = 6.0 * static_cast<double>(p.params.matmul) +
                      6.0 * blocks * s * static_cast<double>(o.n_heads) * static_cast<double>(qk + v);

  const double routed = static_cast<double>(p.params.routed), dense = static_cast<double>(p.params.total) - routed;
  p.params_per_gpu = dense + routed / static_cast<double>(ep);
  const double state_bytes = in.precision.optimizer_state_dtype == precision::ComputeDtype::kBFloat16 ? 2.0 : 4.0;
  const int64_t stage = in.parallel.zero_stage;
  const bool zero = stage >= 1;
  const double dense_shards = zero ? static_cast<double>(options.gpus) : 1.0;
  // ZeRO shards the dense parameters' state (and gradients) only: each
  // expert-parallel rank keeps its own experts' whole, as the trainer does.
  double per_rank_shard = dense / dense_shards + routed / static_cast<double>(ep);
  double experts_held = routed / static_cast<double>(ep);  // whole on their EP rank at every ZeRO stage
  double zero_shards = dense_shards;                        // the data-parallel group ZeRO shards over
  // ZeRO-3 shards every dense parameter: the blocks, the embedding table, the head
  // and the rest (final norm, MTP projections), each a unit gathered where it runs.
  const double d_model = static_cast<double>(o.d_model);
  const double root = static_cast<double>(p.params.embedding) +
                      (o.tie_embeddings ? 0.0 : static_cast<double>(o.vocab_size) * d_model) + d_model +
                      static_cast<double>(o.mtp.depth) * (2 * d_model * d_model + 3 * d_model);
  const auto block = block_parameters(o);
  double largest_block = (p.params_per_gpu - root) / blocks;
  if (o.n_layers >= 2) largest_block = static_cast<double>(*std::max_element(block.begin(), block.end()));
  if (pp > 1) {
    // The fullest stage: its chunks' blocks (with expert parallelism, 1/EP of each
    // MoE block's routed experts), the embedding on the rank of the first chunk, and
    // the norm, head (a copy of tied embeddings unless it is that same rank) and MTP
    // modules on the rank of the last.
    const auto schedule = in.parallel.pp_schedule;
    const int chunks = static_cast<int>(pp) * in.parallel.pp_chunks();
    int64_t moe_blocks = 0;
    for (int64_t b = 0; b < o.n_layers + o.mtp.depth; ++b) moe_blocks += o.is_moe_layer(b) ? 1 : 0;
    const double routed_kept = moe_blocks > 0 ? routed / static_cast<double>(moe_blocks) / static_cast<double>(ep) : 0;
    const double routed_block = moe_blocks > 0 ? routed / static_cast<double>(moe_blocks) : 0;
    const auto bounds = pipeline_boundaries(o, in.parallel);
    std::vector<double> held(static_cast<size_t>(pp), 0.0), experts(static_cast<size_t>(pp), 0.0);
    for (int c = 0; c < chunks; ++c) {
      const auto r = static_cast<size_t>(parallel::pipeline_chunk_rank(schedule, static_cast<int>(pp), c));
      for (int64_t i = bounds[static_cast<size_t>(c)]; i < bounds[static_cast<size_t>(c) + 1]; ++i) {
        held[r] += static_cast<double>(block[static_cast<size_t>(i)]) - (o.is_moe_layer(i) ? routed_block - routed_kept : 0.0);
        experts[r] += o.is_moe_layer(i) ? routed_kept : 0.0;
      }
    }
    const auto first = static_cast<size_t>(parallel::pipeline_chunk_rank(schedule, static_cast<int>(pp), 0));
    const auto last = static_cast<size_t>(parallel::pipeline_chunk_rank(schedule, static_cast<int>(pp), chunks - 1));
    held[first] += static_cast<double>(p.params.embedding);
    const bool copy = !o.tie_embeddings || first != last;
    double mtp_blocks_routed = 0;
    for (int64_t j = 0; j < o.mtp.depth; ++j) mtp_blocks_routed += o.is_moe_layer(o.n_layers + j) ? routed_block - routed_kept : 0.0;
    held[last] += (copy ? static_cast<double>(o.vocab_size) * d_model : 0.0) + d_model +
                  static_cast<double>(p.params.total - p.main_params.total) - mtp_blocks_routed;  // and the MTP modules
    for (int64_t j = 0; j < o.mtp.depth; ++j) experts[last] += o.is_moe_layer(o.n_layers + j) ? routed_kept : 0.0;
    const auto fullest = static_cast<size_t>(std::max_element(held.begin(), held.end()) - held.begin());
    p.params_per_gpu = std::min(p.params_per_gpu, held[fullest]);
    // That stage's optimizer state: its dense parameters sharded over its
    // data-parallel group (ZeRO), its experts whole.
    const double stage_dense = held[fullest] - experts[fullest];
    per_rank_shard = stage_dense / (zero ? static_cast<double>(options.gpus / pp) : 1.0) + experts[fullest];
    experts_held = experts[fullest];
    zero_shards = zero ? static_cast<double>(options.gpus / pp) : 1.0;
  }
  // ZeRO-3 units whole at once: two blocks (one running, one prefetched), or the
  // table (the head's weights) with the rest while the head runs.
  const double table = static_cast<double>(o.vocab_size) * d_model;
  // Two buckets in flight at stages 2 and 3; at 3 the buckets are the units, and
  // the table's (the embedding's, backward's last) meets one block's at most.
  const double bucket = stage == 3 ? 4 * std::max(largest_block, (table + largest_block) / 2)
                                   : std::min(4 * p.params_per_gpu, static_cast<double>(in.parallel.bucket_bytes()));
  if (stage == 3) {
    const double rest = d_model + static_cast<double>(o.mtp.depth) * (2 * d_model * d_model + 3 * d_model);
    const double whole = std::max(2 * largest_block, table + rest);
    p.memory.push_back({"weights (FP32; ZeRO-3: sharded, 2 blocks whole)",
                        4 * (experts_held + (p.params_per_gpu - experts_held) / zero_shards + whole)});
  } else {
    p.memory.push_back({"weights (FP32 master)", 4 * p.params_per_gpu});
  }
  // Measured with bench/zero_stages.py (small-dense, 2 and 4 ranks): at stages 2 and
  // 3 two buckets are in flight beside the shards; at stages 0 and 1 the reducer
  // keeps a flat FP32 copy of every gradient for its all-reduce (reduce-scatter).
  const bool reduced = options.gpus / pp > 1;
  if (stage >= 2) {
    p.memory.push_back({"gradients (FP32; ZeRO-2: shards + 2 buckets)", 4 * per_rank_shard + 2 * bucket});
  } else {
    p.memory.push_back({"gradients (FP32)", 4 * p.params_per_gpu});
    if (reduced) p.memory.push_back({"gradient buckets (FP32, the reducer's flat copy)", 4 * p.params_per_gpu});
  }
  p.memory.push_back({std::string("AdamW moments (") + (state_bytes == 2 ? "bf16" : "fp32") +
                          (zero ? ", ZeRO-" + std::to_string(stage) + ")" : ")"),
                      2 * state_bytes * per_rank_shard});

  const double c = in.precision.compute_dtype == precision::ComputeDtype::kBFloat16 ? 2.0 : 4.0;
  const double tokens = s * static_cast<double>(in.trainer.micro_batch_size);
  const double d = static_cast<double>(o.d_model), vocab = static_cast<double>(o.vocab_size);
  double kept = 0, largest = 0;
  for (int64_t layer = 0; layer < o.n_layers + o.mtp.depth; ++layer) {
    const double block = block_activation_bytes(o, layer, c);
    largest = std::max(largest, block);
    kept += in.trainer.activation_checkpointing == Checkpointing::kFull ? d * 4 : block;
  }
  if (in.trainer.activation_checkpointing == Checkpointing::kFull) kept += largest;
  kept += static_cast<double>(o.mtp.depth) * 2 * d * c;          // MTP: the concatenated inputs of eh_proj
  kept += static_cast<double>(1 + o.mtp.depth) * vocab * 8;      // logits and their gradient, FP32, per head
  if (pp > 1) {
    // Stage 0 holds the most: its share of the blocks, for every micro batch in
    // flight (interleaved_1f1b: chunk activations, each an average chunk of stage 0's).
    const auto bounds = pipeline_boundaries(o, in.parallel);
    const int64_t micro = in.trainer.grad_accum_steps;
    const int64_t chunks = in.parallel.pp_chunks();
    int64_t blocks = 0;
    for (int64_t v = 0; v < chunks; ++v) {
      const auto c = static_cast<size_t>(parallel::pipeline_model_chunk(in.parallel.pp_schedule, static_cast<int>(pp), 0,
                                                                        static_cast<int>(v)));
      blocks += bounds[c + 1] - bounds[c];
    }
    // What stage 0's own schedule holds at most (the schedule the trainer runs).
    const int64_t in_flight = parallel::max_in_flight(
        parallel::pipeline_schedule(in.parallel.pp_schedule, static_cast<int>(pp), 0, micro, static_cast<int>(chunks)));
    const double share = static_cast<double>(blocks) / static_cast<double>(chunks * o.n_layers);
    p.memory.push_back({"activations (" + std::to_string(in_flight) + (chunks > 1 ? " chunks" : " micro batches") +
                            " in flight, stage 0)",
                        kept * tokens * share * static_cast<double>(in_flight)});
  } else {
    p.memory.push_back({"activations (one micro batch)", kept * tokens});
  }
  if (ep > 1 && o.moe.enabled()) {
    const double element = in.parallel.ep_fp8_dispatch ? 1.0 + 4.0 / 128.0 : c;
    p.memory.push_back({"MoE all-to-all buffers", 4 * tokens * static_cast<double>(o.moe.top_k) * d * element});
  }

  p.global_batch_tokens = tokens * static_cast<double>(in.trainer.grad_accum_steps * options.gpus);
  p.tokens = options.tokens > 0 ? options.tokens : p.global_batch_tokens * static_cast<double>(in.trainer.max_steps);
  p.gpu_hours = p.tokens * p.flops_per_token / (p.gpu.bf16_flops * options.mfu) / 3600.0;
  p.wall_hours = p.gpu_hours / static_cast<double>(options.gpus);
  return p;
}

std::string format_plan(const TrainingPlan& p, const PlanInputs& in, const PlanOptions& options) {
  const auto& o = in.model;
  std::ostringstream out;
  out << "GPUs              " << options.gpus << " x " << p.gpu.name << " (" << gib(p.gpu.memory_bytes) << ", "
      << fixed(p.gpu.bf16_flops / 1e12, 0) << " TFLOP/s BF16 dense)\n";
  const auto& mp = p.main_params;
  out << "parameters        " << count_text(static_cast<double>(mp.total)) << " total, "
      << count_text(static_cast<double>(mp.activated - mp.embedding)) << " activated per token ("
      << count_text(static_cast<double>(mp.activated)) << " with the input embedding)\n";
  if (o.mtp.depth > 0) {
    out << "  with MTP        " << count_text(static_cast<double>(p.params.total)) << " total, "
        << count_text(static_cast<double>(p.params.activated - p.params.embedding)) << " activated (" << o.mtp.depth
        << (o.mtp.depth == 1 ? " module" : " modules") << ", training only)\n";
  }
  char flops[64];
  std::snprintf(flops, sizeof flops, "%.3g", p.flops_per_token);
  out << "training FLOPs    " << flops << " per token (forward + backward, " << in.seq_len << "-token sequences)\n";
  out << "layout            data parallel " << options.gpus / in.parallel.pipeline_parallel << ", pipeline "
      << in.parallel.pipeline_parallel << " (" << parallel::to_string(in.parallel.pp_schedule) << "), expert parallel " << in.parallel.expert_parallel
      << ", ZeRO-" << in.parallel.zero_stage << "; micro batch " << in.trainer.micro_batch_size
      << " x " << in.seq_len << " tokens, activation checkpointing " << to_string(in.trainer.activation_checkpointing)
      << ", compute " << precision::to_string(in.precision.compute_dtype)
      << (in.precision.fp8.enabled() ? " with FP8 GEMMs" : "") << "\n";
  out << "memory per GPU    (" << count_text(p.params_per_gpu) << " parameters held)\n";
  for (const auto& item : p.memory) {
    std::string what = item.what;
    what.resize(std::max<size_t>(what.size() + 1, 34), ' ');
    out << "  " << what << gib(item.bytes) << "\n";
  }
  std::string total = "total";
  total.resize(34, ' ');
  out << "  " << total << gib(p.memory_total()) << " of " << gib(p.gpu.memory_bytes) << ": "
      << (p.fits() ? "fits" : "does not fit") << "\n";
  out << "tokens            " << count_text(p.tokens) << " (global batch " << count_text(p.global_batch_tokens)
      << " tokens per step)\n";
  out << "GPU-hours         " << count_text(p.gpu_hours) << " at " << fixed(100 * options.mfu, 0) << "% MFU ("
      << fixed(p.wall_hours / 24.0, 1) << " days on " << options.gpus << " GPUs)\n";
  return out.str();
}

}  // namespace brigade::trainer
