"""Tool calling: tools into the prompt, calls out of the reply, and the grammar between.

Calls use Qwen2.5's format, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`: a
template with its own tools section (Qwen2.5's) renders the tools itself; for the others the
tools go into a system message that asks for the same format. The calls are constrained by the
tools' parameter schemas: from the first token with tool_choice "required" or a named
function, and from the moment the model opens a call with "auto".
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from llmapp.app.server.errors import APIError
from llmapp.runtime.text.constrain import WHITESPACE, bounded

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL_RE = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)

GENERIC_PROMPT = """You can call functions. Their JSON Schema signatures:
<tools>
{tools}
</tools>
To call a function, answer with one block per call and nothing else:
<tool_call>
{{"name": "<function name>", "arguments": <the arguments as a JSON object>}}
</tool_call>
When no function helps, answer normally."""


@dataclass(frozen=True)
class ToolPlan:
    messages: list[dict[str, Any]]
    template_tools: list[dict[str, Any]] | None  # for templates with a tools section
    grammar: str | None
    trigger: str | None  # the grammar starts after this text ("auto"); None: at once


def _functions(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise APIError(400, f"tools[{i}] must be a function tool", "tools")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise APIError(400, f"tools[{i}].function.name must be 1-64 of [A-Za-z0-9_.-]", "tools")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise APIError(400, f"tools[{i}].function.parameters must be an object", "tools")
        out[name] = {**fn, "parameters": params}
    return out


def chosen(tool_choice: Any, functions: dict[str, dict[str, Any]]) -> tuple[str, list[str]]:
    """(mode, functions the call may name): mode is none, auto, or required."""
    if tool_choice is None or tool_choice in ("auto", "none", "required"):
        mode = tool_choice or "auto"
        return mode, list(functions)
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if name not in functions:
            raise APIError(400, f"tool_choice names an unknown function: {name!r}", "tool_choice")
        return "required", [name]
    raise APIError(400, f"tool_choice {tool_choice!r} is not understood", "tool_choice")


def calls_grammar(functions: dict[str, dict[str, Any]], names: list[str], parallel: bool,
                  lazy: bool) -> str:  # fmt: skip
    """A Lark grammar (llguidance) for one or more calls of the named functions."""
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": n}, "arguments": functions[n]["parameters"]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for n in names
    ]
    schema = bounded(variants[0] if len(variants) == 1 else {"anyOf": variants})
    schema["x-guidance"] = {"whitespace_pattern": WHITESPACE}
    more = f'(NL? "{OPEN}" call)*' if parallel else ""
    head = "call" if lazy else f'"{OPEN}" call'
    return "\n".join([
        f"start: {head} {more}",
        f'call: NL? body NL? "{CLOSE}"',
        f"body: %json {json.dumps(schema)}",
        "NL: /[ \\t]*\\n[ \\t\\n]*/",
    ])  # fmt: skip


def plan(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]],
    tool_choice: Any,
    parallel: bool,
    template_has_tools: bool,
) -> ToolPlan:
    functions = _functions(tools)
    mode, names = chosen(tool_choice, functions)
    if mode == "none" or not functions:
        return ToolPlan(_as_plain(messages), None, None, None)
    lazy = mode == "auto"
    grammar = calls_grammar(functions, names, parallel, lazy)
    trigger = OPEN if lazy else None
    if template_has_tools:
        wire = [{"type": "function", "function": functions[n]} for n in functions]
        return ToolPlan(_for_template(messages), wire, grammar, trigger)
    listing = "\n".join(json.dumps(functions[n]) for n in functions)
    system = GENERIC_PROMPT.format(tools=listing)
    merged = _as_plain(messages)
    if merged and merged[0]["role"] == "system":
        merged[0] = {**merged[0], "content": f"{merged[0]['content']}\n\n{system}"}
    else:
        merged.insert(0, {"role": "system", "content": system})
    return ToolPlan(merged, None, grammar, trigger)


def _arguments_object(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def _for_template(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Templates render call arguments with tojson: give them objects, not JSON text."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            m = {**m, "tool_calls": [
                {**c, "function": {**c.get("function", {}),
                                   "arguments": _arguments_object(
                                       c.get("function", {}).get("arguments"))}}
                for c in calls
            ]}  # fmt: skip
        out.append(m)
    return out


def _as_plain(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Calls and results as text, for templates that know no tool roles."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            blocks = [
                OPEN + json.dumps({"name": c["function"]["name"],
                                   "arguments": _arguments_object(c["function"].get("arguments"))})
                + CLOSE
                for c in m["tool_calls"]
            ]  # fmt: skip
            text = "\n".join(filter(None, [m.get("content") or "", *blocks]))
            out.append({"role": "assistant", "content": text})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n"
                                                   "</tool_response>"})  # fmt: skip
        else:
            out.append({k: v for k, v in m.items() if k in ("role", "content")})
    return out


def parse_call(body: str) -> dict[str, Any] | None:
    """An OpenAI tool call from one call's JSON text, or None when it is not one."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments", {})
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": data["name"], "arguments": text},
    }


