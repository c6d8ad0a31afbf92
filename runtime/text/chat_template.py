"""Chat templates: a list of messages -> the prompt text the model was trained on.

A GGUF file usually carries a Jinja template (`tokenizer.chat_template`). Templates are
untrusted input, so they render in Jinja's immutable sandbox with extra limits: output size,
call depth (macro recursion), `range` length, and the string operations that can blow up in a
single step (`'x' * n`, `'%9999999d'`, `center`, `replace`, ...). Anything the sandbox refuses
becomes one `TemplateError` that says so.

Rendering matches what llama-cpp-python's Jinja formatter produces (the conventions of
Hugging Face chat templates: trim_blocks, lstrip_blocks, `tojson` without HTML escaping,
`raise_exception`, `strftime_now`, bos/eos token texts, `tools`).

A file without a template gets its family's format as llama.cpp writes it (gemma, llama3,
chatml), detected from the architecture or the vocabulary; ChatML is the last resort.
A catalog override may name one of those formats or give a Jinja source.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from llmapp.runtime.errors import TemplateError

if TYPE_CHECKING:
    from llmapp.runtime.files.gguf_file import GGUFFile
    from llmapp.runtime.text.tokenizer import Tokenizer

MAX_OUTPUT_CHARS = 4 << 20  # far beyond any context window; stops runaway templates
MAX_CALL_DEPTH = 64
MAX_RANGE = 10_000
MAX_STRING_CHARS = 1 << 20  # the largest string one operation may build
_WS = " \t\n\v\f\r"  # what llama.cpp's trim() strips (C isspace)


class _TemplateRaised(Exception):
    """raise_exception() called from a template."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Plain JSON, not Jinja's HTML-safe variant: templates put it into prompts.
    if isinstance(indent, int) and indent > 64 or isinstance(indent, str) and len(indent) > 64:
        raise SecurityError("tojson indent wider than 64")
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _too_big(size: int) -> None:
    if size > MAX_STRING_CHARS:
        raise SecurityError(f"an operation would build {size:,} characters")


_PRINTF_NUMBERS = re.compile(r"%[-#0 +]*(\d*)(?:\.(\d+))?")
_FORMAT_FIELDS = re.compile(r"\{[^{}]*\}")  # str.format replacement fields
_NUMBER = re.compile(r"\d+")


def _check_printf(fmt: str, args: Any) -> None:
    for width, precision in _PRINTF_NUMBERS.findall(fmt):
        _too_big(max(int(width or 0), int(precision or 0)))
    if "*" in fmt:
        values = args if isinstance(args, tuple) else (args,)
        for value in values:
            if isinstance(value, int):
                _too_big(abs(value))


def _check_str_call(owner: str, name: str, args: tuple[Any, ...]) -> None:
    """Refuse str methods whose result would be huge, before they allocate it."""
    if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
        _too_big(args[0])
    elif name == "expandtabs":
        size = args[0] if args and isinstance(args[0], int) else 8
        _too_big(len(owner) + owner.count("\t") * size)
    elif name in ("format", "format_map"):
        fields = " ".join(_FORMAT_FIELDS.findall(owner))
        _too_big(max((int(n) for n in _NUMBER.findall(fields)), default=0))
        for value in args:
            if isinstance(value, int) and not isinstance(value, bool):
                _too_big(abs(value))
    elif name == "replace" and len(args) >= 2:
        _check_replace(owner, str(args[0]), str(args[1]))


def _check_replace(text: str, old: str, new: str) -> None:
    grow = max(0, len(new) - len(old)) * (text.count(old) if old else len(text) + 1)
    _too_big(len(text) + grow)


def _checked_join(sep: str, items: Iterable[Any]) -> str:
    parts = [str(x) for x in items]
    _too_big(sum(map(len, parts)) + len(sep) * max(len(parts) - 1, 0))
    return sep.join(parts)


def _checked_concat(values: Iterable[Any]) -> str:
    """The `~` operator: concatenation whose result must stay small."""
    return _checked_join("", values)


