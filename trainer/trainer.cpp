#include "trainer/trainer.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <optional>
#include <sstream>

#include <malloc.h>
#include <sys/resource.h>

#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/accumulate.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "core/error.h"
#include "core/fs.h"
#include "core/log.h"
#include "core/progress.h"
#include "parallel/ordered_sum.h"
#include "precision/linear.h"
#include "precision/quantize.h"
#include "trainer/cross_entropy.h"
#include "trainer/plan.h"

namespace brigade::trainer {
namespace {

// ZeRO-3 around the model's units (model::BlockHooks): a block's parameters are
// gathered before its forward (the next block's gather started first, so it
// overlaps this one), freed after it, and gathered again when backward reaches the
// block's output (the block before it prefetched); the reducer frees them once their
// gradients are sent. The outer units (embedding, head, the rest) are gathered the
// same way where the model uses them, without prefetching.
class ZeroThreeHooks final : public model::BlockHooks {
 public:
  // `state` maps BlockHooks numbers to units (a pipeline stage has units for its own
  // parameters only; with chunks, each chunk's units are its own reduce group's).
  // `main_blocks`, `blocks`: the main model's blocks, and with the MTP modules'.
  ZeroThreeHooks(const parallel::ParallelState& state, int64_t main_blocks, int64_t blocks)
      : state_(state), main_blocks_(main_blocks), blocks_(blocks) {}
  void before(int64_t unit) override {
    const auto at = state_.unit_of_block(unit);
    if (!at.units) return;
    at.units->prefetch(at.unit);
    // MTP modules run after the head, if at all.
    if (unit + 1 < blocks_ && unit + 1 != main_blocks_) prefetch(unit + 1);
    at.units->gather(at.unit);
  }
  torch::Tensor after(int64_t unit, torch::Tensor output) override {
    const auto at = state_.unit_of_block(unit);
    if (!at.units) return output;
    at.units->release(at.unit);
    if (torch::GradMode::is_enabled() && output.requires_grad()) {
      const auto before = unit < blocks_ ? state_.unit_of_block(unit - 1) : parallel::ParallelState::BlockUnit{};
      output.register_hook([at, before](const torch::Tensor& grad) {
        at.units->prefetch(at.unit);
        if (before.units) before.units->prefetch(before.unit);
        at.units->gather(at.unit);
        return grad;
      });
    }
    return output;
  }
  void done(int64_t unit) override {
    if (const auto at = state_.unit_of_block(unit); at.units) at.units->release(at.unit);
  }
  torch::Tensor release_in_backward(int64_t unit, torch::Tensor input) override {
    const auto at = state_.unit_of_block(unit);
    if (!at.units || !torch::GradMode::is_enabled() || !input.requires_grad()) return input;
    input.register_hook([at](const torch::Tensor& grad) {
      at.units->release(at.unit);
      return grad;
    });
    return input;
  }

 private:
  void prefetch(int64_t unit) const {
    if (const auto at = state_.unit_of_block(unit); at.units) at.units->prefetch(at.unit);
  }
  const parallel::ParallelState& state_;
  int64_t main_blocks_, blocks_;
};

// ZeRO-3's units of `names` by BlockHooks number, and the order backward completes
// them: the MTP modules' blocks (last first), the head, the rest (the norms and MTP
// projections, done once MTP module 1's projection is), the main blocks (last
// first), the embedding (its lookup is the first forward, the last backward).
parallel::UnitLayout unit_layout(const std::vector<std::string>& names, const model::TransformerOptions& o) {
  using model::OuterUnit;
  parallel::UnitLayout layout;
  layout.members.resize(static_cast<size_t>(model::hook_unit(o, OuterUnit::kRest) + 1));
  for (size_t i = 0; i < names.size(); ++i) {
    const int64_t unit = model::hook_unit_of(o, names[i]);
    if (unit >= 0) layout.members[static_cast<size_t>(unit)].push_back(i);
  }
  auto& order = layout.backward_order;
  for (int64_t k = o.mtp.depth - 1; k >= 0; --k) order.push_back(static_cast<size_t>(o.n_layers + k));
  order.push_back(static_cast<size_t>(model::hook_unit(o, OuterUnit::kHead)));
  order.push_back(static_cast<size_t>(model::hook_unit(o, OuterUnit::kRest)));
  for (int64_t j = o.n_layers - 1; j >= 0; --j) order.push_back(static_cast<size_t>(j));
  order.push_back(static_cast<size_t>(model::hook_unit(o, OuterUnit::kEmbedding)));
  return layout;
}

model::NamedTensors trainable_parameters(torch::nn::Module& module) {
  model::NamedTensors out;
  for (const auto& item : module.named_parameters()) out.emplace_back(item.key(), item.value());
  return out;
}

// "model.d_model: checkpoint 128, recipe 256" for the first differing line of two
// "key: value" listings.
std::string first_difference(const std::string& checkpoint, const std::string& recipe) {
  std::istringstream a(checkpoint), b(recipe);
  std::string la, lb;
  while (true) {
    const bool ga = static_cast<bool>(std::getline(a, la));
    const bool gb = static_cast<bool>(std::getline(b, lb));
    if (!ga && !gb) return "(no difference found)";
    if (la != lb || ga != gb) {
      const auto colon = la.find(": ");
      if (colon == std::string::npos || lb.rfind(la.substr(0, colon + 2), 0) != 0)
        return "checkpoint has '" + la + "', recipe has '" + lb + "'";
      return la.substr(0, colon) + ": checkpoint " + la.substr(colon + 2) + ", recipe " + lb.substr(colon + 2);
    }
  }
}

// Pinned host memory, so the copy to the GPU can run without blocking the host.
void pin(data::Batch& b) {
  for (auto* t : {&b.inputs, &b.targets, &b.segments}) {
    if (t->defined()) *t = t->pin_memory();
  }
}

// The batch's model inputs on `device`. Row offsets stay on the host: they index
// host-side data (the teacher's top-k for logit distillation).
data::Batch on_device(data::Batch b, c10::Device device) {
  if (device.is_cpu()) return b;
  for (auto* t : {&b.inputs, &b.targets, &b.segments}) {
    if (t->defined()) *t = t->to(device, /*non_blocking=*/t->is_pinned());
  }
  return b;
}

}  // namespace

// A pipeline stage: its groups, its blocks, and which stage owns each tensor.
struct Trainer::Pipeline {
  std::unique_ptr<parallel::Communicator> stages;  // this pipeline's ranks; rank = stage
  std::unique_ptr<parallel::Communicator> data;    // this stage's rank in every pipeline
  parallel::PipelineSchedule schedule = parallel::PipelineSchedule::k1F1B;
  int stage = 0, count = 1;
  int index = 0;   // which pipeline (data-parallel rank)
  int chunks = 1;  // model chunks per rank (interleaved_1f1b: V; dualpipev: 2; else 1)
  // Every chunk's blocks: chunk c runs [bounds[c], bounds[c + 1]) on rank_of(c).
  std::vector<int64_t> bounds;
  // The attached parameters (params_ indices) of each of this rank's chunks.
  std::vector<std::vector<size_t>> chunk_params;
  // Tied embeddings or MTP modules: stage 0 trains the embedding table; the stage
  // with the head uses a copy (as its head, and for the MTP modules' token
  // embeddings). With dualpipev the head is on stage 0 itself: no copy, and the
  // head's part of each micro-batch's gradient waits in head_grads for the
  // embedding's backward of that micro-batch.
  bool shared_embedding = false;
  bool local_head = false;
  std::map<int64_t, torch::Tensor> head_grads;
  std::map<std::string, std::vector<int64_t>> shapes;  // every state_dict tensor's whole shape
  int64_t micro = 0;  // the micro-batch being backpropagated (for the tied head's gradient)
  // DualPipe-V's split backwards: the model's Linears leave their weight gradients in
  // `weight_grads` during a split backward; the W steps make them, oldest first.
  std::shared_ptr<precision::WeightGradQueue> weight_grads;
  std::map<const c10::TensorImpl*, size_t> param_index;  // a trained tensor -> its params_ index