_FENCE_RE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def bare_calls(text: str, names: list[str]) -> list[dict[str, Any]]:
    """Calls written without the tags, as small models often do: a reply that is nothing but
    JSON objects (one per line, or in a ```json fence) naming known functions."""
    body = text.strip()
    fenced = _FENCE_RE.match(body)
    if fenced:
        body = fenced.group(1)
    try:
        found = json.loads(body)
        objects = found if isinstance(found, list) else [found]
    except json.JSONDecodeError:
        objects = []
        for line in filter(None, (ln.strip() for ln in body.splitlines())):
            try:
                objects.append(json.loads(line))
            except json.JSONDecodeError:
                return []
    calls = []
    for obj in objects:
        if not isinstance(obj, dict) or obj.get("name") not in names or "arguments" not in obj:
            return []
        call = parse_call(json.dumps(obj))
        if call is not None:
            calls.append(call)
    return calls


def split_reply(text: str, names: list[str]) -> tuple[str, list[dict[str, Any]]]:
    """(content outside the calls, the calls) of a whole reply."""
    calls = []
    content = text
    for match in _CALL_RE.finditer(text):
        call = parse_call(match.group(1))
        if call is not None:
            calls.append(call)
            content = content.replace(match.group(0), "", 1)
    if not calls:
        calls = bare_calls(text, names)
        if calls:
            content = ""
    return content.strip(), calls


@dataclass
class StreamSplitter:
    """Streamed text -> (content safe to show now, calls completed now).

    Content that might be the start of `<tool_call>` is held back until it is decided; a call
    is released whole when its closing tag arrives. A reply that opens like JSON is held to
    its end, where it may turn out to be untagged calls.
    """

    names: list[str] = field(default_factory=list)
    held: str = ""
    in_call: bool = False
    bare: bool | None = None  # undecided until the first non-blank character
    calls: list[dict[str, Any]] = field(default_factory=list)

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self.held += text
        if self.bare is None and self.held.strip():
            self.bare = self.held.lstrip()[0] in "{[`"
        if self.bare or self.bare is None:
            return "", []
        content = ""
        done: list[dict[str, Any]] = []
        while True:
            if self.in_call:
                end = self.held.find(CLOSE)
                if end < 0:
                    return content, done
                call = parse_call(self.held[:end].strip())
                if call is not None:
                    done.append(call)
                    self.calls.append(call)
                self.held = self.held[end + len(CLOSE) :]
                self.in_call = False
                continue
            start = self.held.find(OPEN)
            if start >= 0:
                content += self.held[:start]
                self.held = self.held[start + len(OPEN) :]
                self.in_call = True
                continue
            keep = _partial_suffix(self.held, OPEN)
            content += self.held[: len(self.held) - keep]
            self.held = self.held[len(self.held) - keep :]
            return content, done

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """What is left when the reply ends: untagged calls, else text (an unclosed call too)."""
        rest = (OPEN if self.in_call else "") + self.held
        self.held, self.in_call = "", False
        if self.bare:
            calls = bare_calls(rest, self.names)
            if calls:
                self.calls += calls
                return "", calls
            self.bare = False
            content, calls = self.feed(rest)
            return content + self.finish()[0], calls
        return rest, []


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of text that begins tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
