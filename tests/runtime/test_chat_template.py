"""Chat templates: parity with the peer on the real models, the family formats, and the
sandbox that untrusted templates render in."""

from __future__ import annotations

import ctypes
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from tokenizer_models import our_tokenizer, peer_vocab

from llmapp.runtime.errors import TemplateError
from llmapp.runtime.files.gguf_file import GGUFFile
from llmapp.runtime.text import chat_template
from llmapp.runtime.text.chat_template import ChatTemplate, detect_family, encode_prompt
from llmapp.runtime.text.tokenizer import Tokenizer

Messages = list[dict[str, Any]]

CONVERSATIONS: dict[str, Messages] = {
    "single": [{"role": "user", "content": "Hi"}],
    "system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    "multi_turn": [
        {"role": "system", "content": "  Be brief.\n"},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi. How can I help?"},
        {"role": "user", "content": "  Write «quicksort» in Python 🐍\n\n"},
        {"role": "assistant", "content": "def qs(xs): ..."},
        {"role": "user", "content": "Thanks"},
    ],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def template_of(path: Path) -> ChatTemplate:
    with GGUFFile(path) as gguf:
        return ChatTemplate.from_gguf(gguf)


# ---- the real models, against the peer -------------------------------------------------------


@pytest.mark.real_model
@pytest.mark.peer
@pytest.mark.parametrize("model", ["smollm2_path", "qwen2_path"])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gguf_template_matches_llama_cpp_python(
    request: pytest.FixtureRequest, model: str, conversation: str, add_generation_prompt: bool
) -> None:
    fmt = pytest.importorskip("llama_cpp.llama_chat_format")
    path = request.getfixturevalue(model)
    ours = template_of(path)
    peer = peer_vocab(path)
    with GGUFFile(path) as gguf:
        source = gguf.metadata["tokenizer.chat_template"]
    formatter = fmt.Jinja2ChatFormatter(
        source,
        eos_token=peer._model.token_get_text(peer.token_eos()),
        bos_token=peer._model.token_get_text(peer.token_bos()),
        add_generation_prompt=add_generation_prompt,
    )
    messages = CONVERSATIONS[conversation]
    want = formatter(messages=messages).prompt
    assert ours.name == "gguf"
    assert ours.render(messages, add_generation_prompt=add_generation_prompt) == want


@pytest.mark.real_model
@pytest.mark.peer
def test_qwen_tools_match_llama_cpp_python(qwen2_path: Path) -> None:
    fmt = pytest.importorskip("llama_cpp.llama_chat_format")
    ours = template_of(qwen2_path)
    with GGUFFile(qwen2_path) as gguf:
        source = gguf.metadata["tokenizer.chat_template"]
    formatter = fmt.Jinja2ChatFormatter(source, eos_token="<|im_end|>", bos_token="<|endoftext|>")
    messages = CONVERSATIONS["system"]
    rendered = ours.render(messages, tools=TOOLS)
    assert rendered == formatter(messages=messages, tools=TOOLS).prompt
    assert '"name": "get_weather"' in rendered  # tojson: plain JSON, no HTML escapes
    call = {
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Zürich"}},
    }
    history = [
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": '{"temp_c": 21, "sky": "<clear>"}'},
    ]
    rendered = ours.render(history, tools=TOOLS)
    assert rendered == formatter(messages=history, tools=TOOLS).prompt
    assert '"city": "Zürich"' in rendered and "<tool_response>" in rendered


def llama_cpp_builtin(name: str, messages: Messages, add_generation_prompt: bool) -> str:
    llama_cpp = pytest.importorskip("llama_cpp")
    chat = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages]
    )
    buf = ctypes.create_string_buffer(1 << 16)
    n = llama_cpp.llama_chat_apply_template(
        name.encode(), chat, len(messages), add_generation_prompt, buf, len(buf)
    )
    assert 0 <= n <= len(buf)
    return buf.raw[:n].decode()


