"""The reference runtimes' side of tests/e2e/export_test.cpp.

  llama GGUF PROMPT N        llama.cpp (llama-cpp-python): the prompt tokenized by the
                             file's own tokenizer (BOS added as the file says), greedy N
                             tokens -> {"ids": [...], "text": "..."}
  hf DIR PROMPT N            transformers: AutoTokenizer + AutoModelForCausalLM from DIR,
                             greedy N tokens -> {"ids": [...], "text": "..."}
  tokenize GGUF TEXTS.json   llama.cpp's ids for each string -> [[...], ...]

Exit code 3: a package is missing (the test skips).
"""
import json
import sys

mode = sys.argv[1]
try:
    if mode in ("llama", "tokenize"):
        from llama_cpp import Llama
    else:
        import torch
        import transformers
except ImportError as e:
    print(f"missing: {e}")
    sys.exit(3)

if mode == "llama":
    llm = Llama(model_path=sys.argv[2], n_ctx=512, n_threads=1, verbose=False)
    ids = llm.tokenize(sys.argv[3].encode(), special=False)  # add_bos from the file
    out = llm.create_completion(sys.argv[3], max_tokens=int(sys.argv[4]), temperature=0.0, top_k=1)
    print(json.dumps({"ids": ids, "text": out["choices"][0]["text"]}))
elif mode == "hf":
    tok = transformers.AutoTokenizer.from_pretrained(sys.argv[2])
    model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32).eval()
    ids = tok(sys.argv[3], return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=int(sys.argv[4]), do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    print(json.dumps({"ids": ids[0].tolist(), "text": tok.decode(out[0][ids.shape[1]:], skip_special_tokens=True)}))
elif mode == "tokenize":
    llm = Llama(model_path=sys.argv[2], n_ctx=64, n_threads=1, verbose=False, vocab_only=True)
    texts = json.load(open(sys.argv[3]))
    print(json.dumps([llm.tokenize(t.encode(), add_bos=False, special=False) for t in texts]))
else:
    sys.exit(f"unknown mode {mode}")
