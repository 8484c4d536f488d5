"""Byte-level BPE encode speed: brigade (bench_tokenizer) vs Hugging Face tokenizers.

Both sides encode the same documents with the same tokenizer.json on one thread:
brigade encodes document by document; HF runs encode_batch_fast (no offsets, its
fastest path) and encode_batch over the whole list with RAYON_NUM_THREADS=1, so its
batch runs on one thread. Each repetition loads a fresh tokenizer (empty word
cache: "cold"), encodes everything, then encodes everything again ("warm"). Medians
over --reps repetitions; the ids are checked to be identical (checksum).

  .venv/bin/python bench/tokenizer.py [--mb 4] [--reps 5] [--tokenizer tokenizer.json]
      [--binary build/bench/bench_tokenizer]

Without --tokenizer, a Qwen2-style tokenizer (NFC, Qwen2 split regex, ByteLevel)
with --vocab ids is trained with HF on the first MB of the generated corpus.
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

os.environ["RAYON_NUM_THREADS"] = "1"  # before tokenizers is imported
os.environ["TOKENIZERS_PARALLELISM"] = "true"

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
         r"\s*[\r\n]+|\s+(?!\S)|\s+")

POOLS = {
    "en": ("the of and to in is was for on that with as by at from his her they this which have are "
           "training model data language tokenizer performance throughput encode decode compute memory "
           "people government between through during including however system number").split(),
    "ja": "日本 東京 言語 モデル 学習 データ です ます した これ それ ひらがな カタカナ 漢字 計算 速度 文章 今日 明日".split(),
    "zh": "中文 文本 测试 这是 一个 句子 我们 正在 训练 分词器 语言 模型 数据 计算 速度 北京 上海".split(),
    "ko": "한국어 텍스트 입니다 안녕하세요 오늘 날씨 좋네요 학습 모델 데이터 계산 속도".split(),
    "code": ["def", "return", "for", "in", "if", "else:", "x", "y", "=", "+=", "(", ")", "{", "}", "[i]",
             "self.", "int", "std::vector<int>", "#include", "//", "0", "1", "nullptr", "\n    ", "\n\t"],
    "emoji": ["👨‍👩‍👧‍👦", "👍🏽", "🇯🇵", "❤️", "🙂", "🚀", "👩🏻‍💻"],
}


def make_docs(megabytes, seed=0):
    rng = random.Random(seed)
    docs, total = [], 0
    while total < megabytes * 1e6:
        parts = []
        while sum(len(p) for p in parts) < 2000:
            lang = rng.choices(list(POOLS), weights=[50, 12, 12, 8, 15, 3])[0]
            words = [rng.choice(POOLS[lang]) for _ in range(rng.randint(4, 20))]
            sep = "" if lang in ("ja", "zh") else " "
            sentence = sep.join(words)
            if lang == "en":
                sentence = sentence.capitalize() + rng.choice([".", ",", "!", "?", " -", ":"])
            if rng.random() < 0.2:
                sentence += " " + str(rng.randint(0, 10 ** rng.randint(1, 7)))
            parts.append(sentence + rng.choice([" ", " ", "\n", "\n\n", "  "]))
        doc = "".join(parts)
        docs.append(doc)
        total += len(doc.encode())
    return docs


def train_tokenizer(docs, vocab, path):
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    sample, size = [], 0
    for d in docs:
        if size > 1e6:
            break
        sample.append(d)
        size += len(d.encode())
    tok.train_from_iterator(sample, trainer)
    tok.save(path)


def checksum(batches):
    c = 0
    for ids in batches:
        for i in ids:
            c = (c * 1000003 + i) & 0xFFFFFFFFFFFFFFFF
    return c


def hf_side(path, docs, reps, nbytes, method):
    cold, warm, ids = [], [], None
    for _ in range(reps):
        tok = Tokenizer.from_file(path)
        encode = getattr(tok, method)
        for rates in (cold, warm):
            start = time.perf_counter()
            encodings = encode(docs, add_special_tokens=False)
            rates.append(nbytes / 1e6 / (time.perf_counter() - start))
        ids = [e.ids for e in encodings]
    return statistics.median(cold), statistics.median(warm), ids


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=4.0)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--tokenizer", help="an existing tokenizer.json (default: train one)")
    p.add_argument("--binary", default=os.path.join(os.path.dirname(__file__), "..", "build", "bench", "bench_tokenizer"))
    args = p.parse_args()

    docs = make_docs(args.mb)
    nbytes = sum(len(d.encode()) for d in docs)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.tokenizer or os.path.join(tmp, "tokenizer.json")
        if not args.tokenizer:
            train_tokenizer(docs, args.vocab, path)
        docs_path = os.path.join(tmp, "docs.json")
        with open(docs_path, "w", encoding="utf-8") as f:
            json.dump(docs, f, ensure_ascii=False)
        run = subprocess.run([args.binary, path, docs_path, "--reps", str(args.reps), "--train", str(args.vocab)],
                             capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"bench_tokenizer failed:\n{run.stderr}")
        brigade = json.loads(run.stdout)
        results = {"encode_batch_fast": None, "encode_batch": None}
        for method in list(results):
            if hasattr(Tokenizer, method):
                results[method] = hf_side(path, docs, args.reps, nbytes, method)

    print(f"{len(docs)} documents, {nbytes / 1e6:.2f} MB, {brigade['tokens']} tokens, one thread, "
          f"median of {args.reps}")
    print("| side | cold MB/s | warm MB/s | ids equal |")
    print("|---|---|---|---|")
    print(f"| brigade | {brigade['cold_mb_s_median']:.2f} | {brigade['warm_mb_s_median']:.2f} | |")
    best = None
    for method, r in results.items():
        if r is None:
            continue
        cold, warm, ids = r
        same = checksum(ids) == brigade["checksum"] and sum(map(len, ids)) == brigade["tokens"]
        print(f"| HF {method} | {cold:.2f} | {warm:.2f} | {'yes' if same else 'NO'} |")
        if best is None or warm > best[1]:
            best = (cold, warm, method)
    print(f"brigade train_bpe on the same {nbytes / 1e6:.2f} MB to {brigade['train_vocab']} ids: "
          f"{brigade['train_seconds']:.2f} s")
    if best:
        print(f"ratio brigade/HF ({best[2]}): cold {brigade['cold_mb_s_median'] / best[0]:.2f}x, "
              f"warm {brigade['warm_mb_s_median'] / best[1]:.2f}x")


if __name__ == "__main__":
    main()
