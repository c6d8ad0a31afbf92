"""Which layers run on the offload device: llama.cpp's `-ngl` meaning, and `auto` fitting.

Slots are counted as llama.cpp counts them since Dec 2025: the output head is the first
offloaded slot, then blocks from the last one down (`-ngl 1` = the head only; `all` = every
block and the head, n_layer + 1 slots). The token embedding always stays on the CPU.

`auto` fits slots in that order while the device's free memory, less a margin and the compute
buffers, holds their packed weights (GGUF tensor sizes: the device keeps the file's bytes) and
their KV blocks; it stops at the first slot that does not fit, so the offloaded blocks stay a
contiguous tail. No torch here: the device and its free memory come from backend.py.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from llmapp.runtime.core.kv_cache import DEFAULT_CACHE_TYPE, kv_row_bytes
from llmapp.runtime.errors import LlmappError
from llmapp.runtime.execution.config import ModelConfig
from llmapp.runtime.files.gguf_file import GGUFFile

GiB = 1 << 30
MiB = 1 << 20
DEFAULT_MARGIN = 512 * MiB
# Rows of one prompt chunk the compute-buffer estimate allows for.
COMPUTE_ROWS = 512
# Float32 elements a matmul dequantizes at once (kernels_gpu.ops.TILE_ELEMENTS).
TILE_ELEMENTS = 1 << 24

NGpuLayers = int | str  # a slot count, or "auto" / "all"


class PlacementError(LlmappError):
    """An offload request that cannot be met (no torch, or it would not fit)."""


def parse_n_gpu_layers(text: str) -> NGpuLayers:
    """argparse type of --n-gpu-layers: a count >= 0, 'auto' or 'all'."""
    value = text.strip().lower()
    if value in ("auto", "all"):
        return value
    if not value.isdigit():
        raise ValueError(f"--n-gpu-layers takes a number, 'auto' or 'all', not {text!r}")
    return int(value)


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": MiB, "g": GiB, "t": 1 << 40}


def parse_bytes(text: str) -> int:
    """'1.5GiB', '512MiB', '800M', '1073741824' -> bytes (binary units either way)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if m is None:
        raise ValueError(f"not a memory size: {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def format_bytes(n: int) -> str:
    if n >= GiB:
        return f"{n / GiB:.1f} GiB"
    return f"{n / MiB:.0f} MiB"


@dataclass(frozen=True)
class LayerCosts:
    """Device bytes each slot needs: weights from the GGUF, KV for the configured context."""

    block_weights: tuple[int, ...]  # per block: every blk.i.* tensor
    head_weights: int  # the output matrix (the tied embedding, when tied) and output_norm
    kv_per_layer: int  # K and V blocks of one layer, in the KV cache type
    compute: int  # one dequantized tile + a prompt chunk's activations

    @property
    def n_layer(self) -> int:
        return len(self.block_weights)

    def slot_bytes(self, n_slots: int) -> tuple[int, int]:
        """(weight bytes, KV bytes) of the first n_slots slots (head, then blocks from the end)."""
        head, layers = split_slots(self.n_layer, n_slots)
        weights = (self.head_weights if head else 0) + sum(
            w for w, on in zip(self.block_weights, layers, strict=True) if on
        )
        return weights, self.kv_per_layer * sum(layers)

    def need(self, n_slots: int) -> int:
        """Bytes the device must hold for n_slots: weights, KV and (if any) compute buffers."""
        if n_slots == 0:
            return 0
        weights, kv = self.slot_bytes(n_slots)
        return weights + kv + self.compute


def layer_costs(
    gguf: GGUFFile,
    cfg: ModelConfig,
    num_blocks: int,
    block_size: int,
    cache_type: str = DEFAULT_CACHE_TYPE,
) -> LayerCosts:
    blocks = [0] * cfg.n_layer
    for name, info in gguf.tensors.items():
        if name.startswith("blk."):
            il = int(name.split(".", 2)[1])
            if 0 <= il < cfg.n_layer:
                blocks[il] += info.n_bytes
    head = "token_embd.weight" if cfg.tied_embeddings else "output.weight"
    head_bytes = gguf.tensors[head].n_bytes + gguf.tensors["output_norm.weight"].n_bytes
    kv = 2 * num_blocks * block_size * cfg.n_head_kv * kv_row_bytes(cfg.head_dim, cache_type)
    widest = max(cfg.n_vocab, cfg.n_ff, cfg.n_embd_q)
    tile = min(widest * cfg.n_embd, TILE_ELEMENTS) * 4
    acts = COMPUTE_ROWS * (3 * cfg.n_ff + 4 * cfg.n_embd + 2 * cfg.n_embd_q) * 4
    return LayerCosts(tuple(blocks), head_bytes, kv, tile + acts)


def split_slots(n_layer: int, n_slots: int) -> tuple[bool, list[bool]]:
    """(head offloaded?, per block offloaded?) for n_slots, llama.cpp's order."""
    n_slots = max(0, min(n_slots, n_layer + 1))
    head = n_slots >= 1
    first = n_layer - max(0, n_slots - 1)
    return head, [il >= first for il in range(n_layer)]


def resolve_slots(
    request: NGpuLayers, costs: LayerCosts, free_bytes: int | None, margin: int
) -> int:
    """The slot count to offload: auto fits; an explicit count is checked against free memory
    where that is known, and refused (naming the numbers) rather than over-committed."""
    total = costs.n_layer + 1
    if request == "auto":
        if free_bytes is None:
            return total
        n = 0
        while n < total and costs.need(n + 1) + margin <= free_bytes:
            n += 1
        return n
    n = total if request == "all" else min(int(request), total)
    if free_bytes is not None and n and costs.need(n) + margin > free_bytes:
        fit = resolve_slots("auto", costs, free_bytes, margin)
        raise PlacementError(
            f"{n} layers need {format_bytes(costs.need(n))} on the device plus a "
            f"{format_bytes(margin)} margin, but {format_bytes(free_bytes)} is free: "
            f"use --n-gpu-layers {fit} or auto"
        )
    return n


@dataclass(frozen=True)
class OffloadInfo:
    """What went where, for `run --verbose` and the JSON reports."""

    device: str
    layers: int  # offloaded slots (the head counts as one)
    of: int  # n_layer + 1
    weight_bytes: int
    kv_bytes: int

    def as_dict(self) -> dict[str, object]:
        return {
            "device": self.device,
            "layers": self.layers,
            "of": self.of,
            "weight_bytes": self.weight_bytes,
            "kv_bytes": self.kv_bytes,
        }

    def describe(self) -> str:
        return (
            f"offload: {self.layers}/{self.of} layers on {self.device}, "
            f"{format_bytes(self.weight_bytes)} weights, {format_bytes(self.kv_bytes)} KV"
        )


def env_device() -> str | None:
    """LLMAPP_DEVICE: 'cpu' makes torch's CPU device stand in for a GPU; 'cuda:1' picks one."""
    value = os.environ.get("LLMAPP_DEVICE", "").strip()
    return value or None


def env_free_memory() -> int | None:
    """LLMAPP_DEVICE_MEMORY: the free device memory `auto` sees (e.g. '1.5GiB')."""
    value = os.environ.get("LLMAPP_DEVICE_MEMORY", "").strip()
    return parse_bytes(value) if value else None
