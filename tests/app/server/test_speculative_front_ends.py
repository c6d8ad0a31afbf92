"""`--speculative ngram` on the command line and the server: same greedy text, counts shown."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
from server_proc import start_server

LLMAPP = [sys.executable, "-m", "llmapp.app.cli"]
EDIT = (
    "Rewrite with type hints, code only:\n"
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n"
)


def run(*extra: str) -> dict:
    cmd = [*LLMAPP, "run", "qwen2.5-coder:0.5b", EDIT, "--temperature", "0", "--threads", "1",
           "--max-tokens", "48", "--json", *extra]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.real_model
def test_run_with_speculation_gives_the_same_text() -> None:
    plain = run()
    spec = run("--speculative", "ngram", "--speculative-tokens", "6")
    assert spec["token_ids"] == plain["token_ids"]
    assert "speculative" not in plain
    assert 0 < spec["speculative"]["accepted"] <= spec["speculative"]["drafted"]
    bad = subprocess.run(
        [*LLMAPP, "run", "x", "y", "--speculative", "ngram", "--speculative-tokens", "99"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "--speculative-tokens must be in [1, 32]" in bad.stderr


@pytest.mark.real_model
def test_serve_with_speculation_counts_drafts() -> None:
    server = start_server("qwen2.5-coder:0.5b", "--speculative", "ngram")
    try:
        body = {"messages": [{"role": "user", "content": EDIT}], "temperature": 0,
                "max_tokens": 48}  # fmt: skip
        r = httpx.post(server.v1 + "/chat/completions", json=body, timeout=120)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
        text = httpx.get(server.url + "/metrics").text
        accepted = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("llmapp:spec_decode_num_accepted_tokens_total{")
        ]
        assert accepted and accepted[0] > 0
    finally:
        server.stop()
