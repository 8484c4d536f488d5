// Activation checkpointing: a piece of the forward pass whose intermediate
// activations are not kept for the backward pass; its backward recomputes them
// first (under the forward's autocast dtype), then back-propagates through the
// recomputed graph into the piece's inputs and parameters. Trades one more forward
// of the piece for its activation memory (trainer.activation_checkpointing).
//
// While a piece is recomputed, recomputing() is true on that thread: modules that
// record per-step state in their forward (MoE loads) skip it then, so the state is
// recorded once. FP8 GEMMs record their amax histories only with grad mode on, i.e.
// in the recomputation and not in the checkpointed forward: once, from the same
// scales.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include <torch/types.h>

namespace brigade {

// `trainer.activation_checkpointing`: none; selective (the attention core: the
// softmax(QK^T)V products and their [batch, heads, seq, seq] intermediates); full
// (every transformer block; only its input is kept).
enum class Checkpointing { kNone, kSelective, kFull };
std::string to_string(Checkpointing mode);
Checkpointing parse_checkpointing(const std::string& name);

using Piece = std::function<torch::Tensor(const std::vector<torch::Tensor>&)>;

// fn(inputs) (one or three tensors) with its activations recomputed in backward.
// Gradients flow to the inputs that require them and to every parameter fn uses.
// Without grad mode it is just fn(inputs).
torch::Tensor checkpointed(Piece fn, const std::vector<torch::Tensor>& inputs);

// True on a thread while it recomputes a checkpointed piece.
bool recomputing();

}  // namespace brigade
