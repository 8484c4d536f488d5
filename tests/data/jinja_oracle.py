"""transformers' side of tests/data/jinja_test.cpp (no downloads).

  jinja_oracle.py WORKDIR

Reads WORKDIR/request.json:
  {"special_tokens": {"bos_token": ..., "eos_token": ..., "unk_token": ...},
   "templates": {name: jinja source},
   "cases": [{"template": name, "messages": [...], "tools": [...] or null,
              "add_generation_prompt": bool, "kwargs": {...}, "spans": bool}]}
renders every case with apply_chat_template(..., tokenize=False) on a tokenizer built
in memory, and writes WORKDIR/response.json: one {"text": ...} or {"error": ...} per
case; with "spans", also "spans": the byte ranges of the {% generation %} blocks.

Results go to files, not stdout: transformers may print warnings.
"""
import json
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tokenizers  # noqa: E402
import transformers  # noqa: E402
from transformers.utils.chat_template_utils import render_jinja_template  # noqa: E402


def main(workdir):
    with open(os.path.join(workdir, "request.json"), encoding="utf-8") as f:
        request = json.load(f)
    special = request["special_tokens"]
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel({special["unk_token"]: 0},
                                                                          unk_token=special["unk_token"])),
        **special)
    results = []
    for case in request["cases"]:
        template = request["templates"][case["template"]]
        try:
            text = tokenizer.apply_chat_template(
                case["messages"], tools=case["tools"], add_generation_prompt=case["add_generation_prompt"],
                chat_template=template, tokenize=False, **case["kwargs"])
            result = {"text": text}
            if case.get("spans"):
                # apply_chat_template only reports spans as token masks; ask the renderer for the
                # character spans, with the same inputs apply_chat_template gives it.
                messages = [{k: v for k, v in m.items() if v is not None} for m in case["messages"]]
                rendered, spans = render_jinja_template(
                    conversations=[messages], tools=case["tools"], chat_template=template,
                    return_assistant_tokens_mask=True, add_generation_prompt=case["add_generation_prompt"],
                    **{**tokenizer.special_tokens_map, **case["kwargs"]})
                assert rendered[0] == text
                to_bytes = lambda i: len(text[:i].encode("utf-8"))
                result["spans"] = [[to_bytes(b), to_bytes(e)] for b, e in spans[0]]
        except Exception as e:  # the C++ side must fail on the same cases
            result = {"error": f"{type(e).__name__}: {e}"}
        results.append(result)
    with open(os.path.join(workdir, "response.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, ensure_ascii=False)


if __name__ == "__main__":
    main(sys.argv[1])
