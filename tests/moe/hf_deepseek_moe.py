"""Runs Hugging Face transformers' DeepSeek-V3 MoE block on weights written by
brigade's tests, for the independent-implementation parity check.

usage: hf_deepseek_moe.py IN.safetensors OUT.safetensors

IN holds the block's tensors under transformers' names (gate.weight,
gate.e_score_correction_bias, experts.gate_up_proj, experts.down_proj,
shared_experts.{gate,up,down}_proj.weight), the input "x" [batch, seq, hidden],
and the config as string metadata. OUT receives "y", the block's output.
Exit code 3: transformers (or safetensors) is not installed.
"""
import sys

try:
    import torch
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
except ImportError as e:  # the caller skips the test
    print(f"missing Python package: {e}", file=sys.stderr)
    sys.exit(3)


def main(src, dst):
    with safe_open(src, framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(src)
    x = tensors.pop("x")
    config = DeepseekV3Config(
        hidden_size=int(meta["hidden_size"]),
        moe_intermediate_size=int(meta["moe_intermediate_size"]),
        n_routed_experts=int(meta["n_routed_experts"]),
        num_experts_per_tok=int(meta["num_experts_per_tok"]),
        n_shared_experts=int(meta["n_shared_experts"]),
        n_group=int(meta["n_group"]),
        topk_group=int(meta["topk_group"]),
        norm_topk_prob=meta["norm_topk_prob"] == "true",
        routed_scaling_factor=float(meta["routed_scaling_factor"]),
        hidden_act="silu",
    )
    block = DeepseekV3MoE(config).eval()
    block.load_state_dict(tensors, strict=True)
    with torch.no_grad():
        y = block(x)
    save_file({"y": y.contiguous()}, dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
