#!/usr/bin/env python3
"""A misbehaving OpenAI-compatible server for the remote-teacher tests (stdlib only).

    faulty_server.py MODE PORT_FILE LOG_FILE [--key KEY] [--port N]

Listens on 127.0.0.1 (port N, default a free one; written to PORT_FILE) and appends one JSON line
per request to LOG_FILE: {"prompt", "authorized"}. MODE:

  error    every request gets HTTP 503 (with a Retry-After of 0)
  flaky    the first request for each prompt gets HTTP 500, later ones succeed
  stall    every request is answered only after 30 s (past any test's timeout)
  garbage  every request gets HTTP 200 with a body that is not JSON
  ok       every request succeeds

A success is a completions (or chat) reply whose text is
"<think>\\nPROMPT</think>\\n\\boxed{7}". With --key, a request without
"Authorization: Bearer KEY" gets HTTP 401.
"""
import argparse
import http.server
import json
import os
import threading
import time

parser = argparse.ArgumentParser()
parser.add_argument("mode", choices=["error", "flaky", "stall", "garbage", "ok"])
parser.add_argument("port_file")
parser.add_argument("log_file")
parser.add_argument("--key")
parser.add_argument("--port", type=int, default=0)
args = parser.parse_args()
mode, port_file, log_file, key = args.mode, args.port_file, args.log_file, args.key
seen = {}
lock = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body, headers=()):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        chat = self.path.endswith("/chat/completions")
        prompt = body["messages"][-1]["content"] if chat else body.get("prompt", "")
        authorized = key is None or self.headers.get("Authorization") == "Bearer " + key
        with lock:
            with open(log_file, "a") as log:
                log.write(json.dumps({"prompt": prompt, "authorized": authorized}) + "\n")
            seen[prompt] = seen.get(prompt, 0) + 1
            attempt = seen[prompt]
        if not authorized:
            return self.reply(401, {"error": {"message": "bad key", "type": "auth"}})
        if mode == "error":
            return self.reply(503, {"error": {"message": "overloaded"}}, [("Retry-After", "0")])
        if mode == "flaky" and attempt == 1:
            return self.reply(500, {"error": {"message": "try again"}})
        if mode == "stall":
            time.sleep(30)
        if mode == "garbage":
            return self.reply(200, b"<html>not json</html>")
        text = "<think>\n" + prompt + "</think>\n\\boxed{7}"
        choice = {"index": 0, "finish_reason": "stop"}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        self.reply(200, {"choices": [choice], "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(text)}})


server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
server.daemon_threads = True
with open(port_file + ".tmp", "w") as f:
    f.write(str(server.server_address[1]) + "\n")
os.replace(port_file + ".tmp", port_file)
server.serve_forever()
