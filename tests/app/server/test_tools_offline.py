"""Tool-call grammar and parsing, offline: what the constraint accepts, and how replies (whole or
streamed in any split) turn into OpenAI tool calls."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tiny_model import write_chat_model

from llmapp.app.server.errors import APIError
from llmapp.app.server.tools import (
    StreamSplitter,
    bare_calls,
    calls_grammar,
    chosen,
    plan,
    split_reply,
)
from llmapp.runtime.files.gguf_file import GGUFFile
from llmapp.runtime.text.constrain import Constraint
from llmapp.runtime.text.tokenizer import Tokenizer

FUNCTIONS = {
    "add": {"name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}},
    "echo": {"name": "echo", "parameters": {"type": "object", "properties": {
        "text": {"type": "string", "maxLength": 10}}, "required": ["text"]}},
}  # fmt: skip
TOOLS = [{"type": "function", "function": f} for f in FUNCTIONS.values()]
CALL_ADD = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
CALL_ECHO = '<tool_call>\n{"name": "echo", "arguments": {"text": "hi"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = write_chat_model(tmp_path_factory.mktemp("tools") / "tiny.gguf")
    with GGUFFile(path) as gguf:
        return Tokenizer.from_gguf(gguf)


def accepts(grammar: str, tokenizer: Tokenizer, text: str, trigger: str | None = None) -> bool:
    constraint = Constraint(grammar, tokenizer, trigger)
    ids = tokenizer.encode(text, add_bos=False)
    if tokenizer.token_piece(ids[0]) == " ":
        ids = ids[1:]  # the SentencePiece-style vocabulary's space prefix
    try:
        for i in range(len(ids) + 1):
            mask = constraint.allowed(ids[:i])
            if mask is not None and i < len(ids) and not mask[ids[i]]:
                return False
    except Exception:  # noqa: BLE001 - a rejected token is a "no"
        return False
    return constraint.is_complete


def test_parallel_calls_are_allowed_only_when_asked(tokenizer: Tokenizer) -> None:
    both = calls_grammar(FUNCTIONS, list(FUNCTIONS), parallel=True, lazy=False)
    assert accepts(both, tokenizer, CALL_ADD + "\n" + CALL_ECHO)
    one = calls_grammar(FUNCTIONS, list(FUNCTIONS), parallel=False, lazy=False)
    assert accepts(one, tokenizer, CALL_ADD)
    assert not accepts(one, tokenizer, CALL_ADD + "\n" + CALL_ECHO)


def test_calls_must_fit_the_named_function(tokenizer: Tokenizer) -> None:
    named = calls_grammar(FUNCTIONS, ["echo"], parallel=True, lazy=False)
    assert accepts(named, tokenizer, CALL_ECHO)
    assert not accepts(named, tokenizer, CALL_ADD)
    bad_args = '<tool_call>\n{"name": "add", "arguments": {"a": "x", "b": 2}}\n</tool_call>'
    assert not accepts(named, tokenizer, bad_args)
    assert not accepts(calls_grammar(FUNCTIONS, ["add"], True, False), tokenizer, bad_args)


def test_auto_lets_text_flow_until_a_call_opens(tokenizer: Tokenizer) -> None:
    lazy = calls_grammar(FUNCTIONS, list(FUNCTIONS), parallel=True, lazy=True)
    constraint = Constraint(lazy, tokenizer, "<tool_call>")
    free = tokenizer.encode("hello world, anything goes", add_bos=False)[1:]
    assert constraint.allowed(free) is None  # no mask before the trigger
    assert accepts(lazy, tokenizer, "Let me check. " + CALL_ADD, "<tool_call>")
    bad = 'Sure <tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>'
    assert not accepts(lazy, tokenizer, bad, "<tool_call>")


def test_whole_replies_split_into_content_and_calls() -> None:
    content, calls = split_reply("Checking.\n" + CALL_ADD + "\n" + CALL_ECHO, list(FUNCTIONS))
    assert content == "Checking."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("add", {"a": 1, "b": 2}),
        ("echo", {"text": "hi"}),
    ]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert len({c["id"] for c in calls}) == 2
    assert split_reply("no calls here", list(FUNCTIONS)) == ("no calls here", [])


def test_untagged_calls_of_known_functions() -> None:
    fenced = '```json\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n```'
    assert [c["function"]["name"] for c in bare_calls(fenced, ["add"])] == ["add"]
    lines = '{"name": "add", "arguments": {}}\n{"name": "echo", "arguments": {}}'
    assert len(bare_calls(lines, list(FUNCTIONS))) == 2
    assert bare_calls('{"name": "rm_rf", "arguments": {}}', list(FUNCTIONS)) == []
    assert bare_calls('{"name": "add"}', list(FUNCTIONS)) == []  # no arguments: not a call
    assert bare_calls("The answer is {1, 2}", list(FUNCTIONS)) == []


REPLY = "Let me look.\n" + CALL_ADD + "\nand " + CALL_ECHO + " done <tool"


@given(st.lists(st.integers(1, len(REPLY) - 1), max_size=12))
def test_streamed_replies_split_the_same_way_however_cut(cuts: list[int]) -> None:
    bounds = [0, *sorted(set(cuts)), len(REPLY)]
    splitter = StreamSplitter(list(FUNCTIONS))
    content, calls = "", []
    for start, end in zip(bounds, bounds[1:], strict=False):
        text, done = splitter.feed(REPLY[start:end])
        content += text
        calls += done
    rest, late = splitter.finish()
    content += rest
    calls += late
    assert content == "Let me look.\n\nand  done <tool"
    assert [c["function"]["name"] for c in calls] == ["add", "echo"]


def test_tool_choice_and_plans() -> None:
    assert chosen(None, FUNCTIONS) == ("auto", ["add", "echo"])
    assert chosen({"type": "function", "function": {"name": "echo"}}, FUNCTIONS)[1] == ["echo"]
    with pytest.raises(APIError, match="unknown function"):
        chosen({"type": "function", "function": {"name": "nope"}}, FUNCTIONS)
    with pytest.raises(APIError, match="tools\\[0\\]"):
        plan([], [{"type": "retrieval"}], "auto", True, False)
    messages = [
        {"role": "user", "content": "add"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"},
    ]  # fmt: skip
    generic = plan(messages, TOOLS, "auto", True, template_has_tools=False)
    assert generic.messages[0]["role"] == "system" and "<tools>" in generic.messages[0]["content"]
    assert '"arguments": {"a": 1, "b": 2}' in generic.messages[2]["content"]
    assert generic.messages[3] == {
        "role": "user",
        "content": "<tool_response>\n3\n</tool_response>",
    }
    own = plan(messages, TOOLS, "required", True, template_has_tools=True)
    assert own.trigger is None and own.template_tools is not None
    assert own.messages[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1, "b": 2}
    none = plan(messages, TOOLS, "none", True, template_has_tools=True)
    assert none.grammar is None and none.template_tools is None