  bool first_stage() const { return stage == 0; }
  // Whether this rank runs the final norm and the head (the model's last chunk).
  bool last_stage() const { return last_stage_is(stage); }
  bool last_stage_is(int s) const { return rank_of(total_chunks() - 1) == s; }
  // The model chunk of this rank's chunk v, the rank holding model chunk c, and the blocks of chunk v.
  int model_chunk(int v) const { return parallel::pipeline_model_chunk(schedule, count, stage, v); }
  int rank_of(int c) const { return parallel::pipeline_chunk_rank(schedule, count, c); }
  int64_t first(int v) const { return bounds[static_cast<size_t>(model_chunk(v))]; }
  int64_t last(int v) const { return bounds[static_cast<size_t>(model_chunk(v)) + 1]; }
  int total_chunks() const { return count * chunks; }
  // The model chunk holding `name`: a block's, the embedding's (0), or the head's (the last).
  int chunk_of(const std::string& name) const {
    if (name.starts_with("layers.")) {
      const int64_t layer = std::stoll(name.substr(7, name.find('.', 7) - 7));
      for (int c = 0; c < total_chunks(); ++c) {
        if (layer < bounds[static_cast<size_t>(c) + 1]) return c;
      }
    }
    if (name.starts_with("norm.") || name.starts_with("lm_head.") || name.starts_with("mtp.")) return total_chunks() - 1;
    return 0;
  }
  // The stage whose parameters and buffers hold `name`, and which of its chunks.
  int owner(const std::string& name) const { return rank_of(chunk_of(name)); }
  int local_chunk(const std::string& name) const { return local_chunk_on(name, stage); }
  // Which of rank s's chunks holds `name` (-1: none of them).
  int local_chunk_on(const std::string& name, int s) const {
    const int c = chunk_of(name);
    for (int v = 0; v < chunks; ++v) {
      if (parallel::pipeline_model_chunk(schedule, count, s, v) == c) return v;
    }
    return -1;
  }
  // What this rank keeps allocated: its own tensors, and the last stage's head copy.
  bool keeps(const std::string& name) const {
    return owner(name) == stage || (shared_embedding && last_stage() && name == "embed_tokens.weight");
  }
};

// A stage's input from the previous stage: [rows, seq, d_model] float32, like `batch`'s tokens.
static torch::Tensor hidden_like(const data::Batch& batch, int64_t d_model, c10::Device device) {
  return torch::empty({batch.inputs.size(0), batch.inputs.size(1), d_model},
                      torch::TensorOptions().dtype(torch::kFloat).device(device));
}

// A pipeline stage's FP8 state in a checkpoint's staging directory, until rank 0 merges it.
static std::string fp8_stage_file(int stage) { return "fp8_stage_" + std::to_string(stage) + ".safetensors"; }

// Point-to-point tags between stages: kind 0 activations, 1 their gradients, 2 the
// tied head's gradient (all per micro-batch), 3 everything else.
static int pipeline_tag(int64_t micro, int kind) { return static_cast<int>(micro * 4 + kind); }

std::vector<bool> weight_decay_mask(const model::NamedTensors& params, const TrainerOptions& options) {
  std::vector<bool> decay;
  for (const auto& [name, p] : params) {
    const bool embedding = name.find("embed_tokens") != std::string::npos;
    if (embedding) decay.push_back(options.decay_embeddings);
    else if (p.dim() < 2) decay.push_back(options.decay_norms_and_biases);
    else decay.push_back(true);
  }
  return decay;
}

Trainer::Trainer(TrainerOptions options, precision::PrecisionOptions precision, model::Transformer model,
                 data::BatchSampler train_data, data::BatchSampler eval_data, RunContext context)
    : options_(options),
      precision_(precision),
      model_(std::move(model)),
      train_data_(std::move(train_data)),
      eval_data_(std::move(eval_data)),
      context_(std::move(context)),
      schedule_{options.lr, options.min_lr, options.warmup_steps, options.max_steps},
      checkpoints_(context_.run_dir / "checkpoints", options.keep_checkpoints) {
  if (!context_.device.is_cuda()) {
    const struct mallinfo2 info = mallinfo2();
    int64_t model_bytes = 0;
    for (const auto& t : model_->parameters()) model_bytes += t.nbytes();
    for (const auto& t : model_->buffers()) model_bytes += t.nbytes();
    baseline_live_bytes_ = static_cast<int64_t>(info.uordblks + info.hblkhd) - model_bytes;
  }
  options_.validate();
  const auto& routing = model_->options().moe;
  BRIGADE_CHECK(options_.activation_checkpointing != Checkpointing::kFull ||
                    (routing.seq_aux_loss == 0 && routing.batch_aux_loss == 0 && routing.z_loss == 0),
                "trainer.activation_checkpointing=full does not yet carry the MoE aux losses' gradients "
                "(model.moe.seq_aux_loss, batch_aux_loss, z_loss); set them to 0 or use selective");
  BRIGADE_CHECK(options_.activation_checkpointing != Checkpointing::kFull || context_.expert_parallel <= 1,
                "trainer.activation_checkpointing=full is not supported with parallel.expert_parallel > 1 yet; "
                "use selective");
  parallel::Communicator* data_parallel = context_.data_parallel;
  if (context_.pipeline_parallel > 1) {
    const int64_t stages = context_.pipeline_parallel, layers = model_->options().n_layers;
    const auto& m = model_->options();
    BRIGADE_CHECK(world_size() % stages == 0, "parallel.pipeline_parallel (", stages,
                  ") must divide the number of ranks (", world_size(), ")");
    BRIGADE_CHECK(stages <= layers, "parallel.pipeline_parallel (", stages, ") is more than model.n_layers (", layers,
                  "): every stage needs at least one block");
    parallel::check_pipeline_micro_batches(context_.pp_schedule, stages, options_.grad_accum_steps);
    pipeline_ = std::make_unique<Pipeline>();
    auto& pl = *pipeline_;
    auto& world = *context_.data_parallel;
    pl.count = static_cast<int>(stages);
    pl.stage = world.rank() % pl.count;
    pl.index = world.rank() / pl.count;
    pl.stages = world.split(pl.index, pl.stage, "pp");
    pl.data = world.split(pl.stage, pl.index, "dp");
    pl.schedule = context_.pp_schedule;
    parallel::ParallelOptions split;
    split.pipeline_parallel = stages;
    split.pp_layers = context_.pp_layers;
    split.pp_schedule = context_.pp_schedule;
    split.pp_virtual_stages = context_.pp_virtual_stages;
    split.validate();
    pl.chunks = split.pp_chunks();
    pl.bounds = pipeline_boundaries(m, split);
    if (world.rank() == 0) {
      std::ostringstream blocks;
      for (int c = 0; c < pl.total_chunks(); ++c) blocks << (c ? "," : "") << pl.bounds[static_cast<size_t>(c) + 1] - pl.bounds[static_cast<size_t>(c)];
      log_info("pipeline: ", stages, " stages", pl.chunks > 1 ? " x " + std::to_string(pl.chunks) + " chunks" : "", " of ",
               blocks.str(), " blocks (", context_.pp_layers.empty() ? "balanced by parameters" : "parallel.pp_layers",
               ", ", parallel::to_string(pl.schedule), ")");
    }
    // DualPipe-V's W steps at ZeRO 0 and 1 (at 2 and 3 each backward reduces its
    // gradients as it completes them).
    if (pl.schedule == parallel::PipelineSchedule::kDualPipeV && context_.pp_zero_bubble && context_.zero_stage <= 1) {
      pl.weight_grads = std::make_shared<precision::WeightGradQueue>();
    }
    pl.shared_embedding = (m.tie_embeddings || m.mtp.depth > 0) && !pl.last_stage_is(0);
    pl.local_head = (m.tie_embeddings || m.mtp.depth > 0) && pl.last_stage_is(0);
    data_parallel = pl.data.get();
  }
  parallel_ = std::make_unique<parallel::ParallelState>(
      parallel::ParallelStateOptions{.data_parallel = data_parallel,
                                     .device = context_.device,
                                     .bucket_bytes = context_.bucket_bytes,
                                     .zero_stage = context_.zero_stage,
                                     .expert_parallel = context_.expert_parallel,
                                     .num_experts = routing.enabled() ? routing.num_experts : 0});
  // Everything the trainer owns follows the model: parameters, buffers (RoPE tables,
  // expert biases), then gradients, reducer buckets and optimizer state made from them.
  model_->to(context_.device);
  model_->set_checkpointing(options_.activation_checkpointing);
  state_.model_fingerprint = context_.model_fingerprint;
  state_.recipe_hash = context_.recipe_hash;
  {
    // Every rank starts from rank 0's weights (and expert biases), whatever its own init.
    std::vector<torch::Tensor> state;
    for (auto& [name, t] : model_->state_dict()) state.push_back(t);
    if (!pipeline_) {
      parallel_->broadcast_from_main(state);
    } else {
      torch::NoGradGuard no_grad;
      for (auto& t : state) context_.data_parallel->broadcast(t, 0).wait();
    }
  }
  if (auto* ep = parallel_->expert_group()) model_->set_expert_parallel(ep, context_.ep_fp8_dispatch);
  params_ = trainable_parameters(*model_);
  if (pipeline_) {
    // A stage trains its own parameters and frees the others' (the last stage keeps
    // its copy of the embedding table for a tied head and the MTP modules; stage 0
    // adds the copy's gradient in).
    auto& pl = *pipeline_;
    torch::NoGradGuard no_grad;
    const auto sliced = model_->expert_parallel_parameters();  // whole in checkpoints: dim 0 over the EP group
    const int64_t ep = parallel_->expert_group() ? parallel_->expert_group()->size() : 1;
    for (auto& [name, t] : model_->state_dict()) {
      pl.shapes[name] = t.sizes().vec();
      if (std::find(sliced.begin(), sliced.end(), name) != sliced.end()) pl.shapes[name][0] *= ep;
      if (!pl.keeps(name)) t.set_data(torch::empty({0}, t.options()));
    }
    model::NamedTensors own;
    pl.chunk_params.assign(static_cast<size_t>(pl.chunks), {});
    for (auto& [name, p] : params_) {
      if (pl.owner(name) != pl.stage) continue;
      pl.chunk_params[static_cast<size_t>(pl.local_chunk(name))].push_back(own.size());
      own.emplace_back(name, p);
    }
    params_ = std::move(own);
    if (pl.weight_grads) {
      model_->set_weight_grad_queue(pl.weight_grads);
      for (size_t i = 0; i < params_.size(); ++i) pl.param_index[params_[i].second.unsafeGetTensorImpl()] = i;
    }
    if (pl.shared_embedding && pl.first_stage()) {
      auto* stage = pipeline_.get();
      model_->embed_tokens->weight.register_hook([stage](const torch::Tensor& grad) {
        // The last stage's gradient of its copy (tied head, MTP embeddings) for the same
        // micro-batch: the sum one process's autograd makes (addition commutes exactly).
        auto head = torch::empty_like(grad);
        stage->stages->recv(head, stage->count - 1, pipeline_tag(stage->micro, 2)).wait();
        return grad + head;
      });
    }
    if (pl.local_head && pl.first_stage()) {
      auto* stage = pipeline_.get();
      model_->embed_tokens->weight.register_hook([stage](const torch::Tensor& grad) {
        // The head's part, set aside when the last chunk's backward of this micro-batch ran here.
        auto it = stage->head_grads.find(stage->micro);
        if (it == stage->head_grads.end()) return grad;
        auto head = std::move(it->second);
        stage->head_grads.erase(it);
        return head.defined() ? grad + head : grad;
      });
    }
  }
  std::vector<std::string> names;
  for (const auto& [name, p] : params_) names.push_back(name);
  parallel_->attach(params_, model_->expert_parallel_parameters(), unit_layout(names, model_->options()),
                    pipeline_ && pipeline_->chunks > 1 ? pipeline_->chunk_params : std::vector<std::vector<size_t>>{});
  if (parallel_->sharded_parameters()) {
    const auto& o = model_->options();
    model_->set_block_hooks(std::make_shared<ZeroThreeHooks>(*parallel_, o.n_layers, o.n_layers + o.mtp.depth));
  }

  const auto decay = weight_decay_mask(params_, options_);
  const AdamWOptions adamw{options_.beta1, options_.beta2, options_.eps, options_.weight_decay,
                           precision::to_scalar_type(precision_.optimizer_state_dtype)};
  auto pieces = parallel_->optimizer_pieces();
  std::vector<bool> piece_decay;
  for (size_t i : pieces.param) piece_decay.push_back(decay[i]);
  optimizer_ = std::make_unique<AdamW>(std::move(pieces.pieces), std::move(piece_decay), adamw, std::move(pieces.begins));
}

Trainer::~Trainer() = default;

OptimizerShards Trainer::optimizer_layout() const {
  OptimizerShards layout;
  if (pipeline_) {
    // One file per stage, each with its parameters whole; with ZeRO one per rank,
    // each with its shards of its stage's buckets (and, with expert parallelism, the
    // first EP group's expert slices: pipeline i < EP holds slice i, as without
    // pipelines).
    for (const auto& item : model_->named_parameters()) layout.shapes[item.key()] = pipeline_->shapes.at(item.key());
    if (sharded()) {
      const int pipelines = dp_size();
      const int ep = parallel_->expert_group() ? parallel_->expert_group()->size() : 1;
      std::vector<std::vector<std::string>> names(pipeline_->count), experts(pipeline_->count);
      std::vector<std::vector<int64_t>> numels(pipeline_->count);
      // Each stage's dense parameters by chunk, as its ParallelState groups them.
      std::vector<std::vector<std::vector<size_t>>> chunks(pipeline_->count);
      for (auto& stage_chunks : chunks) stage_chunks.resize(static_cast<size_t>(pipeline_->chunks));
      for (const auto& item : model_->named_parameters()) {
        const int s = pipeline_->owner(item.key());
        if (parallel_->is_expert_slice(item.key())) {
          experts[s].push_back(item.key());
          continue;
        }
        chunks[s][static_cast<size_t>(pipeline_->local_chunk_on(item.key(), s))].push_back(names[s].size());
        names[s].push_back(item.key());
        numels[s].push_back(c10::multiply_integers(pipeline_->shapes.at(item.key())));
      }
      std::vector<std::vector<parallel::ReduceGroup>> groups;
      for (int s = 0; s < pipeline_->count; ++s) {
        const auto& stage_chunks = pipeline_->chunks > 1 ? chunks[s] : std::vector<std::vector<size_t>>{};
        groups.push_back(parallel::reduce_groups(names[s].size(), stage_chunks, unit_layout(names[s], model_->options()),
                                                 context_.zero_stage));
      }
      for (int r = 0; r < world_size(); ++r) {
        const int s = r % pipeline_->count, i = r / pipeline_->count;
        OptimizerShard shard{optimizer_shard_file(r, world_size()), {}};
        for (const auto& group : groups[s]) {
          std::vector<int64_t> group_numels;
          for (size_t k : group.params) group_numels.push_back(numels[s][k]);
          const auto buckets = group.layout(group_numels, context_.bucket_bytes, pipelines);
          for (const auto& seg : parallel::shard_segments(buckets, group_numels, i)) {
            shard.ranges[names[s][group.params[seg.param]]] = {seg.begin, seg.begin + seg.length};
          }
        }
        for (const auto& name : experts[s]) {
          const int64_t slice = c10::multiply_integers(pipeline_->shapes.at(name)) / ep;
          if (i < ep) shard.ranges[name] = {i * slice, (i + 1) * slice};
        }
        layout.shards.push_back(std::move(shard));
      }
      return layout;
    }
    for (int s = 0; s < pipeline_->count; ++s) {
      OptimizerShard shard{optimizer_shard_file(s, pipeline_->count), {}};
      for (const auto& [name, shape] : layout.shapes) {
        if (pipeline_->owner(name) == s) shard.ranges[name] = {0, c10::multiply_integers(shape)};
      }
      layout.shards.push_back(std::move(shard));
    }
    return layout;
  }
  for (const auto& [name, p] : params_) layout.shapes[name] = parallel_->full_shape(name, p);
  const auto ranges = parallel_->shard_ranges();
  for (int r = 0; r < dp_size(); ++r) layout.shards.push_back({optimizer_shard_file(r, dp_size()), ranges[r]});
  return layout;
}

void Trainer::resume(const LoadedCheckpoint& ck) {
  const std::string source = "checkpoint " + ck.dir.string();
  BRIGADE_CHECK(ck.state.model_fingerprint == context_.model_fingerprint, source,
                " is from a different model shape: ",
                first_difference(ck.state.model_fingerprint, context_.model_fingerprint));
  // Checkpoints hold whole expert tensors: an expert-parallel rank loads them into
  // full-size scratch tensors and keeps its slice. ZeRO-3: loaded whole, then sharded.
  parallel_->gather_weights();
  auto weights = model_->state_dict();
  std::vector<std::pair<torch::Tensor, torch::Tensor>> slices;  // (this rank's slice, the whole tensor)
  for (auto& [name, t] : weights) {
    // Pipeline: the other stages' tensors are read into scratch and dropped.
    if (pipeline_ && !pipeline_->keeps(name)) {
      t = torch::empty(pipeline_->shapes.at(name), t.options());
      continue;
    }
    if (!parallel_->is_expert_slice(name)) continue;
    auto full = torch::empty(parallel_->full_shape(name, t), t.options());
    slices.emplace_back(t, full);
    t = full;
  }
  load_weights(weights, ck.model, source);
  {
    torch::NoGradGuard no_grad;
    for (auto& [slice, full] : slices) slice.copy_(parallel_->expert_slice(full));
  }
  parallel_->release_weights(/*changed=*/true);
  model_->load_fp8_state(ck.precision.tensors, source);
  std::map<std::string, std::vector<int64_t>> shapes;
  for (const auto& [name, p] : params_) shapes[name] = parallel_->full_shape(name, p);
  std::vector<std::vector<int64_t>> piece_shapes;
  for (const auto& [name, piece] : optimizer_->params()) piece_shapes.push_back(shapes.at(name));
  // Any layout: unsharded, or sharded over any number of ranks (resharded here).
  optimizer_->load_state(ck.optimizer, piece_shapes, source);
  auto rng = ck.rng.tensors.find("cpu");
  BRIGADE_CHECK(rng != ck.rng.tensors.end(), source, ": rng.safetensors has no 'cpu' state");
  at::Generator generator = at::detail::getDefaultCPUGenerator();  // a handle to the shared generator
  generator.set_state(rng->second);
  // The GPU's generator, when both runs had one (a CPU checkpoint resumed on a GPU
  // starts the GPU's stream from its seed).
  if (auto gpu = ck.rng.tensors.find("cuda"); gpu != ck.rng.tensors.end() && context_.device.is_cuda()) {
    at::Generator on_gpu = at::globalContext().defaultGenerator(context_.device);  // a handle, as above
    on_gpu.set_state(gpu->second);
  }
  state_.step = ck.state.step;
  state_.tokens_seen = ck.state.tokens_seen;
  state_.skipped_steps = ck.state.skipped_steps;
  if (ck.state.recipe_hash != context_.recipe_hash) {
    log_warn("resuming with a recipe that differs from the checkpoint's (model shape unchanged)");
  }
  log_info("resumed from ", ck.dir.string(), " at step ", state_.step);
}

MetricsLog& Trainer::metrics() {
  if (!metrics_) {
    std::filesystem::create_directories(context_.run_dir);
    // Lines after the resumed step describe steps about to be redone: drop them.
    metrics_ = std::make_unique<MetricsLog>(context_.run_dir / "metrics.jsonl", state_.step,
                                            options_.tensorboard ? context_.run_dir / "tensorboard" : std::filesystem::path());
  }
  return *metrics_;
}

bool Trainer::finished() const {
  const int64_t end = options_.stop_after > 0 ? options_.stop_after : options_.max_steps;
  return state_.step >= end;
}

void Trainer::run() {
  model_->train();
  for (auto& hook : hooks_) hook->on_start(*this);
  while (!finished()) {
    StepResult result = step();
    for (auto& hook : hooks_) hook->on_step(*this, result);
    if (result.stop_requested) {
      // Preemption: the checkpoint hook writes this step's state in on_end.
      stopped_by_request_ = true;
      log_info("stop requested: ending at step ", state_.step, " with a checkpoint");
      break;
    }
  }
  record_peak_memory();  // of training: before the final evaluation and checkpoint
  for (auto& hook : hooks_) hook->on_end(*this);
  parallel_->gather_weights();  // ZeRO-3: callers find the model whole
  if (pipeline_) gather_pipeline_weights();  // and every stage's weights on every rank
}

void Trainer::note_memory() {
  if (context_.device.is_cuda()) return;  // the CUDA peak is the allocator's
  const struct mallinfo2 info = mallinfo2();
  peak_live_bytes_ = std::max(peak_live_bytes_, static_cast<int64_t>(info.uordblks + info.hblkhd));
}

void Trainer::record_peak_memory() {
  struct rusage usage {};
  getrusage(RUSAGE_SELF, &usage);
  const auto doubles = torch::TensorOptions().dtype(torch::kDouble).device(context_.device);
  // What training held at its peak: the CUDA allocator's peak, or on CPUs the live
  // heap's above the baseline.
  double training = 0.0;
  if (context_.device.is_cuda()) training = static_cast<double>(cuda_memory(context_.device.index()).peak_allocated_bytes);
  else training = static_cast<double>(peak_live_bytes_ - baseline_live_bytes_);
  auto mine = torch::tensor({static_cast<double>(usage.ru_maxrss) / 1024.0, training / (1 << 20),
                             static_cast<double>(peak_live_bytes_) / (1 << 20)},
                            doubles);  // ru_maxrss: KiB
  auto all = mine;
  if (world_size() > 1) {
    all = torch::empty({3 * world_size()}, doubles);
    context_.data_parallel->all_gather(mine, all).wait();
  }
  if (!is_main_rank() || context_.run_dir.empty()) return;
  std::filesystem::create_directories(context_.run_dir);
  const auto host = all.cpu().view({-1, 3});
  nlohmann::json out;
  out["step"] = state_.step;
  double most = 0.0;
  for (int64_t r = 0; r < host.size(0); ++r) {
    out["peak_rss_mib"].push_back(host[r][0].item<double>());
    if (context_.device.is_cuda()) out["cuda_peak_allocated_mib"].push_back(host[r][1].item<double>());
    else out["peak_live_heap_mib"].push_back(host[r][2].item<double>());
    out["peak_training_mib"].push_back(host[r][1].item<double>());
    most = std::max(most, host[r][1].item<double>());
  }
  if (context_.planned_memory_bytes > 0) {
    const double planned = context_.planned_memory_bytes / (1 << 20);
    out["planned_mib"] = planned;
    log_info("memory: training peaked at ", std::lround(most), " MiB per rank (",
             context_.device.is_cuda() ? "CUDA allocator" : "live heap above the start", "); brigade plan predicted ",
             std::lround(planned), " MiB (measured / planned ", std::round(most / planned * 100) / 100, ")");
  }
  write_file_atomic(context_.run_dir / "memory.json", out.dump() + "\n");
}

std::vector<data::Batch> Trainer::step_batches() {
  const int64_t step = state_.step, micro_batches = options_.grad_accum_steps;
  auto sample = [this, micro_batches](int64_t at, bool pinned) {
    std::vector<data::Batch> out;
    for (int64_t micro = 0; micro < micro_batches; ++micro) {
      out.push_back(train_data_.batch(at, micro));
      if (pinned) pin(out.back());
    }
    return out;
  };
  if (context_.device.is_cpu()) return sample(step, false);  // the cores are busy computing
  std::vector<data::Batch> batches;
  if (prefetched_.valid()) {  // always collected, so no sampling runs beside another
    auto ready = prefetched_.get();
    if (prefetched_step_ == step) batches = std::move(ready);
  }
  if (batches.empty()) batches = sample(step, true);
  // The next step's rows depend only on its number (data/sampler.h): sample them while
  // this step computes on the GPU.
  prefetched_step_ = step + 1;
  prefetched_ = std::async(std::launch::async, sample, step + 1, true);
  for (auto& b : batches) b = on_device(std::move(b), context_.device);
  return batches;
}

std::string out_of_memory_message(int64_t step, c10::Device device, const GpuMemory& memory,
                                  const std::string& allocator_message) {
  const std::string first_line = allocator_message.substr(0, allocator_message.find('\n'));
  auto gib = [](int64_t bytes) { return detail::concat(std::round(static_cast<double>(bytes) / (1 << 30) * 10) / 10, " GiB"); };
  std::string where = device.str();
  if (device.is_cuda() && memory.total_bytes > 0) {
    where += detail::concat(" (peak ", gib(memory.peak_allocated_bytes), " in tensors, ", gib(memory.reserved_bytes),
                            " reserved, of ", gib(memory.total_bytes), ")");
  }
  return detail::concat("out of memory at step ", step, " on ", where, ": ", first_line,
                        "; to cut memory lower trainer.micro_batch_size (raise trainer.grad_accum_steps to keep "
                        "the batch) or data.seq_len, or set precision.compute_dtype=bfloat16, "
                        "precision.optimizer_state_dtype=bfloat16, parallel.zero_stage=1 (several ranks)");
}

StepResult Trainer::step() {
  try {
    return run_step();
  } catch (const c10::OutOfMemoryError& e) {  // the CUDA caching allocator
    const auto memory = context_.device.is_cuda() ? cuda_memory(context_.device.index()) : GpuMemory{};
    BRIGADE_FAIL(out_of_memory_message(state_.step + 1, context_.device, memory, e.what_without_backtrace()));
  } catch (const c10::Error& e) {
    // LibTorch's CPU allocator reports a refused allocation as a plain c10::Error.
    const std::string what = e.what_without_backtrace();
    const auto at = what.find("can't allocate memory");
    if (at == std::string::npos) throw;
    BRIGADE_FAIL(out_of_memory_message(state_.step + 1, context_.device, {}, what.substr(what.rfind(':', at) + 1)));
  }
}

namespace {

// The step's one host read: the values the host needs after a step's passes (loss
// shares, gradient norm, FP8 non-finite flag, MoE statistics) are joined on the
// device and copied back together, instead of a blocking read for each.
class HostRead {
 public:
  explicit HostRead(c10::Device device) : device_(device) {}
  // Queues `t` (any shape and dtype, on the device; undefined: `empty` zeros) and
  // returns its place for at().
  size_t add(const torch::Tensor& t, int64_t empty = 1) {
    const auto doubles = torch::TensorOptions().dtype(torch::kDouble).device(device_);
    parts_.push_back(t.defined() ? t.reshape({-1}).to(doubles) : torch::zeros({empty}, doubles));
    return parts_.size() - 1;
  }
  void read() {
    const auto host = torch::cat(parts_).cpu();
    int64_t offset = 0;
    for (auto& p : parts_) {
      const int64_t n = p.numel();
      p = host.narrow(0, offset, n);
      offset += n;
    }
  }
  const torch::Tensor& at(size_t i) const { return parts_[i]; }
  double value(size_t i, int64_t k = 0) const { return parts_[i].data_ptr<double>()[k]; }

