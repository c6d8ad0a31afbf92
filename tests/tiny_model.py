"""A tiny chat model for tests that must run offline and fast.

`write_chat_model` writes a real GGUF file: a llama-architecture model with random float
weights, a SentencePiece-style vocabulary (byte fallback, so any text round-trips), ChatML
control tokens and a ChatML template. The real ModelRunner loads it in well under a second.

`ScriptedRunner` is a runner with known logits for the same file: the next token after id t at
position p is `script_next(t, p)`, with a wide margin, whatever the batch around it. Engine
tests use it to assert exact outputs (batching, isolation, aborts) without a real model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from llmapp.runtime.core.batch import ForwardBatch
from llmapp.runtime.execution.model_runner import RunnerOptions
from llmapp.runtime.files.gguf_file import GGUFFile

VT = gguf.GGUFValueType

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
WORDS = ["the", "a", "is", "and", "of", "to", "in", "it", "you", "hello", "world", "cat"]
N_CTX = 2048


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token types): specials, 256 byte tokens, then pieces."""
    tokens = list(SPECIALS)
    types = [2, 3, 3, 3, 3]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    pieces = ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += ["\u2581" + chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += ["\u2581" + w for w in WORDS] + [",", ".", "!", "?", "\n"]
    tokens += pieces
    types += [1] * len(pieces)
    scores = [0.0] * (len(SPECIALS) + 256) + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


def write_chat_model(
    path: Path, n_layer: int = 2, n_embd: int = 64, n_ff: int = 128, split_max_tensors: int = 0
) -> Path:
    """The model file (with split_max_tensors, the first of its NAME-0000k-of-0000N files)."""
    tokens, scores, types = vocabulary()
    w = gguf.GGUFWriter(path, "llama", split_max_tensors=split_max_tensors)
    for key, value, vtype in [
        ("general.name", "Tiny Chat", VT.STRING),
        ("llama.block_count", n_layer, VT.UINT32),
        ("llama.context_length", N_CTX, VT.UINT32),
        ("llama.embedding_length", n_embd, VT.UINT32),
        ("llama.feed_forward_length", n_ff, VT.UINT32),
        ("llama.attention.head_count", 4, VT.UINT32),
        ("llama.attention.head_count_kv", 2, VT.UINT32),
        ("llama.attention.layer_norm_rms_epsilon", 1e-5, VT.FLOAT32),
        ("llama.rope.freq_base", 10000.0, VT.FLOAT32),
        ("general.file_type", 0, VT.UINT32),
        ("tokenizer.ggml.model", "llama", VT.STRING),
        ("tokenizer.ggml.bos_token_id", 1, VT.UINT32),
        ("tokenizer.ggml.eos_token_id", 4, VT.UINT32),
        ("tokenizer.ggml.unknown_token_id", 0, VT.UINT32),
        ("tokenizer.ggml.add_bos_token", True, VT.BOOL),
        ("tokenizer.chat_template", CHATML, VT.STRING),
    ]:
        w.add_key_value(key, value, vtype)
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_key_value("tokenizer.ggml.scores", scores, VT.ARRAY, VT.FLOAT32)
    w.add_key_value("tokenizer.ggml.token_type", types, VT.ARRAY, VT.INT32)
    rng = np.random.default_rng(0)
    head_dim = n_embd // 4
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (len(tokens), n_embd),
        "output_norm.weight": (n_embd,),
    }
    for il in range(n_layer):
        for name, shape in {
            "attn_norm": (n_embd,),
            "attn_q": (n_embd, n_embd),
            "attn_k": (2 * head_dim, n_embd),
            "attn_v": (2 * head_dim, n_embd),
            "attn_output": (n_embd, n_embd),
            "ffn_norm": (n_embd,),
            "ffn_gate": (n_ff, n_embd),
            "ffn_up": (n_ff, n_embd),
            "ffn_down": (n_embd, n_ff),
        }.items():
            shapes[f"blk.{il}.{name}.weight"] = shape
    for name, shape in shapes.items():  # numpy order: rows, then row length
        if len(shape) == 1:  # norms near 1
            data = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            data = rng.standard_normal(shape) * (0.5 / np.sqrt(shape[-1]))
        if name == "token_embd.weight":  # tied head: byte tokens rarely win, so text reads
            data[len(SPECIALS) : len(SPECIALS) + 256] *= 0.1
        w.add_tensor(name, data.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    shards = sorted(path.parent.glob(f"{path.stem}-*-of-*.gguf"))
    return shards[0] if split_max_tensors and shards else path


def write_store(home: Path, layers: dict[str, int], defaults: dict[str, Any] | None = None) -> None:
    """A model store at `home` ($LLMAPP_HOME) whose models.toml declares tiny:NAME for each
    name in `layers` (a tiny chat model of that many layers, already pulled and verified), with
    `defaults` as each entry's [defaults] sampling; tiny:FIRST is the store's default model."""
    import hashlib

    models = home / "models"
    models.mkdir(parents=True, exist_ok=True)
    lines = [f'default = "tiny:{next(iter(layers))}"']
    for name, n_layer in layers.items():
        path = write_chat_model(models / f"tiny-{name}.gguf", n_layer=n_layer)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        (models / f"tiny-{name}.gguf.sha256").write_text(f"{digest}  {path.name}\n")
        key = f'models."tiny:{name}"'
        lines += [f"[{key}]", f'file = "{path.name}"', f"size = {path.stat().st_size}"]
        lines += [f'sha256 = "{digest}"', 'quant = "F32"', 'arch = "llama"']
        if defaults:
            lines.append(f"[{key}.defaults]")
            lines += [f"{k} = {v!r}".replace("'", '"') for k, v in defaults.items()]
        # Never reached (the file is in place): a pull would fail fast on a closed port.
        lines += [f"[[{key}.sources]]", 'kind = "url"', f'url = "http://127.0.0.1:9/{path.name}"']
    (home / "models.toml").write_text("\n".join(lines) + "\n")


def offload_store(home: Path, monkeypatch: Any) -> Path:
    """$LLMAPP_HOME with tiny:a (2 layers) pulled, and torch's CPU device standing in for a GPU
    (the front ends' --n-gpu-layers tests)."""
    monkeypatch.setenv("LLMAPP_HOME", str(home))
    monkeypatch.setenv("LLMAPP_DEVICE", "cpu")
    write_store(home, {"a": 2})
    return home


def script_next(token: int, position: int, n_vocab: int) -> int:
    """The scripted model's next token: a walk over the plain pieces, never a special one."""
    first = len(SPECIALS) + 256
    return first + (token * 7 + position * 3) % (n_vocab - first)


class ScriptedRunner:
    """Known logits for a tiny chat model file: exact, batch-independent, instant.

    `period` > 0 scripts a model that repeats itself: after token t comes the next of a cycle
    of `period` plain pieces, whatever the position (what n-gram drafts can predict).
    """

    period = 0

    def __init__(self, path: Path, options: RunnerOptions) -> None:
        from llmapp.runtime.execution.models import load_config

        with GGUFFile(path) as g:
            self.config: Any = load_config(g)
            self.n_vocab = len(g.metadata["tokenizer.ggml.tokens"])
        self.block_size = options.block_size
        self.num_blocks = -(-options.ctx_size // options.block_size)
        self.forward_calls = 0

    def bind_thread(self) -> None:
        pass

    def forward(self, batch: ForwardBatch) -> np.ndarray:
        self.forward_calls += 1
        rows = batch.logits_rows
        logits = np.zeros((len(rows), self.n_vocab), dtype=np.float32)
        first = len(SPECIALS) + 256
        for i, row in enumerate(rows):
            token, pos = int(batch.token_ids[row]), int(batch.positions[row])
            if self.period:
                nxt = first + (max(token - first, 0) + 1) % self.period
            else:
                nxt = script_next(token, pos, self.n_vocab)
            logits[i, nxt] = 10.0
            logits[i, first : first + 40] += np.linspace(0, 1, 40, dtype=np.float32)
        return logits


class CyclingRunner(ScriptedRunner):
    period = 7
