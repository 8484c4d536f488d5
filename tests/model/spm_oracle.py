"""SentencePiece oracle for brigade's GGUF SentencePiece tokenizer (data/spm.h).

    spm_oracle.py DIR

Reads DIR/request.json {"corpus": [...], "texts": [...], "vocab_size": N}, trains a
SentencePiece BPE model with byte fallback on the corpus, writes DIR/spm.gguf the
way llama.cpp's converter lays out a SentencePiece vocabulary (tokens, scores,
token types, add_space_prefix, role ids; llama metadata, no tensors), and writes
DIR/response.json with, per text, the ids of llama.cpp's tokenizer on that file
(plain and with special tokens parsed) and of SentencePiece itself.
"""
import json
import os
import sys

import gguf
import llama_cpp
import sentencepiece as spm


def main():
    out = sys.argv[1]
    request = json.load(open(os.path.join(out, "request.json"), encoding="utf-8"))
    corpus_file = os.path.join(out, "corpus.txt")
    with open(corpus_file, "w", encoding="utf-8") as f:
        for line in request["corpus"]:
            f.write(line.replace("\n", " ") + "\n")
    prefix = os.path.join(out, "spm")
    spm.SentencePieceTrainer.train(
        input=corpus_file, model_prefix=prefix, model_type="bpe", vocab_size=request["vocab_size"],
        byte_fallback=True, character_coverage=0.9995, user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")

    # llama.cpp's token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(2)
        elif sp.is_control(i):
            types.append(3)
        elif sp.is_byte(i):
            types.append(6)
        elif sp.is_unused(i):
            types.append(5)
        elif tokens[-1] in ("<|im_start|>", "<|im_end|>"):
            types.append(4)
        else:
            types.append(1)

    path = os.path.join(out, "spm.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("spm-oracle")
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(16)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(True)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    response = {"llama_cpp": [], "llama_cpp_special": [], "sentencepiece": []}
    for text in request["texts"]:
        b = text.encode("utf-8")
        response["llama_cpp"].append(llm.tokenize(b, add_bos=False, special=False))
        response["llama_cpp_special"].append(llm.tokenize(b, add_bos=False, special=True))
        response["sentencepiece"].append(sp.encode(text))
    json.dump(response, open(os.path.join(out, "response.json"), "w"))


if __name__ == "__main__":
    main()
