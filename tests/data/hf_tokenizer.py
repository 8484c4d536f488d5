"""Hugging Face side of tests/data/bpe_test.cpp (no downloads).

  hf_tokenizer.py train WORKDIR
      Trains byte-level BPE tokenizers with `tokenizers` on WORKDIR/corpus.txt in
      three pre-tokenizer styles (qwen2, llama3, gpt2), saves WORKDIR/<style>/
      tokenizer.json, and writes HF's ids and decodings of the strings in
      WORKDIR/inputs.json to WORKDIR/expected.json.

  hf_tokenizer.py check WORKDIR
      Reads WORKDIR/request.json ({"dirs": [...], "inputs": [...], "conversations":
      [[{"role", "content"}, ...], ...], "chat_dirs": {family: dir}}), loads every dir
      with tokenizers.Tokenizer.from_file and with transformers' AutoTokenizer, and
      writes their ids and the chat renderings to WORKDIR/response.json.

Results go to files, not stdout: transformers may print warnings.
"""
import json
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
         r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
          r"\s*[\r\n]+|\s+(?!\S)|\s+")


def build(style):
    tok = Tokenizer(models.BPE())
    if style == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    elif style == "llama3":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                    "<|eot_id|>"]
    elif style == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
        specials = ["<|endoftext|>"]
    else:
        raise SystemExit(f"unknown style {style}")
    tok.decoder = decoders.ByteLevel()
    return tok, specials


def train(workdir):
    with open(os.path.join(workdir, "corpus.txt"), encoding="utf-8") as f:
        corpus = f.read().split("\n\n")
    with open(os.path.join(workdir, "inputs.json"), encoding="utf-8") as f:
        inputs = json.load(f)
    expected = {}
    for style in ("qwen2", "llama3", "gpt2"):
        tok, specials = build(style)
        trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(corpus, trainer)
        if style == "qwen2":
            tok.add_tokens([AddedToken("<tool>", special=False, normalized=True)])
        out = os.path.join(workdir, style)
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "tokenizer.json")
        tok.save(path)
        if style == "llama3":
            # Llama 3 ships with ignore_merges: a word that is a token stays whole.
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            data["model"]["ignore_merges"] = True
            with open(path, "w", encoding="utf-8") as f:
                json.dump(data, f, ensure_ascii=False)
            tok = Tokenizer.from_file(path)
        ids = [tok.encode(text, add_special_tokens=False).ids for text in inputs]
        expected[style] = {
            "ids": ids,
            "decoded": [tok.decode(i, skip_special_tokens=False) for i in ids],
        }
    with open(os.path.join(workdir, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, ensure_ascii=False)


def check(workdir):
    from transformers import AutoTokenizer

    with open(os.path.join(workdir, "request.json"), encoding="utf-8") as f:
        request = json.load(f)
    inputs = request["inputs"]
    response = {"dirs": {}, "chat": {}}
    for d in request["dirs"]:
        tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
        auto = AutoTokenizer.from_pretrained(d)
        response["dirs"][d] = {
            "tokenizers": [tok.encode(t, add_special_tokens=False).ids for t in inputs],
            "transformers": [auto.encode(t, add_special_tokens=False) for t in inputs],
            "eos_token": auto.eos_token,
            "bos_token": auto.bos_token,
        }
    for family, d in request["chat_dirs"].items():
        auto = AutoTokenizer.from_pretrained(d)
        response["chat"][family] = [[auto.apply_chat_template(c, tokenize=False, add_generation_prompt=g)
                                     for g in (False, True)] for c in request["conversations"]]
    with open(os.path.join(workdir, "response.json"), "w", encoding="utf-8") as f:
        json.dump(response, f, ensure_ascii=False)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("train", "check"):
        raise SystemExit(__doc__)
    {"train": train, "check": check}[sys.argv[1]](sys.argv[2])
