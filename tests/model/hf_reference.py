"""transformers' side of the Hugging Face parity tests (tests/model/hf_test.cpp).

  make FAMILY DIR [--tied] [--shard-kb N] [--dtype float32|bfloat16]
      builds a tiny random FAMILY (llama, qwen2, qwen3, qwen3_moe, deepseek_v2, deepseek_v3, and
      the variants llama_yarn, llama_llama3rope, deepseek_v3_nolora) model, saves it to DIR with
      save_pretrained, and writes DIR/reference.safetensors: "ids" [2, 24] int64 and
      "logits" [2, 24, vocab] float32 from transformers' forward.
  logits DIR IDS OUT
      loads DIR with AutoModelForCausalLM (float32) and writes its logits for the
      "ids" tensor of IDS into OUT.

Exit code 3: transformers is missing (the test skips).
"""
import sys

try:
    import torch
    import transformers
    from safetensors.torch import load_file, save_file
except ImportError as e:  # pragma: no cover
    print(f"missing: {e}")
    sys.exit(3)

VOCAB = 300


SEEDS = {"llama": 1, "qwen2": 2, "qwen3": 3, "qwen3_moe": 4, "deepseek_v3": 5, "deepseek_v3_nolora": 6,
         "deepseek_v2": 7, "llama_yarn": 8, "llama_llama3rope": 9}


def deepseek_config(family, common):
    """Multi-head latent attention with every size distinct, so a swapped one fails."""
    mla = dict(common, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
               v_head_dim=12, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
               n_group=2, topk_group=1, first_k_dense_replace=1)
    theta = mla.pop("rope_theta")
    if family == "deepseek_v3":  # query latent, YaRN with both mscales, shared expert, the first layer dense
        return transformers.DeepseekV3Config(
            q_lora_rank=24, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
            rope_parameters=dict(rope_type="yarn", rope_theta=theta, factor=4.0, original_max_position_embeddings=32,
                                 beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=0.8), **mla)
    if family == "deepseek_v3_nolora":  # queries projected directly, every layer dense, plain RoPE
        mla["first_k_dense_replace"] = 2
        return transformers.DeepseekV3Config(q_lora_rank=None, n_shared_experts=1,
                                             rope_parameters=dict(rope_type="default", rope_theta=theta), **mla)
    # deepseek_v2: softmax routing limited to the best group, two shared experts, linear RoPE scaling
    return transformers.DeepseekV2Config(
        q_lora_rank=None, n_shared_experts=2, routed_scaling_factor=1.5, topk_method="group_limited_greedy",
        rope_parameters=dict(rope_type="linear", rope_theta=theta, factor=2.0), **mla)


def make(family, out, tied, shard_kb, dtype):
    torch.manual_seed(SEEDS[family])
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-6, tie_word_embeddings=tied, rope_theta=50000.0)
    if family == "llama":
        config = transformers.LlamaConfig(**common)
    elif family == "llama_yarn":  # YaRN without mscales: cos/sin scaled by 0.1 ln(factor) + 1
        theta = common.pop("rope_theta")
        config = transformers.LlamaConfig(rope_parameters=dict(
            rope_type="yarn", rope_theta=theta, factor=4.0, original_max_position_embeddings=32), **common)
    elif family == "llama_llama3rope":
        theta = common.pop("rope_theta")
        config = transformers.LlamaConfig(rope_parameters=dict(
            rope_type="llama3", rope_theta=theta, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=32), **common)
    elif family.startswith("deepseek"):
        config = deepseek_config(family, common)
    elif family == "qwen2":
        config = transformers.Qwen2Config(**common)
    elif family == "qwen3":
        config = transformers.Qwen3Config(head_dim=32, **common)  # head_dim != hidden/heads
    else:  # qwen3_moe: 4 experts, top-2, the first layer dense
        config = transformers.Qwen3MoeConfig(head_dim=16, num_experts=4, num_experts_per_tok=2,
                                             moe_intermediate_size=32, norm_topk_prob=True,
                                             mlp_only_layers=[0], **common)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # random norms and biases, so their mapping is exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
        for name, b in list(model.named_buffers()) + list(model.named_parameters()):  # deepseek_v3's selection bias, zero at init
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    kwargs = {}
    if shard_kb:
        kwargs["max_shard_size"] = f"{shard_kb}KB"
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(out, **kwargs)
    model = model.float()
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model(ids).logits.float()
    save_file({"ids": ids, "logits": logits.contiguous()}, f"{out}/reference.safetensors")


def logits(model_dir, ids_file, out):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = load_file(ids_file)["ids"]
    with torch.no_grad():
        result = model(ids).logits.float()
    save_file({"logits": result.contiguous(), "model_type": torch.tensor([0])}, out)
    print(type(model).__name__, model.config.model_type)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[0] == "make":
        shard = int(args[args.index("--shard-kb") + 1]) if "--shard-kb" in args else 0
        dtype = args[args.index("--dtype") + 1] if "--dtype" in args else "float32"
        make(args[1], args[2], "--tied" in args, shard, dtype)
    elif args[0] == "logits":
        logits(args[1], args[2], args[3])
    else:
        sys.exit(f"unknown mode {args[0]}")