@pytest.mark.real_model
@pytest.mark.peer
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gemma_family_format_matches_llama_cpp(
    gemma3_path: Path, conversation: str, add_generation_prompt: bool
) -> None:
    ours = template_of(gemma3_path)
    assert ours.name == "gemma"  # the file has no template: detected by family
    messages = CONVERSATIONS[conversation]
    want = llama_cpp_builtin("gemma", messages, add_generation_prompt)
    assert ours.render(messages, add_generation_prompt=add_generation_prompt) == want


@pytest.mark.peer
@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_other_builtin_formats_match_llama_cpp(name: str) -> None:
    messages = CONVERSATIONS["multi_turn"]
    ours = ChatTemplate(builtin=name)
    for add in (True, False):
        assert ours.render(messages, add_generation_prompt=add) == llama_cpp_builtin(
            name, messages, add
        )


@pytest.mark.real_model
def test_gemma_prompt_ids_have_one_bos(gemma3_path: Path) -> None:
    tok = our_tokenizer(gemma3_path)
    text = template_of(gemma3_path).render(CONVERSATIONS["system"])
    ids = encode_prompt(tok, text)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert tok.token_to_id("<start_of_turn>") == ids[1]  # specials parsed
    # a template that writes the BOS text itself gets no second BOS
    assert encode_prompt(tok, "<bos>" + text) == ids


@pytest.mark.real_model
def test_chatml_prompt_ids(smollm2_path: Path) -> None:
    tok = our_tokenizer(smollm2_path)
    ids = encode_prompt(tok, template_of(smollm2_path).render(CONVERSATIONS["single"]))
    assert ids[0] == tok.token_to_id("<|im_start|>") and not tok.add_bos


# ---- family detection and overrides ----------------------------------------------------------


def vocab_md(tokens: list[str], **extra: Any) -> dict[str, Any]:
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, **extra}


def test_detect_family() -> None:
    assert detect_family(vocab_md(["a"], **{"general.architecture": "gemma3"})) == "gemma"
    assert detect_family(vocab_md(["a", "<start_of_turn>", "<end_of_turn>"])) == "gemma"
    assert detect_family(vocab_md(["<|start_header_id|>", "<|eot_id|>"])) == "llama3"
    assert detect_family(vocab_md(["<|im_start|>"])) == "chatml"
    assert detect_family(vocab_md(["a", "b"])) == "chatml"  # the last resort


def test_from_metadata_choices() -> None:
    md = vocab_md(["<s>", "</s>", "x"], **{"tokenizer.ggml.bos_token_id": 0})
    md["tokenizer.ggml.eos_token_id"] = 1
    fallback = ChatTemplate.from_metadata(md)
    assert fallback.name == "chatml" and fallback.stop_strings == ("<|im_end|>",)
    md["tokenizer.chat_template"] = (
        "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    from_file = ChatTemplate.from_metadata(md)
    assert from_file.render(CONVERSATIONS["single"]) == "<s>Hi"
    assert from_file.stop_strings == ()
    assert ChatTemplate.from_metadata(md, override="gemma").name == "gemma"
    custom = ChatTemplate.from_metadata(md, override="[{{ messages[0].content }}]{{ eos_token }}")
    assert custom.name == "override" and custom.render(CONVERSATIONS["single"]) == "[Hi]</s>"


def test_builtin_accepts_content_parts() -> None:
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    assert ChatTemplate(builtin="chatml").render(parts, add_generation_prompt=False) == (
        "<|im_start|>user\nab<|im_end|>\n"
    )
    with pytest.raises(TemplateError, match="unknown chat format"):
        ChatTemplate(builtin="vicuna")


# ---- what templates may use ---------------------------------------------------------------


def render(source: str, messages: Messages | None = None, **extra: Any) -> str:
    return ChatTemplate(source, bos_token="<s>", eos_token="</s>").render(
        messages if messages is not None else CONVERSATIONS["single"], **extra
    )


def test_template_globals() -> None:
    assert render("{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}") == "<s>|</s>|True"
    assert render("{{ strftime_now('%Y') }}") == str(datetime.now().year)
    assert render("{{ {'k': 'é<>&'}|tojson }}") == '{"k": "é<>&"}'
    assert render("{{ tools|length }}", tools=TOOLS) == "1"
    assert render("{{ extra_var }}", extra_var="x") == "x"
    assert (
        render("{% for m in messages %}{% generation %}{{ m.role }}{% endgeneration %}{% endfor %}")
        == "user"
    )
    assert (
        render("{% for x in [1, 2, 3] %}{% if x == 2 %}{% break %}{% endif %}{{ x }}{% endfor %}")
        == "1"
    )


def test_raise_exception_is_a_template_error() -> None:
    with pytest.raises(TemplateError, match="refused the messages: roles must alternate"):
        render("{{ raise_exception('roles must alternate') }}")


def test_bad_templates() -> None:
    with pytest.raises(TemplateError, match="does not parse"):
        ChatTemplate("{% for %}")
    with pytest.raises(TemplateError, match="failed: ZeroDivisionError"):
        render("{{ 1 // 0 }}")
    with pytest.raises(TemplateError, match="must be a mapping"):
        render("x", messages=["not a dict"])  # type: ignore[list-item]


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ ''.__class__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ raise_exception.__globals__['__builtins__'] }}",
        "{{ messages.append({'role': 'x'}) }}",
        "{{ messages[0].update({'role': 'x'}) }}",
        "{{ namespace.__init__.__globals__ }}",
        "{{ self.__init__.__globals__ }}",
        "{{ (1).__class__.__base__.__subclasses__() }}",
    ],
)
def test_sandbox_escapes_are_template_errors(source: str) -> None:
    with pytest.raises(TemplateError, match="sandbox"):
        render(source)


