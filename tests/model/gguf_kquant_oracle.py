"""Oracles for brigade's K-quant encoders and quantization mixes (gguf_kquant_test.cpp).

  gguf_kquant_oracle.py models DIR     writes three small F32 llama GGUFs with gguf-py
                                       and has llama.cpp's quantizer
                                       (llama_cpp.llama_model_quantize, no importance
                                       matrix) convert each to Q4_K_M, Q5_K_M, Q6_K and
                                       Q8_0: DIR/NAME.f32.gguf -> DIR/NAME.MIX.gguf, MIX
                                       in q4_k_m q5_k_m q6_k q8_0, NAME in
                                         dense  4 layers, hidden 256, ffn 544 (ffn_down
                                                rows are not whole super-blocks), 4 heads
                                                / 2 KV heads, vocab 512, separate output
                                         wide   80 layers (llama.cpp's "70B" type), hidden
                                                64, tied embeddings: every type shows
                                                through its block-32 fallback
                                         moe    4 layers, 8 experts (top 2), hidden 64
  gguf_kquant_oracle.py dequant IN OUT  gguf-py's gguf.quants.dequantize of every tensor
                                       of IN, written to OUT as F32 tensors of the same
                                       names

Weights are N(0, 0.02) from a fixed seed. Prints "ok"; exit code 3: a package is missing
(the test skips).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gguf_check import need  # noqa: E402  (exit 3 when a package is missing)

MIXES = {"q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K", "q8_0": "Q8_0"}
MODELS = {
    "dense": dict(layers=4, hidden=256, ffn=544, heads=4, kv_heads=2, vocab=512, experts=0, tied=False),
    "wide": dict(layers=80, hidden=64, ffn=64, heads=4, kv_heads=2, vocab=512, experts=0, tied=True),
    "moe": dict(layers=4, hidden=64, ffn=64, heads=4, kv_heads=2, vocab=512, experts=8, tied=False),
}


def add_vocab(w, gguf, vocab):
    """A SentencePiece-style vocabulary llama.cpp loads: <unk> <s> </s>, the 256 byte
    tokens, then plain pieces up to `vocab`."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    while len(tokens) < vocab:
        tokens.append(f"\u2581t{len(tokens)}")
        types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(vocab)])
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


def write_model(path, spec, seed):
    gguf = need("gguf")
    import numpy as np

    rng = np.random.default_rng(seed)
    h, ff, heads, kv = spec["hidden"], spec["ffn"], spec["heads"], spec["kv_heads"]
    head_dim, experts = h // heads, spec["experts"]
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("kquant-oracle")
    w.add_file_type(0)  # ALL_F32
    w.add_context_length(256)
    w.add_embedding_length(h)
    w.add_block_count(spec["layers"])
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(spec["vocab"])
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(2)
    add_vocab(w, gguf, spec["vocab"])

    def weight(*shape):  # torch order: outermost first
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def norm():
        return (1.0 + 0.1 * rng.standard_normal(h)).astype(np.float32)

    w.add_tensor("token_embd.weight", weight(spec["vocab"], h))
    for i in range(spec["layers"]):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", norm())
        w.add_tensor(p + "attn_q.weight", weight(h, h))
        w.add_tensor(p + "attn_k.weight", weight(kv * head_dim, h))
        w.add_tensor(p + "attn_v.weight", weight(kv * head_dim, h))
        w.add_tensor(p + "attn_output.weight", weight(h, h))
        w.add_tensor(p + "ffn_norm.weight", norm())
        if experts:
            w.add_tensor(p + "ffn_gate_inp.weight", weight(experts, h))
            w.add_tensor(p + "ffn_gate_exps.weight", weight(experts, ff, h))
            w.add_tensor(p + "ffn_up_exps.weight", weight(experts, ff, h))
            w.add_tensor(p + "ffn_down_exps.weight", weight(experts, h, ff))
        else:
            w.add_tensor(p + "ffn_gate.weight", weight(ff, h))
            w.add_tensor(p + "ffn_up.weight", weight(ff, h))
            w.add_tensor(p + "ffn_down.weight", weight(h, ff))
    w.add_tensor("output_norm.weight", norm())
    if not spec["tied"]:
        w.add_tensor("output.weight", weight(spec["vocab"], h))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def cmd_models(out_dir):
    llama_cpp = need("llama_cpp")
    need("numpy")
    import ctypes

    # llama.cpp logs a line per tensor; keep the test's output short.
    @llama_cpp.llama_log_callback
    def quiet(level, text, user_data):
        pass

    llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
    for seed, (name, spec) in enumerate(MODELS.items()):
        f32 = os.path.join(out_dir, f"{name}.f32.gguf")
        write_model(f32, spec, seed)
        for mix, ftype in MIXES.items():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + ftype)
            params.nthread = 1
            out = os.path.join(out_dir, f"{name}.{mix}.gguf")
            rc = llama_cpp.llama_model_quantize(f32.encode(), out.encode(), params)
            if rc != 0:
                sys.exit(f"llama_model_quantize returned {rc} for {name} {mix}")
    print("ok")


def cmd_dequant(in_path, out_path):
    gguf = need("gguf")
    import numpy as np

    reader = gguf.GGUFReader(in_path)
    w = gguf.GGUFWriter(out_path, "llama")
    for t in reader.tensors:
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        w.add_tensor(t.name, values)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print("ok")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "models":
        cmd_models(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "dequant":
        cmd_dequant(sys.argv[2], sys.argv[3])
    else:
        print(__doc__)
        sys.exit(2)


if __name__ == "__main__":
    main()
