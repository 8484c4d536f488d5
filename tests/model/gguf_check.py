"""Python oracles for brigade's GGUF tests (tests/model/gguf_test.cpp).

  gguf_check.py quant FILE      gguf-py's reference quantizers vs brigade's bytes: for
                                every F32 tensor NAME with siblings NAME.q8_0 / NAME.q4_0,
                                prints {"NAME.q8_0": {"blocks": n, "mismatched_blocks": m}, ...}
  gguf_check.py inspect FILE    what gguf-py's GGUFReader sees: {"metadata": {key: value},
                                "types": {key: value type}, "tensors": [{name, shape (ne
                                order), type}]}
  gguf_check.py write FILE      writes a file with gguf-py's GGUFWriter (read back by
                                GgufFormat.ReadsGgufPyFile)
  gguf_check.py llama JOB.json  runs llama.cpp (llama-cpp-python) on each model of the job:
                                [{"path", "prompt": [ids], "new_tokens": n, "sequence": [ids]}]
                                -> [{"greedy": [ids], "argmax": [per-position argmax of
                                sequence]}]

Exit code 3: a package is missing (the test skips).
"""
import json
import sys


def need(module):
    try:
        return __import__(module)
    except ImportError as e:
        print(f"missing python package: {e}")
        sys.exit(3)


def cmd_quant(path):
    need("gguf")
    import numpy as np
    from gguf import GGUFReader, GGMLQuantizationType
    from gguf.quants import quantize

    reader = GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    result = {}
    for name, t in tensors.items():
        if t.tensor_type != GGMLQuantizationType.F32:
            continue
        # GGUFReader gives the data in torch order already (shape reversed from ne).
        x = np.array(t.data, dtype=np.float32)
        for suffix, qtype in (("q8_0", GGMLQuantizationType.Q8_0), ("q4_0", GGMLQuantizationType.Q4_0)):
            other = tensors.get(f"{name}.{suffix}")
            if other is None:
                continue
            assert other.tensor_type == qtype, (other.name, other.tensor_type)
            ref = quantize(x, qtype).reshape(-1)
            ours = np.array(other.data, dtype=np.uint8).reshape(-1)
            assert ref.size == ours.size, (ref.size, ours.size)
            block = 34 if qtype == GGMLQuantizationType.Q8_0 else 18
            diff = (ref.reshape(-1, block) != ours.reshape(-1, block)).any(axis=1)
            result[other.name] = {"blocks": int(diff.size), "mismatched_blocks": int(diff.sum())}
    print(json.dumps(result))