@pytest.mark.parametrize(
    "source",
    [
        "{{ 'x' * 100000000 }}",
        "{{ [0] * 100000000 }}",
        "{{ 2 ** 100000000 }}",
        "{{ '%999999999d' % 1 }}",
        "{{ '%*d' % (999999999, 1) }}",
        "{{ 'a'|center(1000000000) }}",
        "{{ 'a'.ljust(1000000000) }}",
        "{{ '{:>999999999}'.format(1) }}",
        "{{ ('a' * 1000).replace('a', 'a' * 100000) }}",
        "{{ ('a' * 1000)|replace('a', 'a' * 100000) }}",
        "{{ (range(10000)|list * 100)|join('x' * 100000) }}",
        "{{ 'a\nb'|indent(1000000000) }}",
        "{{ messages|tojson(indent=1000000000) }}",
        "{{ [1]|batch(1000000000, 'x')|list }}",
        "{% for i in range(100000000) %}{% endfor %}",
        "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}",
        "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}"
        "{% endfor %}",
        "{% macro f(s, n) %}{% if n %}{{ f(s ~ s, n - 1) }}{% endif %}{% endmacro %}"
        "{{ f('x', 60) }}",
        "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
        "{% for x in [[1]] recursive %}{{ loop([x]) }}{% endfor %}",
    ],
)
def test_runaway_templates_are_stopped(source: str) -> None:
    with pytest.raises(TemplateError, match="sandbox|too deep"):
        render(source)


def test_output_size_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat_template, "MAX_OUTPUT_CHARS", 10_000)
    with pytest.raises(TemplateError, match="exceeds 10,000 characters"):
        render("{% for i in range(1000) %}{{ 'x' * 100 }}{% endfor %}")
    assert len(render("{% for i in range(99) %}{{ 'x' * 100 }}{% endfor %}")) == 9_900


def test_messages_are_not_changed() -> None:
    messages = [{"role": "user", "content": "Hi"}]
    render("{% set m = messages[0] %}{{ m.content }}", messages=messages)
    assert messages == [{"role": "user", "content": "Hi"}]


def test_tokenizer_type_is_shared() -> None:
    # encode_prompt takes the runtime Tokenizer (no model needed to check the annotation)
    assert encode_prompt.__annotations__["tokenizer"] in ("Tokenizer", Tokenizer)