class _CheckedCodeGenerator(CodeGenerator):
    """Compiles `a ~ b` into a size-checked concatenation (Jinja offers no hook for it)."""

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: Frame) -> None:
        self.write("environment.checked_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _GenerationTag(jinja2.ext.Extension):
    """Accepts Hugging Face's `{% generation %}...{% endgeneration %}` and renders the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return list(parser.parse_statements(("name:endgeneration",), drop_needle=True))


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox plus limits on what one operation or one render may cost."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})
    code_generator_class = _CheckedCodeGenerator
    checked_concat = staticmethod(_checked_concat)

    def __init__(self) -> None:
        super().__init__(
            loader=jinja2.BaseLoader(),
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_GenerationTag, jinja2.ext.loopcontrols],
        )
        self._depth = threading.local()
        self.filters["tojson"] = _tojson
        self.filters["center"] = self._checked_filter(self.filters["center"], 1)
        self.filters["indent"] = self._checked_filter(self.filters["indent"], 1)
        self.filters["format"] = self._format_filter
        self.filters["replace"] = _replace_filter
        self.filters["join"] = self._join_filter
        for name in ("batch", "slice"):
            self.filters[name] = self._checked_count(self.filters[name])
        self.globals["range"] = self._range
        del self.globals["lipsum"]  # generates text of any requested size

    @staticmethod
    def _range(*args: int) -> range:
        rng = range(*args)
        if len(rng) > MAX_RANGE:
            raise SecurityError(f"range() of {len(rng):,} items (at most {MAX_RANGE:,})")
        return rng

    @staticmethod
    def _checked_filter(inner: Callable[..., Any], width_at: int) -> Callable[..., Any]:
        def checked(*args: Any, **kwargs: Any) -> Any:
            width = kwargs.get("width", args[width_at] if len(args) > width_at else 0)
            if isinstance(width, int):
                text = args[0] if args else ""
                _too_big(abs(width) * (str(text).count("\n") + 1))
            return inner(*args, **kwargs)

        return checked

    @staticmethod
    def _checked_count(inner: Callable[..., Any]) -> Callable[..., Any]:
        def checked(value: Any, count: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(count, int) and count > MAX_RANGE:
                raise SecurityError(f"batch/slice count {count:,} (at most {MAX_RANGE:,})")
            return inner(value, count, *args, **kwargs)

        return checked

    @staticmethod
    @jinja2.pass_eval_context
    def _join_filter(
        eval_ctx: Any, value: Iterable[Any], d: str = "", attribute: Any = None
    ) -> str:
        if attribute is not None:
            value = [v.get(attribute) if isinstance(v, Mapping) else v for v in value]
        return _checked_join(str(d), value)

    @staticmethod
    def _format_filter(value: str, *args: Any, **kwargs: Any) -> str:
        if args and kwargs:
            raise SecurityError("format filter takes positional or keyword arguments, not both")
        params: Any = kwargs or args
        _check_printf(str(value), params)
        return str(value) % params

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, type(left)):
                _too_big(len(left) + len(right))
        elif operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    _too_big(len(seq) * n)
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            _too_big(max(left.bit_length(), 1) * right // 8)
        elif operator == "%" and isinstance(left, str):
            _check_printf(left, right)
        return super().call_binop(context, operator, left, right)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__} is not allowed"
        )

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        target = getattr(__obj, "__wrapped__", __obj)
        owner = getattr(target, "__self__", None)
        if isinstance(owner, str):
            name = getattr(target, "__name__", "")
            if name == "join" and len(args) == 1 and not kwargs:
                return _checked_join(owner, args[0])
            _check_str_call(owner, name, args)
        depth = getattr(__self._depth, "n", 0)
        if depth >= MAX_CALL_DEPTH:
            raise SecurityError(f"calls nested deeper than {MAX_CALL_DEPTH} (runaway recursion?)")
        __self._depth.n = depth + 1
        try:
            return super().call(__context, __obj, *args, **kwargs)
        finally:
            __self._depth.n = depth


@jinja2.pass_eval_context
def _replace_filter(eval_ctx: Any, s: Any, old: Any, new: Any, count: int | None = None) -> str:
    text, old, new = str(s), str(old), str(new)
    _check_replace(text, old, new)
    return text.replace(old, new, -1 if count is None else count)


# ---- llama.cpp's built-in formats (used when the file has no template) ---------------------


def _content_text(message: Mapping[str, Any]) -> str:
    """A message's content as text: a string, or the text parts of a list of parts."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
    raise TemplateError(f"message content must be a string or a list of parts, not {content!r}")


def _render_chatml(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> str:
    out = [f"<|im_start|>{m['role']}\n{_content_text(m)}<|im_end|>\n" for m in messages]
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def _render_gemma(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> str:
    # Gemma has no system role: system text joins the next user turn. "assistant" is "model".
    out: list[str] = []
    system = ""
    for message in messages:
        role = str(message["role"])
        text = _content_text(message).strip(_WS)
        if role == "system":
            system += text
            continue
        role = "model" if role == "assistant" else role
        out.append(f"<start_of_turn>{role}\n")
        if system and role != "model":
            out.append(system + "\n\n")
            system = ""
        out.append(text + "<end_of_turn>\n")
    if add_generation_prompt:
        out.append("<start_of_turn>model\n")
    return "".join(out)


def _render_llama3(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> str:
    out = [
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{_content_text(m).strip(_WS)}"
        "<|eot_id|>"
        for m in messages
    ]
    if add_generation_prompt:
        out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(out)


_BuiltinRenderer = Callable[[Sequence[Mapping[str, Any]], bool], str]
BUILTIN_FORMATS: dict[str, tuple[_BuiltinRenderer, str]] = {
    # name -> (renderer, the text that ends a turn)
    "chatml": (_render_chatml, "<|im_end|>"),
    "gemma": (_render_gemma, "<end_of_turn>"),
    "llama3": (_render_llama3, "<|eot_id|>"),
}
# Vocabulary markers that identify a family, checked in this order.
_FAMILY_MARKERS = (("gemma", "<start_of_turn>"), ("llama3", "<|start_header_id|>"))


class ChatTemplate:
    """Renders chat messages into a prompt. `name` says where the format came from:
    "gguf" (the file's template), "override" (a Jinja source given by the catalog), or a
    built-in format name."""

    def __init__(
        self,
        source: str | None = None,
        *,
        builtin: str | None = None,
        bos_token: str = "",
        eos_token: str = "",
        name: str | None = None,
    ) -> None:
        if (source is None) == (builtin is None):
            raise ValueError("give exactly one of a Jinja source or a built-in format name")
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.source = source
        self._template: jinja2.Template | None = None
        self._builtin: _BuiltinRenderer | None = None
        self.stop_strings: tuple[str, ...] = ()
        if builtin is not None:
            if builtin not in BUILTIN_FORMATS:
                known = ", ".join(BUILTIN_FORMATS)
                raise TemplateError(f"unknown chat format {builtin!r} (known: {known})")
            self._builtin, end_of_turn = BUILTIN_FORMATS[builtin]
            self.stop_strings = (end_of_turn,)
            self.name = builtin
        else:
            self._template = _compile(source or "")
            self.name = name or "jinja"

    @property
    def supports_tools(self) -> bool:
        """Whether the template renders a `tools` list itself (Qwen2.5's does)."""
        return self.source is not None and "tools" in self.source

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, override: str | None = None) -> ChatTemplate:
        return cls.from_metadata(gguf.metadata, override)

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any], override: str | None = None) -> ChatTemplate:
        """The file's template, or `override` (a built-in format name or a Jinja source), or
        the family's built-in format when the file has none."""
        bos, eos = _bos_eos_texts(md)
        if override:
            if override in BUILTIN_FORMATS:
                return cls(builtin=override, bos_token=bos, eos_token=eos)
            return cls(override, bos_token=bos, eos_token=eos, name="override")
        source = md.get("tokenizer.chat_template")
        if isinstance(source, str) and source.strip():
            return cls(source, bos_token=bos, eos_token=eos, name="gguf")
        return cls(builtin=detect_family(md), bos_token=bos, eos_token=eos)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[Any] | None = None,
        **extra: Any,
    ) -> str:
        """The prompt text for `messages` (each a mapping with "role" and "content")."""
        _check_messages(messages)
        if self._builtin is not None:
            return self._builtin(messages, add_generation_prompt)
        assert self._template is not None
        context = {
            "messages": list(messages),
            "add_generation_prompt": add_generation_prompt,
            "tools": tools,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "raise_exception": _raise_exception,
            "strftime_now": _strftime_now,
            **extra,
        }
        return _bounded_render(self._template, context)


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TemplateError("messages must be a list of {role, content} mappings")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise TemplateError(f"message {i} must be a mapping with a string 'role'")