 private:
  c10::Device device_;
  std::vector<torch::Tensor> parts_;
};

}  // namespace

torch::Tensor Trainer::step_denominator(const std::vector<data::Batch>& batches, int64_t& tokens) {
  int64_t trained = 0;
  for (const auto& b : batches) {
    trained += b.trained_tokens;
    tokens += b.inputs.numel() * dp_size();
  }
  // float64 holds the count exactly; float32 is what the loss sums are (a float64
  // scalar tensor would promote them).
  auto step_tokens = torch::full({1}, static_cast<double>(trained), torch::TensorOptions().dtype(torch::kDouble).device(context_.device));
  parallel_->sum_over_ranks(step_tokens);
  return step_tokens.clamp_min(1.0).to(torch::kFloat).reshape({});
}

StepResult Trainer::run_step() {
  const auto start = std::chrono::steady_clock::now();
  StepResult result;
  // Dropping the gradients (rather than zeroing them) lets the first backward write
  // them directly instead of accumulating into zeros.
  for (auto& [name, p] : params_) p.mutable_grad() = torch::Tensor();
  parallel_->release_weights(/*changed=*/false);  // ZeRO-3: gathered block by block from here
  // The loss is the mean over the step's trained targets on all ranks: the same for
  // any split of its rows into ranks and micro-batches.
  const std::vector<data::Batch> batches = step_batches();
  const auto denominator = step_denominator(batches, result.tokens);
  // This rank's shares of the step's means (loss, objective), and how many ranks saw
  // a NaN or infinity reach an FP8 quantizer (noted on the device, not read per call).
  // [4]: whether this rank was asked to stop (summed: any rank stops every rank).
  auto shares = torch::zeros({5}, torch::TensorOptions().dtype(torch::kDouble).device(context_.device));
  std::optional<precision::DeferredFiniteCheck> fp8_finite;
  if (precision_.fp8.enabled()) fp8_finite.emplace();

  for (int64_t micro = 0; micro < options_.grad_accum_steps && !pipeline_; ++micro) {
    const bool last = micro + 1 == options_.grad_accum_steps;
    parallel_->begin_micro_batch(last);
    const LossTensors part = forward_backward(batches[micro], denominator);
    if (part.loss.defined()) shares[0] += part.loss;
    if (part.objective.defined()) shares[1] += part.objective;
    if (part.mtp.defined()) shares[3] += part.mtp;
    parallel_->end_micro_batch(last);
  }
  if (pipeline_) pipeline_micro_batches(batches, denominator, shares, result);
  const torch::Tensor fp8_flag = fp8_finite ? fp8_finite->device_flag() : torch::Tensor();
  if (fp8_flag.defined()) shares[2] += fp8_flag.ne(0).to(torch::kDouble);
  result.reduce = parallel_->finish_gradients();  // gradients are now sums over the ranks
  if (stop_request_ && stop_request_()) shares[4] += 1.0;
  parallel_->sum_over_ranks(shares);
  // Pipeline: the loss lives on the last stage, the gradients on every stage.
  auto square_norm = parallel_->grad_square_norm();
  auto moe_stats = model_->moe_step_stats(parallel_->data_parallel());
  if (pipeline_) {
    pipeline_->stages->all_reduce(shares, parallel::ReduceOp::kSum).wait();
    pipeline_->stages->all_reduce(square_norm, parallel::ReduceOp::kSum).wait();
    // A stage's MoE layers' rows; the others' are zeros.
    if (moe_stats.defined()) pipeline_->stages->all_reduce(moe_stats, parallel::ReduceOp::kSum).wait();
  }

  // The step's one host read.
  HostRead host(context_.device);
  const size_t shared = host.add(shares), norm = host.add(square_norm);
  const size_t flag = host.add(fp8_flag), moe = host.add(moe_stats, 0);
  host.read();
  if (fp8_finite) {
    fp8_finite->check(static_cast<int>(host.value(flag)));  // this rank's first site, if any
    fp8_finite.reset();
    BRIGADE_CHECK(host.value(shared, 2) == 0, "non-finite value (NaN or Inf) reached an FP8 quantizer on ",
                  host.value(shared, 2), " other rank(s) at step ", state_.step + 1, " (their errors name it)");
  }
  const double loss = host.value(shared, 0), objective = host.value(shared, 1);
  const double grad_norm = std::sqrt(host.value(norm));
  const double lr = schedule_(state_.step);
  const bool finite = std::isfinite(loss) && std::isfinite(grad_norm);
  if (!finite) handle_nonfinite(std::isfinite(loss) ? "gradient norm" : "loss", std::isfinite(loss) ? grad_norm : loss);
  if (finite) {
    clip_gradients(grad_norm);
    optimizer_->step(lr, parallel_->optimizer_gradients());
    note_memory();
    parallel_->after_update();
    if (pipeline_ && pipeline_->shared_embedding && pipeline_->count > 1) {
      // The last stage's copy of the embeddings follows stage 0's update.
      torch::NoGradGuard no_grad;
      auto& stages = *pipeline_->stages;
      // ZeRO-3: stage 0's table is a unit, whole only while gathered.
      const auto table = parallel_->unit_of_block(model::hook_unit(model_->options(), model::OuterUnit::kEmbedding));
      if (table.units) table.units->gather(table.unit);
      auto weight = model_->embed_tokens->weight.detach();
      if (pipeline_->first_stage()) stages.send(weight, pipeline_->count - 1, pipeline_tag(0, 3)).wait();
      if (pipeline_->last_stage()) stages.recv(weight, 0, pipeline_tag(0, 3)).wait();
      if (table.units) table.units->release(table.unit);
    }
  }
  // Aux-loss-free balancing: expert biases move after the update, from this step's load.
  result.moe = model::TransformerImpl::moe_stats_from(host.at(moe).numel() > 0 ? host.at(moe).view({-1, 5}) : torch::Tensor());
  model_->end_moe_step(/*update_bias=*/finite);

  state_.step += 1;
  state_.tokens_seen += result.tokens;
  if (!finite) state_.skipped_steps += 1;
  result.step = state_.step;
  result.loss = loss;
  result.objective = objective;
  result.mtp_loss = host.value(shared, 3);
  result.stop_requested = host.value(shared, 4) > 0;
  result.lr = lr;
  result.grad_norm = grad_norm;
  result.skipped = !finite;
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return result;
}

void Trainer::pipeline_micro_batches(const std::vector<data::Batch>& batches, const torch::Tensor& denominator,
                                     torch::Tensor& shares, StepResult& result) {
  auto& pl = *pipeline_;
  auto& stages = *pl.stages;
  const auto count = static_cast<int64_t>(batches.size());
  const auto micro_batches = static_cast<double>(dp_size() * options_.grad_accum_steps);
  const int final_chunk = pl.total_chunks() - 1;
  // Per micro-batch and chunk of this rank (index m x chunks + v): the chunk's input
  // (gradient wanted unless tokens) and what its backward starts from (the loss in
  // the model's last chunk, else the output hidden state and the MoE auxiliary
  // losses of the chunk's layers).
  const auto slots = static_cast<size_t>(count * pl.chunks);
  std::vector<torch::Tensor> inputs(slots), outputs(slots), aux(slots);
  std::vector<parallel::Handle> sends;
  std::vector<torch::Tensor> sent;  // alive until their sends finish
  // Between two chunks of this rank (dualpipev's turn at the last rank) the tensor
  // is handed over in place.
  std::map<int, torch::Tensor> local;
  auto send = [&](torch::Tensor t, int to, int tag) {
    if (to == pl.stage) {
      local[tag] = t;
      return;
    }
    sent.push_back(t.contiguous());
    sends.push_back(stages.send(sent.back(), to, tag));
  };
  // Between model chunks c and c + 1 for micro-batch m: activations (kind 0) and
  // their gradients (kind 1) under one index.
  auto boundary = [&](int64_t m, int c) { return m * pl.total_chunks() + c; };
  int64_t held = 0;
  // Time spent waiting for a neighbour's activations or gradients: the stage's share
  // of the pipeline bubble.
  auto receive = [&](torch::Tensor& t, int from, int tag) {
    if (from == pl.stage) {
      auto it = local.find(tag);
      BRIGADE_ASSERT(it != local.end(), "pipeline: chunk hand-over ", tag, " on stage ", pl.stage, " before it was made");
      t = std::move(it->second);
      local.erase(it);
      return;
    }
    const auto start = std::chrono::steady_clock::now();
    stages.recv(t, from, tag).wait();
    result.pipeline_wait_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  const auto actions =
      parallel::pipeline_schedule(pl.schedule, pl.count, pl.stage, count, pl.chunks, pl.weight_grads != nullptr);
  // The params_ indices of tensors a split backward deferred or a W step wrote.
  auto indices = [&](const std::vector<torch::Tensor>& tensors) {
    std::vector<size_t> out;
    for (const auto& t : tensors) out.push_back(pl.param_index.at(t.unsafeGetTensorImpl()));
    return out;
  };
  for (size_t a = 0; a < actions.size(); ++a) {
    const auto& action = actions[a];
    const int64_t m = action.micro;
    const int v = action.chunk, c = pl.model_chunk(v);
    const auto slot = static_cast<size_t>(m * pl.chunks + v);
    const auto& batch = batches[m];
    if (action.kind == parallel::PipelineAction::Kind::kForward) {
      torch::Tensor input = batch.inputs;
      if (c > 0) {
        input = hidden_like(batch, model_->options().d_model, context_.device);
        receive(input, pl.rank_of(c - 1), pipeline_tag(boundary(m, c - 1), 0));
        input = input.detach().requires_grad_(true);
      }
      torch::Tensor out;
      {
        precision::AutocastGuard autocast(precision_.compute_dtype);
        out = model_->forward_stage(input, pl.first(v), pl.last(v), batch.segments, batch.inputs);
      }
      if (c == final_chunk) {
        torch::Tensor total;
        const LossTensors part = micro_batch_loss(out, batch, denominator, total, pl.first(v));
        shares[0] += part.loss;
        if (part.objective.defined()) shares[1] += part.objective;
        if (part.mtp.defined()) shares[3] += part.mtp;
        outputs[slot] = total;
      } else {
        BRIGADE_ASSERT(out.scalar_type() == torch::kFloat, "a pipeline stage's hidden state is ", out.scalar_type());
        send(out.detach(), pl.rank_of(c + 1), pipeline_tag(boundary(m, c), 0));
        outputs[slot] = out;
        if (auto x = model_->aux_loss(pl.first(v), pl.last(v)); x.defined()) aux[slot] = x / micro_batches;
      }
      inputs[slot] = input;
      result.pipeline_in_flight = std::max(result.pipeline_in_flight, ++held);
      note_memory();
      continue;
    }
    if (action.kind == parallel::PipelineAction::Kind::kWeight) {
      // A split backward's weight gradients (the oldest waiting, micro-batch m of chunk
      // v: the schedule keeps them in order), set aside as its micro-batch's term.
      parallel_->end_deferred(indices(pl.weight_grads->run_oldest()));
      result.pipeline_weight_steps += 1;
      note_memory();
      continue;
    }
    // Backward: a chunk's micro-batches in order on every schedule. The rank's last
    // backward closes the step's gradients (its reducer reduces while it runs).
    const bool last = a + 1 == actions.size();
    pl.micro = m;
    if (pl.chunks == 1) parallel_->begin_micro_batch(last);
    else parallel_->begin_chunk_backward(static_cast<size_t>(v), last);
    if (action.split) pl.weight_grads->set_deferring(true);
    if (c == final_chunk) {
      outputs[slot].backward();
    } else {
      auto grad = torch::empty_like(outputs[slot]);
      receive(grad, pl.rank_of(c + 1), pipeline_tag(boundary(m, c), 1));
      if (aux[slot].defined()) torch::autograd::backward({outputs[slot], aux[slot]}, {grad, torch::Tensor()});
      else outputs[slot].backward(grad);
    }
    std::vector<size_t> deferred;
    if (action.split) {
      pl.weight_grads->set_deferring(false);
      deferred = indices(pl.weight_grads->close_entry());
    }
    if (pl.shared_embedding && c == final_chunk && pl.count > 1) {
      // The copy's gradient (tied head, MTP embeddings) goes to stage 0.
      auto& head = model_->embed_tokens->weight.mutable_grad();
      send(head, 0, pipeline_tag(m, 2));
      head = torch::Tensor();
    }
    if (pl.local_head && c == final_chunk) {
      // The head's part waits for the embedding's backward of this micro-batch (the hook).
      pl.head_grads[m] = std::exchange(model_->embed_tokens->weight.mutable_grad(), torch::Tensor());
    }
    if (c > 0) send(inputs[slot].grad(), pl.rank_of(c - 1), pipeline_tag(boundary(m, c - 1), 1));
    if (pl.chunks == 1) parallel_->end_micro_batch(last);
    else parallel_->end_chunk_backward(static_cast<size_t>(v), last, /*chunk_last=*/m + 1 == count, deferred);
    note_memory();
    inputs[slot] = outputs[slot] = aux[slot] = torch::Tensor();
    --held;
  }
  BRIGADE_ASSERT(!pl.weight_grads || pl.weight_grads->entries() == 0, "pipeline: ", pl.weight_grads->entries(),
                 " split backwards without their W step");
  for (auto& h : sends) h.wait();
}

torch::Tensor Trainer::pipeline_eval_loss(const data::Batch& batch, int64_t index) {
  auto& pl = *pipeline_;
  torch::Tensor loss, handed;  // handed: the output kept for this rank's next chunk (dualpipev's turn)
  // The batch passes this rank once per chunk, in model order.
  for (int v = 0; v < pl.chunks; ++v) {
    const int c = pl.model_chunk(v);
    torch::Tensor input = batch.inputs;
    if (c > 0 && pl.rank_of(c - 1) == pl.stage) {
      input = std::exchange(handed, torch::Tensor());
    } else if (c > 0) {
      input = hidden_like(batch, model_->options().d_model, context_.device);
      pl.stages->recv(input, pl.rank_of(c - 1), pipeline_tag(index * pl.total_chunks() + c - 1, 3)).wait();
    }
    torch::Tensor out;
    {
      precision::AutocastGuard autocast(precision_.compute_dtype);
      out = model_->forward_stage(input, pl.first(v), pl.last(v), batch.segments);
    }
    if (c == pl.total_chunks() - 1) {
      loss = token_loss_sum(out, batch);
    } else if (pl.rank_of(c + 1) == pl.stage) {
      handed = out;
    } else {
      auto hidden = out.contiguous();
      pl.stages->send(hidden, pl.rank_of(c + 1), pipeline_tag(index * pl.total_chunks() + c, 3)).wait();
    }
  }
  return loss;
}

model::NamedTensors Trainer::pipeline_weights_on_main() {
  auto& pl = *pipeline_;
  auto weights = model_->state_dict();
  // This stage's expert slices, whole (collective over its EP group: every pipeline).
  for (auto& [name, t] : weights) {
    if (parallel_->expert_group() && pl.owner(name) == pl.stage && parallel_->is_expert_slice(name)) {
      t = parallel_->gather_experts(t);
    }
  }
  if (pl.index != 0) return {};
  std::vector<parallel::Handle> sends;
  std::vector<torch::Tensor> sent;
  for (size_t i = 0; i < weights.size(); ++i) {
    auto& [name, t] = weights[i];
    const int owner = pl.owner(name);
    const int tag = pipeline_tag(static_cast<int64_t>(i), 3);
    if (owner == 0) continue;
    if (pl.stage == owner) {
      sent.push_back(t.detach().contiguous());
      sends.push_back(pl.stages->send(sent.back(), 0, tag));
    } else if (pl.first_stage()) {
      t = torch::empty(pl.shapes.at(name), t.options());
      pl.stages->recv(t, owner, tag).wait();
    }
  }
  for (auto& h : sends) h.wait();
  return weights;
}

void Trainer::gather_pipeline_weights() {
  auto& pl = *pipeline_;
  torch::NoGradGuard no_grad;
  for (auto& [name, t] : model_->state_dict()) {
    auto shape = pl.shapes.at(name);
    if (parallel_->is_expert_slice(name)) shape[0] /= parallel_->expert_group()->size();  // this rank's experts
    if (t.numel() == 0 && !shape.empty()) t.set_data(torch::empty(shape, t.options()));
    auto whole = t.detach();
    pl.stages->broadcast(whole, pl.owner(name)).wait();
  }
}

torch::Tensor Trainer::forward(const data::Batch& batch) {
  precision::AutocastGuard autocast(precision_.compute_dtype);
  return model_->forward(batch.inputs, nullptr, batch.segments);  // [batch, seq, vocab]
}

torch::Tensor Trainer::token_loss_sum(const torch::Tensor& logits, const data::Batch& batch) const {
  // A chunk of rows at a time: no float32 copy of the whole logits (trainer/cross_entropy.h).
  return chunked_cross_entropy_sum(logits.reshape({-1, logits.size(-1)}), batch.targets.reshape({-1}),
                                   data::kIgnoreIndex);
}

// The MTP modules' cross-entropy, averaged over the depths, per trained token of the
// step (undefined without MTP). Module k's position i predicts targets[:, i + k]; a
// target in another packed document than position i is not a continuation of it.
torch::Tensor Trainer::mtp_loss(const data::Batch& batch, const torch::Tensor& denominator) {
  const auto logits = model_->mtp_logits();
  if (logits.empty()) return {};
  torch::Tensor sum;
  const int64_t seq = batch.targets.size(1);
  for (size_t i = 0; i < logits.size(); ++i) {
    const auto k = static_cast<int64_t>(i) + 1;
    auto targets = batch.targets.narrow(1, k, seq - k).to(logits[i].device());
    if (batch.segments.defined()) {
      const auto& seg = batch.segments;
      auto same = (seg.narrow(1, k, seq - k) == seg.narrow(1, 0, seq - k)).to(targets.device());
      targets = torch::where(same, targets, torch::full_like(targets, data::kIgnoreIndex));
    }
    auto part = chunked_cross_entropy_sum(logits[i].reshape({-1, logits[i].size(-1)}), targets.reshape({-1}),
                                          data::kIgnoreIndex);
    sum = sum.defined() ? sum + part : part;
  }
  return sum / (static_cast<double>(logits.size()) * denominator);
}

Trainer::LossTensors Trainer::forward_backward(const data::Batch& batch, const torch::Tensor& denominator) {
  // Every target masked here: nothing to learn from this slice (the reducer still
  // contributes zeros for this rank). With expert parallelism (the other ranks'
  // tokens may need this rank's experts) and ZeRO-3 (the blocks' gathers are
  // collective) the forward and backward still run.
  if (batch.trained_tokens == 0 && !lockstep_forward()) return {};
  const auto logits = forward(batch);
  torch::Tensor total;
  auto shares = micro_batch_loss(logits, batch, denominator, total);
  note_memory();
  total.backward();
  note_memory();
  return shares;
}

Trainer::LossTensors Trainer::micro_batch_loss(const torch::Tensor& logits, const data::Batch& batch,
                                               const torch::Tensor& denominator, torch::Tensor& total,
                                               int64_t aux_first) {
  auto loss = token_loss_sum(logits, batch) / denominator;
  torch::Tensor objective;
  if (const auto& o = context_.objective) {
    // Computed even at weight 0 (then the update is exactly plain SFT's: x * 1 and
    // x + 0 are exact), so its value can be watched without training on it.
    objective = o->loss_sum(logits, batch) / denominator;
    loss = (1.0 - o->weight()) * loss + o->weight() * objective;
  }
  // MoE balance / z-loss terms of this forward, if any: averaged over the step's
  // micro-batches on all ranks.
  auto aux = model_->aux_loss(aux_first, model_->options().n_layers);
  const auto micro_batches = static_cast<double>(dp_size() * options_.grad_accum_steps);
  total = aux.defined() ? loss + aux / micro_batches : loss;
  const auto mtp = mtp_loss(batch, denominator);
  if (mtp.defined()) total = total + model_->options().mtp.loss_weight * mtp;
  auto share = [](const torch::Tensor& t) { return t.defined() ? t.detach().to(torch::kDouble) : torch::Tensor(); };
  return {share(loss), share(objective), share(mtp)};
}

void Trainer::clip_gradients(double grad_norm) {
  if (options_.grad_clip <= 0 || grad_norm <= options_.grad_clip) return;
  std::vector<torch::Tensor> grads;
  for (const auto& g : parallel_->optimizer_gradients()) {
    if (g.defined()) grads.push_back(g);
  }
  torch::NoGradGuard no_grad;
  if (!grads.empty()) torch::_foreach_mul_(grads, options_.grad_clip / (grad_norm + 1e-6));
}

void Trainer::handle_nonfinite(const std::string& what, double value) {
  std::string culprit = sharded() ? "(none among this rank's pieces)" : "(none: the loss itself)";
  const auto grads = parallel_->optimizer_gradients();
  for (size_t i = 0; i < grads.size(); ++i) {
    if (grads[i].defined() && !torch::isfinite(grads[i]).all().item<bool>()) {
      culprit = optimizer_->params()[i].first;
      break;
    }
  }
  const std::string message = detail::concat("non-finite ", what, " (", value, ") at step ", state_.step + 1,
                                             ", first non-finite gradient in parameter ", culprit);
  BRIGADE_CHECK(options_.on_nonfinite == NonFinitePolicy::kSkip, message,
                "; hint: lower trainer.lr, keep trainer.grad_clip on, use float32 compute, "
                "or set trainer.on_nonfinite=skip to skip such steps");
  log_warn(message, "; skipping the update (trainer.on_nonfinite=skip)");
}

EvalResult Trainer::evaluate() {
  torch::NoGradGuard no_grad;
  const bool was_training = model_->is_training();
  model_->eval();
  // The ranks share the batches (rank r takes batches r, r + ranks, ...) and add up,
  // on the device: one host read for the whole evaluation.
  const int ranks = dp_size(), rank = parallel_->rank();
  const bool ep = lockstep_forward();
  auto sums = torch::zeros({2}, torch::TensorOptions().dtype(torch::kDouble).device(context_.device));  // per-batch mean losses, batches counted
  // With expert parallelism or ZeRO-3 every rank runs the same number of forwards
  // (the last round's extra ones are not counted).
  const int64_t rounds = (options_.eval_batches + ranks - 1) / ranks;
  for (int64_t round = 0; round < rounds; ++round) {
    const int64_t i = round * ranks + rank;
    const bool counted = i < options_.eval_batches;
    if (!counted && !ep) break;
    // The same held-out batches every time, so evaluations are comparable.
    data::Batch batch = on_device(eval_data_.batch(counted ? i : 0, 0), context_.device);
    if (batch.trained_tokens == 0 && !ep) continue;
    const auto loss = pipeline_ ? pipeline_eval_loss(batch, i) : token_loss_sum(forward(batch), batch);
    if (!counted || batch.trained_tokens == 0 || !loss.defined()) continue;
    sums[0] += loss.to(torch::kDouble) / static_cast<double>(batch.trained_tokens);
    sums[1] += 1.0;
  }
  parallel_->sum_over_ranks(sums);
  if (pipeline_) pipeline_->stages->all_reduce(sums, parallel::ReduceOp::kSum).wait();  // from the last stage
  const auto host = sums.cpu();
  const double* sum = host.data_ptr<double>();
  if (was_training) model_->train();
  EvalResult result;
  result.step = state_.step;
  result.loss = sum[1] > 0 ? sum[0] / sum[1] : 0.0;
  result.perplexity = std::exp(result.loss);
  return result;
}

std::filesystem::path Trainer::save_checkpoint() {
  // ZeRO-3: whole weights while they are written (every rank calls this).
  parallel_->gather_weights();
  struct Release {
    parallel::ParallelState& state;
    ~Release() { state.release_weights(false); }
  } release{*parallel_};
  CheckpointData data;
  data.model = pipeline_ ? pipeline_weights_on_main() : model_->state_dict();
  const bool ep = parallel_->expert_group() != nullptr;
  // Whole expert tensors' optimizer state (collective over the EP group).
  auto optimizer_state = [&] {
    auto state = optimizer_->state();
    for (auto& [key, t] : state) {
      const auto param = key.substr(key.find('.') + 1);  // exp_avg.NAME, exp_avg_sq.NAME, step.NAME
      if (ep && !key.starts_with("step.") && parallel_->is_expert_slice(param)) t = parallel_->gather_experts(t);
    }
    return state;
  };
  if (ep && !pipeline_) {
    // Whole expert tensors in the checkpoint (every EP group gathers; rank 0 writes):
    // any expert-parallel size, or none, can resume from it. With ZeRO-1 each rank
    // writes its own optimizer state below (the manifest lists the first EP group's).
    for (auto& [name, t] : data.model) {
      if (parallel_->is_expert_slice(name)) t = parallel_->gather_experts(t);
    }
    if (!sharded()) data.optimizer = optimizer_state();
  }
  data.rng = {{"cpu", at::detail::getDefaultCPUGenerator().get_state()}};
  if (context_.device.is_cuda()) data.rng.emplace_back("cuda", at::globalContext().defaultGenerator(context_.device).get_state());
  data.precision = model_->fp8_state();
  data.state = state_;
  data.recipe_yaml = context_.recipe_yaml;
  if (!sharded() && !pipeline_) {
    // Every rank holds the same state: rank 0 writes it.
    if (!is_main_rank()) return {};
    if (!ep) data.optimizer = optimizer_->state();
    return checkpoints_.save(data);
  }
  // ZeRO: every rank writes its optimizer shard into the staging directory rank 0
  // prepared; rank 0 then adds the rest and commits. Pipeline: the first pipeline's
  // stages write one file each.
  auto& group = *context_.data_parallel;
  const bool stage_files = pipeline_ && !sharded();
  const bool writes = !stage_files || pipeline_->index == 0;
  const std::string file = stage_files ? optimizer_shard_file(pipeline_->stage, pipeline_->count)
                                       : optimizer_shard_file(group.rank(), group.size());
  const auto staged = checkpoints_.staging_dir(state_.step);
  if (is_main_rank()) checkpoints_.prepare_staging(staged);
  group.barrier().wait();
  std::string failure;
  if (!std::filesystem::is_directory(staged)) {
    failure = "it does not exist on this rank: ZeRO and pipeline checkpoints need the run directory on a filesystem every rank shares";
  } else {
    try {
      // Delayed scaling's amax histories live on the stage that runs their GEMMs: the
      // first pipeline's other stages leave theirs for rank 0 to merge.
      if (pipeline_ && pipeline_->index == 0 && !pipeline_->first_stage()) {
        model::NamedTensors own;
        for (const auto& [key, t] : data.precision) {
          if (pipeline_->owner(key) == pipeline_->stage) own.emplace_back(key, t);
        }
        if (!own.empty()) model::save_safetensors(staged / fp8_stage_file(pipeline_->stage), own);
      }
      // A pipeline stage's file holds whole expert tensors (gathered over the EP group);
      // a ZeRO rank's holds its own slices, as the layout lists them.
      auto state = pipeline_ && !sharded() ? optimizer_state() : optimizer_->state();
      if (writes) model::save_safetensors(staged / file, state);
    } catch (const std::exception& e) {
      failure = e.what();
    }
  }
  auto failed = torch::tensor({failure.empty() ? 0 : 1}, torch::kInt).to(group.device());
  group.all_reduce(failed, parallel::ReduceOp::kSum).wait();
  BRIGADE_CHECK(failure.empty(), "writing this rank's optimizer shard into ", staged.string(), " failed: ", failure);
  BRIGADE_CHECK(failed.item<int>() == 0, failed.item<int>(), " rank(s) could not write their optimizer shard into ",
                staged.string(), " (see their errors); checkpoint not written");
  std::filesystem::path dir;
  if (is_main_rank()) {
    data.optimizer_shards = optimizer_layout();
    if (pipeline_) {
      // Stage 0's own FP8 state, and every other stage's from its file.
      model::NamedTensors merged;
      for (const auto& [key, t] : data.precision) {
        if (pipeline_->owner(key) == 0) merged.emplace_back(key, t);
      }
      for (int s = 1; s < pipeline_->count; ++s) {
        const auto file = staged / fp8_stage_file(s);
        if (!std::filesystem::exists(file)) continue;
        for (auto& [key, t] : model::load_safetensors(file).tensors) merged.emplace_back(key, t.clone());
        std::filesystem::remove(file);
      }
      data.precision = std::move(merged);
    }
    dir = checkpoints_.save(data, staged);
  }
  group.barrier().wait();  // the checkpoint is complete for every rank
  return dir;
}

// ---------------------------------------------------------------------------------
// Standard hooks.
namespace {

// MoE keys of a metrics line: per-layer max/mean expert load of the step, and the
// drop fraction and auxiliary terms (summed over layers) when they are enabled.
void add_moe_metrics(nlohmann::json& line, const StepResult& r, const moe::MoEOptions& o) {
  auto per_layer = [&](auto member) {
    nlohmann::json values = nlohmann::json::array();
    for (const auto& layer : r.moe) values.push_back(layer.*member);
    return values;
  };
  auto summed = [&](auto member) {
    double total = 0.0;
    for (const auto& layer : r.moe) total += layer.*member;
    return total;
  };
  line["moe_load_max_over_mean"] = per_layer(&moe::LayerStepStats::max_load_ratio);
  if (!o.dropless) line["moe_dropped_fraction"] = per_layer(&moe::LayerStepStats::dropped_fraction);
  if (o.seq_aux_loss > 0) line["moe_seq_aux_loss"] = summed(&moe::LayerStepStats::seq_aux_loss);
  if (o.batch_aux_loss > 0) line["moe_batch_aux_loss"] = summed(&moe::LayerStepStats::batch_aux_loss);
  if (o.z_loss > 0) line["moe_z_loss"] = summed(&moe::LayerStepStats::z_loss);
}

// metrics.jsonl lines and the progress display every trainer.log_every steps.
class LoggingHook : public TrainerHook {
 public:
  void on_start(Trainer& t) override {
    const int64_t end = t.options().stop_after > 0 ? t.options().stop_after : t.options().max_steps;
    progress_ = std::make_unique<Progress>("train", end, stderr_is_terminal());
    last_ = std::chrono::steady_clock::now();
    t.metrics();  // open (and trim on resume) before the first step
  }
  void on_step(Trainer& t, const StepResult& r) override {
    tokens_ += r.tokens;
    loss_sum_ += r.loss;
    ++steps_;
    const bool last = t.finished();
    if (r.step % t.options().log_every != 0 && !last) {
      if (progress_->interactive()) progress_->update(r.step, status(r.loss, rate_));
      return;
    }
    const auto now = std::chrono::steady_clock::now();
    const double seconds = std::chrono::duration<double>(now - last_).count();
    rate_ = seconds > 0 ? static_cast<double>(tokens_) / seconds : 0.0;
    nlohmann::json line = {{"step", r.step}, {"loss", r.loss}, {"lr", r.lr}, {"grad_norm", r.grad_norm},
                           {"tokens_per_sec", rate_}, {"tokens_seen", t.state().tokens_seen},
                           {"skipped", r.skipped}};
    if (t.context().objective) line[t.context().objective->name()] = r.objective;
    if (t.model()->options().mtp.enabled()) line["mtp_loss"] = r.mtp_loss;
    if (!r.moe.empty()) add_moe_metrics(line, r, t.model()->options().moe);
    line["step_seconds"] = r.seconds;
    if (r.reduce.buckets > 0) {
      // Data parallel: how many gradient buckets started during backward, and how
      // long the step then waited for communication (the part not hidden).
      line["dp_buckets"] = r.reduce.buckets;
      line["dp_buckets_in_backward"] = r.reduce.started_in_backward;
      line["dp_wait_seconds"] = r.reduce.wait_seconds;
    }
    if (r.pipeline_in_flight > 0) {
      // Rank 0's stage (the first): the micro-batches it held and the time it waited.
      line["pp_in_flight"] = r.pipeline_in_flight;
      line["pp_wait_seconds"] = r.pipeline_wait_seconds;
      if (r.pipeline_weight_steps > 0) line["pp_weight_steps"] = r.pipeline_weight_steps;
    }
    t.metrics().write(line);
    progress_->update(r.step, status(loss_sum_ / static_cast<double>(steps_), rate_));
    tokens_ = 0;
    loss_sum_ = 0.0;
    steps_ = 0;
    last_ = now;
  }
  void on_end(Trainer&) override { progress_->finish(); }

 private:
  static std::string status(double loss, double rate) {
    char buf[96];
    std::snprintf(buf, sizeof buf, "loss %.4f | %s tok/s", loss, human_count(rate).c_str());
    return buf;
  }
  std::unique_ptr<Progress> progress_;
  std::chrono::steady_clock::time_point last_;
  int64_t tokens_ = 0;
  double loss_sum_ = 0.0;
  int64_t steps_ = 0;
  double rate_ = 0.0;
};

// Every rank runs it (evaluation is shared); the main rank reports.
class EvalHook : public TrainerHook {
 public:
  explicit EvalHook(bool report) : report_(report) {}
  void on_step(Trainer& t, const StepResult& r) override {
    if (t.options().eval_every > 0 && r.step % t.options().eval_every == 0 && !t.finished()) run(t);
  }
  void on_end(Trainer& t) override {
    // A preempted job saves its checkpoint and leaves; the resumed run evaluates.
    if (last_step_ != t.current_step() && !t.stopped_by_request()) run(t);
  }

 private:
  void run(Trainer& t) {
    EvalResult e = t.evaluate();
    last_step_ = e.step;
    if (!report_) return;
    t.metrics().write({{"step", e.step}, {"eval_loss", e.loss}, {"eval_ppl", e.perplexity}});
    if (stderr_is_terminal()) std::fprintf(stderr, "\n");
    log_info("eval @ step ", e.step, ": loss ", e.loss, ", perplexity ", e.perplexity);
  }
  bool report_;
  int64_t last_step_ = -1;
};

// Every rank runs it at the same steps (save_checkpoint() is collective); the
// decisions depend only on the step and on what existed before training started.
class CheckpointHook : public TrainerHook {
 public:
  void on_start(Trainer& t) override {
    last_step_ = t.current_step();
    had_checkpoint_ = t.checkpoints().latest().has_value();
  }
  void on_step(Trainer& t, const StepResult& r) override {
    if (t.options().checkpoint_every > 0 && r.step % t.options().checkpoint_every == 0) save(t);
  }
  void on_end(Trainer& t) override {
    if (last_step_ != t.current_step() || !had_checkpoint_) save(t);
  }

 private:
  void save(Trainer& t) {
    auto dir = t.save_checkpoint();
    log_debug("checkpoint written: ", dir.string());
    last_step_ = t.current_step();
    had_checkpoint_ = true;
  }
  int64_t last_step_ = -1;
  bool had_checkpoint_ = false;
};

}  // namespace

void Trainer::add_default_hooks() {
  // Rank 0 speaks for the job: one metrics log, one progress display, one set of
  // checkpoints. Evaluation and checkpoints involve every rank (shared eval batches,
  // sharded optimizer state).
  if (is_main_rank()) add_hook(std::make_unique<LoggingHook>());
  add_hook(std::make_unique<EvalHook>(/*report=*/is_main_rank()));
  add_hook(std::make_unique<CheckpointHook>());
}

}  // namespace brigade::trainer
