#!/usr/bin/env python3
"""Client side of CliServe (tests/e2e/remote_teacher_test.cpp): talks to a running
`brigade serve` and prints one JSON object of what it saw; the C++ test asserts.

    serve_client.py PORT check   concurrent vs one-at-a-time answers, streaming, bounds
    serve_client.py PORT flood   8 simultaneous requests (a server with a tiny queue)
"""

import json
import sys
import threading
import urllib.error
import urllib.request

PORT = sys.argv[1]
BASE = f"http://127.0.0.1:{PORT}/v1"


def post(path, body, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(BASE + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def completion(body):
    status, text = post("/completions", body)
    assert status == 200, text
    return json.loads(text)["choices"][0]


def stream(path, body):
    """The concatenated text of an SSE answer, its finish_reason, and whether it ended with [DONE]."""
    status, text = post(path, {**body, "stream": True})
    assert status == 200, text
    out, finish, done, events = "", None, False, 0
    for line in text.split("\n"):
        if not line.startswith("data: "):
            continue
        payload = line[len("data: "):]
        if payload == "[DONE]":
            done = True
            continue
        events += 1
        chunk = json.loads(payload)
        for choice in chunk["choices"]:
            out += choice["delta"].get("content", "") if "delta" in choice else choice["text"]
            finish = choice["finish_reason"] or finish
    return {"text": out, "finish_reason": finish, "done": done, "events": events}


def together(bodies):
    results = [None] * len(bodies)

    def run(i):
        results[i] = completion(bodies[i])["text"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def check():
    prompts = [f"Problem: {i}+{i + 3}*2-{i % 4}\n" for i in range(8)]
    greedy = [{"prompt": p, "max_tokens": 12 + 4 * i, "temperature": 0} for i, p in enumerate(prompts)]
    sampled = [{"prompt": p, "max_tokens": 30, "temperature": 1.0, "seed": 100 + i} for i, p in enumerate(prompts)]
    report = {
        "greedy_alone": [completion(b)["text"] for b in greedy],
        "greedy_together": together(greedy),
        "sampled_alone": [completion(b)["text"] for b in sampled],
        "sampled_together": together(sampled),
    }
    plain = completion(greedy[7])
    report["plain"] = {"text": plain["text"], "finish_reason": plain["finish_reason"]}
    report["streamed"] = stream("/completions", greedy[7])
    chat = {"messages": [{"role": "user", "content": prompts[7].strip()}], "max_tokens": 40, "temperature": 0}
    status, text = post("/chat/completions", chat)
    report["chat_plain"] = json.loads(text)["choices"][0]["message"]["content"]
    report["chat_streamed"] = stream("/chat/completions", chat)
    # A stop string from the middle of the greedy answer.
    stop = plain["text"][6:8]
    report["stop"] = stop
    report["stop_plain"] = completion({**greedy[7], "stop": [stop]})["text"]
    report["stop_streamed"] = stream("/completions", {**greedy[7], "stop": [stop]})
    # echo: the prompt comes back first, with its logprobs (the first token has none).
    scored = completion({"prompt": prompts[7], "echo": True, "logprobs": 3, "max_tokens": 0})
    echoed = completion({**greedy[7], "echo": True, "logprobs": 2})
    report["echo"] = {
        "scored_text": scored["text"], "scored_finish": scored["finish_reason"],
        "scored_tokens": len(scored["logprobs"]["tokens"]), "scored_first": scored["logprobs"]["top_logprobs"][0],
        "scored_sizes": sorted({len(t) for t in scored["logprobs"]["top_logprobs"][1:]}),
        "scored_offsets_end": scored["logprobs"]["text_offset"][-1] + len(scored["logprobs"]["tokens"][-1]),
        "text": echoed["text"], "tokens": len(echoed["logprobs"]["tokens"]),
    }
    bad = {}
    bad["echo_stream"] = post("/completions", {"prompt": prompts[0], "stream": True, "echo": True})
    bad["echo_chat"] = post("/chat/completions", {**chat, "echo": True})
    bad["token_range"] = post("/completions", {"prompt": [1, 2, 99999]})
    bad["max_tokens_zero"] = post("/completions", {"prompt": prompts[0], "max_tokens": 0})
    bad["max_tokens"] = post("/completions", {"prompt": prompts[0], "max_tokens": 100000})
    bad["context"] = post("/completions", {"prompt": prompts[0], "max_tokens": 120})
    bad["body"] = post("/completions", None, raw=json.dumps({"prompt": "x" * 5000}).encode())
    bad["stream_logprobs"] = post("/completions", {"prompt": prompts[0], "stream": True, "logprobs": 2})
    bad["not_json"] = post("/completions", None, raw=b"{nope")
    report["bad"] = {k: {"status": s, "body": b} for k, (s, b) in bad.items()}
    print(json.dumps(report))


def flood():
    results = [None] * 8

    def run(i):
        results[i] = post("/completions", {"prompt": f"Problem: {i}+1\n", "max_tokens": 100, "temperature": 1.0,
                                           "seed": i})

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps([{"status": s, "body": b} for s, b in results]))


{"check": check, "flood": flood}[sys.argv[2]]()
