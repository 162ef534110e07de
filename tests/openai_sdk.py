"""The official `openai` Python package against a real EdgeCoder node (run by tests/ide.rs).

Environment: EC_BASE_URL (http://host:port/v1), EC_API_KEY, EC_MODEL. Exits non-zero, with the
failed check printed, on any mismatch.
"""

import os
import sys

import json
import urllib.error
import urllib.request
import openai
from openai import OpenAI

base = os.environ["EC_BASE_URL"]
key = os.environ["EC_API_KEY"]
model = os.environ["EC_MODEL"]
client = OpenAI(base_url=base, api_key=key, max_retries=0, timeout=60)


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


# List models.
ids = [m.id for m in client.models.list().data]
check(model in ids, f"models.list has {model}: {ids}")

# Chat, not streamed.
messages = [{"role": "user", "content": "write a python function"}]
r = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0, seed=3)
text = r.choices[0].message.content
check(r.object == "chat.completion", "chat object type")
check(isinstance(text, str) and len(text) > 0, f"chat text: {text!r}")
check(r.choices[0].finish_reason in ("stop", "length"), f"finish_reason {r.choices[0].finish_reason}")
check(r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, "usage adds up")
check(r.usage.completion_tokens > 0, "completion tokens counted")

# Chat, streamed: the chunks reassemble to the same text for the same seed.
parts = []
finish = None
usage = None
stream = client.chat.completions.create(
    model=model, messages=messages, max_tokens=16, temperature=0, seed=3,
    stream=True, stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            parts.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
check("".join(parts) == text, f"streamed text equals the non-streamed text: {''.join(parts)!r} vs {text!r}")
check(finish == r.choices[0].finish_reason, "same finish reason when streamed")
check(usage is not None and usage.completion_tokens == r.usage.completion_tokens, "usage chunk in the stream")

# Completions with a suffix (fill-in-the-middle).
c = client.completions.create(model=model, prompt="def add(x, y):\n    return ", suffix="\n\nprint(add(1, 2))", max_tokens=8, temperature=0)
check(c.object == "text_completion", "completion object type")
check(isinstance(c.choices[0].text, str), "completion text")

# Wrong key: 401.
try:
    OpenAI(base_url=base, api_key="ec-wrong", max_retries=0).models.list()
    check(False, "wrong key refused")
except openai.AuthenticationError as e:
    check(e.status_code == 401, "wrong key gets 401 AuthenticationError")

# Unknown model: 404.
try:
    client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=4)
    check(False, "unknown model refused")
except openai.NotFoundError as e:
    check(e.status_code == 404, "unknown model gets 404 NotFoundError")

# Malformed body: 400; oversized body: 413 (raw HTTP: the SDK never sends these).
def raw_post(path, body):
    req = urllib.request.Request(f"{base}{path}", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (ConnectionResetError, BrokenPipeError, urllib.error.URLError) as e:
        # A server may close the connection after answering 413 without reading the body.
        return getattr(e, "code", None), b""


status, body = raw_post("/chat/completions", b"{not json")
check(status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error", f"malformed JSON gets 400: {body!r}")
status, body = raw_post("/chat/completions", b"{\"x\":\"" + b"a" * (2 << 20) + b"\"}")
check(status == 413, f"oversized body gets 413: {status}")

print("all openai SDK checks passed")