_ENVIRONMENT: _Sandbox | None = None


def _compile(source: str) -> jinja2.Template:
    global _ENVIRONMENT
    if _ENVIRONMENT is None:
        _ENVIRONMENT = _Sandbox()
    try:
        return _ENVIRONMENT.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"chat template does not parse (line {exc.lineno}): {exc}") from None
    except (RecursionError, MemoryError):
        raise TemplateError("chat template is too deeply nested to compile") from None


def _bounded_render(template: jinja2.Template, context: Mapping[str, Any]) -> str:
    parts: list[str] = []
    size = 0
    try:
        for chunk in template.generate(context):
            size += len(chunk)
            if size > MAX_OUTPUT_CHARS:
                raise TemplateError(f"chat template output exceeds {MAX_OUTPUT_CHARS:,} characters")
            parts.append(chunk)
    except TemplateError:
        raise
    except _TemplateRaised as exc:
        raise TemplateError(f"chat template refused the messages: {exc}") from None
    except SecurityError as exc:
        raise TemplateError(f"chat template blocked by the sandbox: {exc}") from None
    except RecursionError:
        raise TemplateError("chat template recursion too deep") from None
    except Exception as exc:  # any other failure inside untrusted template code
        raise TemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from None
    return "".join(parts)


# ---- metadata ------------------------------------------------------------------------------