def cmd_inspect(path):
    need("gguf")
    from gguf import GGUFReader

    reader = GGUFReader(path)
    metadata, types = {}, {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # the reader's pseudo-fields (version, counts)
            continue
        value = field.contents()
        if hasattr(value, "item"):
            value = value.item()
        metadata[key] = value
        types[key] = "/".join(t.name for t in field.types)
    tensors = [
        {"name": t.name, "shape": [int(d) for d in t.shape], "type": t.tensor_type.name}
        for t in reader.tensors
    ]
    print(json.dumps({"metadata": metadata, "types": types, "tensors": tensors}))


def cmd_write(path):
    gguf = need("gguf")
    import numpy as np

    w = gguf.GGUFWriter(path, "llama")
    w.add_uint32("x.u32", 7)
    w.add_int64("x.i64", -5)
    w.add_float32("x.f32", 0.25)
    w.add_bool("x.bool", True)
    w.add_string("x.str", "héllo")
    w.add_array("x.ints", [1, 2, 3])
    w.add_array("x.strs", ["a", "bc"])
    w.add_tensor("f32", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("f16", np.arange(6, dtype=np.float16).reshape(2, 3))
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)
    for name, qtype in (("q8", gguf.GGMLQuantizationType.Q8_0), ("q4", gguf.GGMLQuantizationType.Q4_0)):
        w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        w.add_tensor(name + ".ref", gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print("ok")


# Each type: (block values, block bytes, byte offsets of its fp16 scales).
QUANT_LAYOUTS = {
    "Q4_1": (32, 20, (0, 2)), "Q5_0": (32, 22, (0,)), "Q5_1": (32, 24, (0, 2)), "IQ4_NL": (32, 18, (0,)),
    "Q2_K": (256, 84, (80, 82)), "Q3_K": (256, 110, (108,)), "Q4_K": (256, 144, (0, 2)),
    "Q5_K": (256, 176, (0, 2)), "Q6_K": (256, 210, (208,)), "IQ4_XS": (256, 136, (0,)),
}


def cmd_quants(path):
    """Random blocks of every type brigade dequantizes (finite fp16 scales, every
    other byte random), with gguf-py's dequantization of each as NAME.ref."""
    gguf = need("gguf")
    import numpy as np

    rng = np.random.default_rng(7)
    w = gguf.GGUFWriter(path, "llama")
    for name, (values, nbytes, scales) in QUANT_LAYOUTS.items():
        qtype = getattr(gguf.GGMLQuantizationType, name)
        rows, blocks = 3, 2
        raw = rng.integers(0, 256, size=(rows, blocks, nbytes), dtype=np.uint8)
        for at in scales:
            halves = (rng.standard_normal((rows, blocks)) * 0.05).astype(np.float16)
            raw[:, :, at:at + 2] = halves.view(np.uint8).reshape(rows, blocks, 2)
        raw = raw.reshape(rows, blocks * nbytes)
        w.add_tensor(name, raw, raw_dtype=qtype)
        w.add_tensor(name + ".ref", gguf.quants.dequantize(raw, qtype).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print("ok")


def cmd_llamaquant(job_path):
    """llama.cpp's own quantizer on brigade's exports: job = [{"in", "out", "ftype"}]
    (ftype: Q4_K_M, Q5_K_M, Q6_K, ...); prints each output's tensor types."""
    llama_cpp = need("llama_cpp")
    gguf = need("gguf")
    out = []
    for item in json.load(open(job_path)):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + item["ftype"])
        params.nthread = 1
        rc = llama_cpp.llama_model_quantize(item["in"].encode(), item["out"].encode(), params)
        if rc != 0:
            sys.exit(f"llama_model_quantize returned {rc} for {item}")
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(item["out"]).tensors}
        out.append({"out": item["out"], "types": types})
    print(json.dumps(out))


def cmd_tokenize(job_path):
    """llama.cpp's tokenizer on GGUF vocabularies: job = [{"path", "texts"}]; prints
    the ids of each text (no BOS, special tokens not parsed)."""
    llama_cpp = need("llama_cpp")
    out = []
    for item in json.load(open(job_path)):
        llm = llama_cpp.Llama(model_path=item["path"], vocab_only=True, verbose=False)
        out.append([llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in item["texts"]])
    print(json.dumps(out))


def cmd_llama(job_path):
    need("numpy")
    llama_cpp = need("llama_cpp")
    import numpy as np

    with open(job_path) as f:
        job = json.load(f)
    out = []
    for item in job:
        # F32 KV cache: llama.cpp's default F16 cache would round K and V.
        llm = llama_cpp.Llama(model_path=item["path"], n_ctx=item.get("n_ctx", 256), n_batch=256,
                              logits_all=True, verbose=False, n_threads=1, n_threads_batch=1,
                              type_k=0, type_v=0, seed=0)
        result = {}
        prompt = item.get("prompt")
        if prompt:
            llm.reset()
            llm.eval(prompt)
            greedy = []
            for _ in range(item["new_tokens"]):
                token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                greedy.append(token)
                llm.eval([token])
            result["greedy"] = greedy
        sequence = item.get("sequence")
        if sequence:
            llm.reset()
            llm.eval(sequence)
            result["argmax"] = [int(i) for i in np.argmax(llm.scores[: len(sequence)], axis=-1)]
        out.append(result)
        del llm
    print(json.dumps(out))


def main():
    if len(sys.argv) != 3:
        print(__doc__)
        sys.exit(2)
    command, arg = sys.argv[1], sys.argv[2]
    {"quant": cmd_quant, "inspect": cmd_inspect, "write": cmd_write, "quants": cmd_quants, "llamaquant": cmd_llamaquant, "tokenize": cmd_tokenize, "llama": cmd_llama}[command](arg)


if __name__ == "__main__":
    main()