def _bos_eos_texts(md: Mapping[str, Any]) -> tuple[str, str]:
    """The bos and eos token texts templates receive (llama.cpp's defaults when unset)."""
    tokens = md.get("tokenizer.ggml.tokens")
    if tokens is None:
        return "", ""
    n = len(tokens)
    defaults = (1, 2) if md.get("tokenizer.ggml.model") == "llama" else (11, 11)
    texts = []
    for key, default in zip(("bos", "eos"), defaults, strict=True):
        value = md.get(f"tokenizer.ggml.{key}_token_id")
        token_id = default
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n:
            token_id = value
        texts.append(str(tokens[token_id]) if 0 <= token_id < n else "")
    return texts[0], texts[1]


def _vocab_contains(md: Mapping[str, Any], texts: Iterable[str]) -> set[str]:
    tokens = md.get("tokenizer.ggml.tokens")
    if tokens is None:
        return set()
    if hasattr(tokens, "all_bytes"):  # a GGUF array: compare raw bytes, decode nothing
        present = set(tokens.all_bytes())
        return {t for t in texts if t.encode() in present}
    vocab = set(tokens)
    return {t for t in texts if t in vocab}


def detect_family(md: Mapping[str, Any]) -> str:
    """The built-in format for a file without a template, as llama.cpp would recognise it."""
    arch = str(md.get("general.architecture") or "")
    if arch.startswith("gemma"):
        return "gemma"
    present = _vocab_contains(md, [marker for _, marker in _FAMILY_MARKERS])
    for family, marker in _FAMILY_MARKERS:
        if marker in present:
            return family
    return "chatml"


def encode_prompt(tokenizer: Tokenizer, rendered: str) -> list[int]:
    """Token ids of a rendered chat prompt, with exactly one BOS when the model wants one.

    As llama.cpp's server does: a BOS text the template wrote itself is taken off when the
    tokenizer adds BOS anyway; special tokens in the text are parsed.
    """
    if tokenizer.add_bos and tokenizer.bos_id is not None:
        bos_text = tokenizer.token_text(tokenizer.bos_id)
        if bos_text and rendered.startswith(bos_text):
            rendered = rendered[len(bos_text) :]
    return tokenizer.encode(rendered, add_bos=None, parse_special=True)
