"""Quantize a GGUF model file: llama.cpp's per-tensor type mix, our kernels, the gguf writer.

A file type such as Q4_K_M is a mix, not one type: llama.cpp picks each tensor's type from its
role (attention V, FFN down, output head, ...), its layer and its shape. `plan_tensor_types`
reproduces those rules for the file types we offer; `quantize_file` applies them, copies every
metadata key (setting `general.file_type`), and writes the result atomically (a temp file in
the destination directory, renamed only once complete).

Without an importance matrix, llama.cpp's quantizers are deterministic functions of the float
weights; ours (kernels_cpu.quantize) follow the same algorithms, so the files agree closely.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmapp.runtime.errors import LlmappError
from llmapp.runtime.files.ggml_types import TYPE_TRAITS, GGMLType, type_name

if TYPE_CHECKING:
    import numpy as np

    from llmapp.runtime.files.gguf_file import GGUFFile


class QuantizeError(LlmappError):
    """Quantizing a model file failed (bad request, input we refuse, or a write error)."""


# ----------------------------------------------------------------------------------------------
# File types


@dataclass(frozen=True)
class FileType:
    name: str
    file_type: int  # llama.cpp's LLAMA_FTYPE_* value, stored as general.file_type
    base_type: int  # ggml type of most quantized tensors


FILE_TYPES: dict[str, FileType] = {
    "Q2_K": FileType("Q2_K", 10, GGMLType.Q2_K),
    "Q4_K_M": FileType("Q4_K_M", 15, GGMLType.Q4_K),
    "Q6_K": FileType("Q6_K", 18, GGMLType.Q6_K),
    "Q8_0": FileType("Q8_0", 7, GGMLType.Q8_0),
}

QUANTIZATION_VERSION = 2  # general.quantization_version of current ggml block layouts

_FLOAT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
_SPLIT_KEYS = ("split.count", "split.no", "split.tensors.count")  # a one-file output has none

# Row length not a multiple of a 256-block type: llama.cpp's replacement (all 32-block types).
_SHAPE_FALLBACK: dict[int, int] = {
    GGMLType.Q2_K: GGMLType.Q4_0,
    GGMLType.Q3_K: GGMLType.Q4_0,
    GGMLType.Q4_K: GGMLType.Q5_0,
    GGMLType.Q5_K: GGMLType.Q5_1,
    GGMLType.Q6_K: GGMLType.Q8_0,
}


def file_type(name: str) -> FileType:
    """The FileType for a name such as "q4_k_m" (case-insensitive)."""
    ft = FILE_TYPES.get(name.strip().upper())
    if ft is None:
        raise QuantizeError(f"unknown quantization type {name!r} (choose {', '.join(FILE_TYPES)})")
    return ft


# ----------------------------------------------------------------------------------------------
# Which tensors are quantized, and their role


class Role(Enum):
    TOKEN_EMBD = "token_embd"
    ATTN_Q = "attn_q"
    ATTN_K = "attn_k"
    ATTN_V = "attn_v"  # also fused qkv and MLA kv_b: the tensors that carry V
    ATTN_QKV = "attn_qkv"
    ATTN_OUTPUT = "attn_output"
    FFN_UP = "ffn_up"
    FFN_GATE = "ffn_gate"
    FFN_DOWN = "ffn_down"
    OUTPUT = "output"
    OTHER = "other"


# Substrings that keep a 2-D "*weight" tensor in its source type (small or special tensors).
_KEEP_SUBSTRINGS = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
) + tuple(
    f"time_mix_{n}.weight"
    for n in ("first w0 w1 w2 v0 v1 v2 a0 a1 a2 g1 g2 decay_w1 decay_w2 lerp_fused".split())
)
_KEEP_NAMES = ("position_embd.weight", "token_types.weight")


def n_dims(shape: Sequence[int]) -> int:
    """Dimensions that count, as ggml counts them: trailing 1s do not."""
    n = len(shape)
    while n > 1 and shape[n - 1] == 1:
        n -= 1
    return n


def allows_quantization(name: str, shape: Sequence[int]) -> bool:
    """Whether llama.cpp quantizes this tensor at all (only 2-D/3-D "*weight" tensors)."""
    if n_dims(shape) < 2 or not name.endswith("weight"):
        return False
    if name in _KEEP_NAMES:
        return False
    return not any(s in name for s in _KEEP_SUBSTRINGS)


def tensor_role(name: str) -> Role:
    if name == "output.weight":
        return Role.OUTPUT
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return Role.TOKEN_EMBD
    for needle, role in (
        ("attn_qkv.weight", Role.ATTN_QKV),
        ("attn_kv_b.weight", Role.ATTN_V),
        ("attn_v.weight", Role.ATTN_V),
        ("attn_k.weight", Role.ATTN_K),
        ("attn_q.weight", Role.ATTN_Q),
        ("attn_output.weight", Role.ATTN_OUTPUT),
        ("ffn_up", Role.FFN_UP),
        ("ffn_gate", Role.FFN_GATE),
        ("ffn_down", Role.FFN_DOWN),
    ):
        if needle in name:
            return role
    return Role.OTHER


# ----------------------------------------------------------------------------------------------
# Per-tensor type choice


@dataclass(frozen=True)
class TensorSpec:
    """What the rules look at: name, GGUF shape (shape[0] = row length), current type."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int


@dataclass(frozen=True)
class ModelFacts:
    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_llama_70b(self) -> bool:
        # llama.cpp's model-size class "70B": 80 llama layers with grouped-query attention.
        return self.arch == "llama" and self.n_layer == 80 and self.n_head != self.n_head_kv


def model_facts(metadata: Mapping[str, Any]) -> ModelFacts:
    """The hyper-parameters the mix rules use, from GGUF metadata."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise QuantizeError("the model has no general.architecture key")
    n_layer = _first_int(metadata.get(f"{arch}.block_count"))
    if n_layer is None:
        raise QuantizeError(f"the model has no {arch}.block_count key")
    n_head = _first_int(metadata.get(f"{arch}.attention.head_count")) or 0
    n_head_kv = _first_int(metadata.get(f"{arch}.attention.head_count_kv"))
    n_expert = _first_int(metadata.get(f"{arch}.expert_count")) or 0
    return ModelFacts(arch, n_layer, n_head, n_head if n_head_kv is None else n_head_kv, n_expert)


def _first_int(value: Any) -> int | None:
    # Per-layer hyper-parameters may be arrays; llama.cpp's rules read layer 0.
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = value[0] if len(value) else None
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """The layers Q4_K_M gives more bits: first and last eighth, every third in between."""
    return (
        i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2
    )


@dataclass
class _MixState:
    facts: ModelFacts
    ftype: FileType
    tied: bool  # no output.weight: token_embd is also the output head
    n_attn_v: int
    i_attn_v: int = 0
    i_ffn_down: int = 0
    n_fallback: int = 0


def _layer_of(state: _MixState, counter: int, name: str) -> int:
    # Expert tensors are not one per layer in order: the layer comes from the name.
    if state.facts.n_expert <= 1:
        return counter
    m = re.match(r"blk\.(\d+)\.", name)
    if m is None or not 0 <= int(m.group(1)) < state.facts.n_layer:
        raise QuantizeError(f"cannot tell the layer of tensor {name!r}")
    return int(m.group(1))


def _output_type(state: _MixState, t: TensorSpec, base: int) -> int:
    if state.facts.arch == "falcon" or t.shape[0] % TYPE_TRAITS[base].block_size:
        return GGMLType.Q8_0
    return base if base == GGMLType.Q8_0 else GGMLType.Q6_K


def _attn_v_type(state: _MixState, base: int) -> int:
    facts, ft = state.facts, state.ftype.name
    new = base
    if ft == "Q2_K":
        new = GGMLType.Q4_K if facts.n_gqa >= 4 else GGMLType.Q3_K
    elif ft == "Q4_K_M" and use_more_bits(state.i_attn_v, state.n_attn_v):
        new = GGMLType.Q6_K
    if facts.is_llama_70b and new in (GGMLType.Q3_K, GGMLType.Q4_K):
        new = GGMLType.Q5_K  # its V is 8x smaller than Q: more bits cost little
    if facts.n_expert == 8:
        new = GGMLType.Q8_0
    state.i_attn_v += 1
    return new


def _ffn_down_type(state: _MixState, t: TensorSpec, base: int) -> int:
    facts, ft = state.facts, state.ftype.name
    i_layer, n_layer = _layer_of(state, state.i_ffn_down, t.name), facts.n_layer
    state.i_ffn_down += 1
    if ft == "Q2_K":
        return GGMLType.Q3_K
    if ft == "Q4_K_M":
        if facts.arch == "falcon":
            if i_layer < n_layer // 16:
                return GGMLType.Q6_K
            return GGMLType.Q5_K if use_more_bits(i_layer, n_layer) else GGMLType.Q4_K
        if use_more_bits(i_layer, n_layer):
            return GGMLType.Q6_K
    return base


def _mixed_type(state: _MixState, t: TensorSpec, role: Role, base: int) -> int:
    """llama.cpp's choice for one quantizable tensor of the mix, before the shape fallback."""
    facts, ft = state.facts, state.ftype.name
    if role is Role.OUTPUT or (state.tied and role is Role.TOKEN_EMBD):
        return _output_type(state, t, base)
    if role in (Role.ATTN_V, Role.ATTN_QKV):  # fused QKV carries V: llama.cpp treats it so
        return _attn_v_type(state, base)
    if role is Role.ATTN_K and facts.n_expert == 8:
        return GGMLType.Q8_0
    if role is Role.FFN_DOWN:
        return _ffn_down_type(state, t, base)
    if role is Role.ATTN_OUTPUT and facts.arch != "falcon":
        if facts.n_expert == 8 and ft in ("Q2_K", "Q4_K_M"):
            return GGMLType.Q5_K
        if facts.n_expert != 8 and ft == "Q2_K":
            return GGMLType.Q3_K
    if role in (Role.FFN_GATE, Role.FFN_UP):
        _layer_of(state, 0, t.name)  # llama.cpp checks the layer of expert tensors here too
    return base


def _shape_fallback(state: _MixState, t: TensorSpec, new: int) -> int:
    """A row length the type's block does not divide gets a 32-block type, or F16."""
    row_len = t.shape[0]
    block = TYPE_TRAITS[new].block_size
    if row_len % block == 0:
        return new
    state.n_fallback += 1
    new = _SHAPE_FALLBACK.get(new, new)
    if row_len % TYPE_TRAITS[new].block_size:
        new = GGMLType.F16
    return new


def _llama_order(name: str) -> tuple[int, str]:
    # llama.cpp visits tensors sorted by layer number (non-layer tensors first), then name;
    # its per-role counters advance in that order.
    m = re.match(r"blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


@dataclass(frozen=True)
class TypePlan:
    types: dict[str, int]  # target ggml type per tensor name, in the input's order
    n_fallback: int  # tensors whose row length forced a smaller block (or F16)


def plan_tensor_types(
    tensors: Sequence[TensorSpec], facts: ModelFacts, ftype: FileType, pure: bool = False
) -> TypePlan:
    """Target ggml type of every tensor (unchanged for those never quantized)."""
    roles = {t.name: tensor_role(t.name) for t in tensors}
    state = _MixState(
        facts=facts,
        ftype=ftype,
        tied=Role.OUTPUT not in roles.values(),
        n_attn_v=sum(1 for r in roles.values() if r in (Role.ATTN_V, Role.ATTN_QKV)),
    )
    plan: dict[str, int] = {}
    for t in sorted(tensors, key=lambda t: _llama_order(t.name)):
        if not allows_quantization(t.name, t.shape):
            plan[t.name] = t.ggml_type
            continue
        new = ftype.base_type if pure else _mixed_type(state, t, roles[t.name], ftype.base_type)
        plan[t.name] = _shape_fallback(state, t, new)
    return TypePlan({t.name: plan[t.name] for t in tensors}, state.n_fallback)


# ----------------------------------------------------------------------------------------------
# Report


@dataclass(frozen=True)
class TensorResult:
    name: str
    shape: tuple[int, ...]
    src_type: int
    dst_type: int
    src_bytes: int
    dst_bytes: int
    seconds: float

    @property
    def converted(self) -> bool:
        return self.src_type != self.dst_type


@dataclass(frozen=True)
class QuantizeReport:
    src: Path
    dst: Path
    ftype: str
    file_type: int
    pure: bool
    tensors: tuple[TensorResult, ...]
    src_file_bytes: int
    dst_file_bytes: int
    seconds: float
    n_fallback: int = 0
    type_counts: dict[str, int] = field(default_factory=dict)


# Called after each tensor is written: (index from 1, tensor count, what was done).
ProgressFn = Callable[[int, int, TensorResult], None]


# ----------------------------------------------------------------------------------------------
# Writing


def quantize_file(
    src: str | Path,
    dst: str | Path,
    ftype: str,
    pure: bool = False,
    allow_requantize: bool = False,
    *,
    progress: ProgressFn | None = None,
) -> QuantizeReport:
    """Write `dst`, a copy of the GGUF model `src` with its weights quantized to `ftype`.

    pure: every quantizable tensor gets the base type (the shape fallback still applies).
    allow_requantize: accept already-quantized weights (dequantized first; quality suffers).
    The input is only read. `dst` appears only when complete; on any error nothing is left.
    """
    from llmapp.runtime.files.gguf_file import GGUFFile

    started = time.perf_counter()
    ft = file_type(ftype)
    src_path, dst_path = Path(src), Path(dst)
    _check_paths(src_path, dst_path)
    with GGUFFile(src_path) as reader:
        specs = [TensorSpec(t.name, t.shape, t.ggml_type) for t in reader.tensors.values()]
        facts = model_facts(reader.metadata)
        plan = plan_tensor_types(specs, facts, ft, pure)
        _check_requantize(specs, plan.types, allow_requantize)
        results = _write_atomically(reader, dst_path, ft, plan.types, progress)
        src_size = reader.file_size
    counts: dict[str, int] = {}
    for r in results:
        counts[type_name(r.dst_type)] = counts.get(type_name(r.dst_type), 0) + 1
    return QuantizeReport(
        src=src_path,
        dst=dst_path,
        ftype=ft.name,
        file_type=ft.file_type,
        pure=pure,
        tensors=tuple(results),
        src_file_bytes=src_size,
        dst_file_bytes=dst_path.stat().st_size,
        seconds=time.perf_counter() - started,
        n_fallback=plan.n_fallback,
        type_counts=counts,
    )


def _check_paths(src: Path, dst: Path) -> None:
    if not src.is_file():
        raise QuantizeError(f"{src}: no such file")
    if dst.is_dir():
        raise QuantizeError(f"{dst}: is a directory")
    if not dst.parent.is_dir():
        raise QuantizeError(f"{dst.parent}: output directory does not exist")
    same = src.resolve() == dst.resolve()
    if not same and dst.exists():
        with contextlib.suppress(OSError):
            same = os.path.samefile(src, dst)
    if same:
        raise QuantizeError(f"{dst}: output would overwrite the input file")


def _check_requantize(specs: list[TensorSpec], plan: dict[str, int], allow: bool) -> None:
    if allow:
        return
    for t in specs:
        if t.ggml_type not in _FLOAT_TYPES and plan[t.name] != t.ggml_type:
            raise QuantizeError(
                f"tensor {t.name!r} is already quantized ({type_name(t.ggml_type)}); "
                "requantizing loses quality: pass --allow-requantize to do it anyway"
            )


def _write_atomically(
    reader: GGUFFile,
    dst: Path,
    ft: FileType,
    plan: dict[str, int],
    progress: ProgressFn | None,
) -> list[TensorResult]:
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".part", dir=dst.parent)
    except OSError as e:
        raise QuantizeError(f"{dst}: cannot write: {e.strerror or e}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes it private; a model is not
        results = _write_gguf(reader, tmp, ft, plan, progress)
        os.replace(tmp, dst)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise QuantizeError(f"{dst}: cannot write: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return results


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_gguf(
    reader: GGUFFile,
    path: Path,
    ft: FileType,
    plan: dict[str, int],
    progress: ProgressFn | None,
) -> list[TensorResult]:
    writer = _make_writer(path, reader, ft)
    try:
        for name, info in reader.tensors.items():
            writer.add_tensor_info(
                name,
                tuple(reversed(info.shape)),  # the writer takes numpy order and reverses it
                _np().dtype(_np().float32),
                _tensor_bytes(info.shape, plan[name]),
                raw_dtype=_gguf_type(plan[name]),
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        results = []
        for i, (name, info) in enumerate(reader.tensors.items()):
            t0 = time.perf_counter()
            data = _convert_tensor(reader, name, plan[name])
            writer.write_tensor_data(data)
            result = TensorResult(
                name,
                info.shape,
                info.ggml_type,
                plan[name],
                info.n_bytes,
                data.nbytes,
                time.perf_counter() - t0,
            )
            results.append(result)
            if progress is not None:
                progress(i + 1, len(reader.tensors), result)
        _sync(writer)
    finally:
        writer.close()
    return results


def _sync(writer: Any) -> None:
    for f in writer.fout or ():
        f.flush()
        os.fsync(f.fileno())


def _tensor_bytes(shape: Sequence[int], ggml_type: int) -> int:
    n = 1
    for d in shape:
        n *= d
    traits = TYPE_TRAITS[ggml_type]
    return n // traits.block_size * traits.type_size


# Rows converted per step: bounds the float32 working copy of a big tensor (~64 MB).
_CHUNK_ELEMENTS = 1 << 24


def _convert_tensor(reader: GGUFFile, name: str, new_type: int) -> np.ndarray:
    """The tensor's bytes in new_type: its own bytes when unchanged, else via float32 rows."""
    np = _np()
    info = reader.tensors[name]
    raw = reader.tensor_data(name)
    if new_type == info.ggml_type:
        return raw
    # Kernels are reached directly here: file conversion is not part of a forward pass.
    from llmapp.kernels_cpu import quantize as kq
    from llmapp.kernels_cpu import quants as kd

    row_len, n_rows = info.row_len, info.n_rows
    out = np.empty((n_rows, kq.quantized_row_bytes(new_type, row_len)), dtype=np.uint8)
    step = max(1, _CHUNK_ELEMENTS // row_len)
    for r0 in range(0, n_rows, step):
        rows = raw[r0 : r0 + step]
        if info.ggml_type == GGMLType.F32:
            values = rows.view(np.float32)
        else:
            values = kd.dequantize(rows, info.ggml_type, row_len)
        try:
            out[r0 : r0 + step] = kq.quantize(values, new_type)
        except ValueError as e:
            raise QuantizeError(f"tensor {name!r}: {e}") from None
    return out


def _np() -> Any:
    import numpy

    return numpy


def _gguf_type(ggml_type: int) -> Any:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType(int(ggml_type))


# -- metadata ----------------------------------------------------------------------------------


def _make_writer(path: Path, reader: GGUFFile, ft: FileType) -> Any:
    """A gguf writer holding every key of the input, in order, with the file type updated."""
    writer = _writer_class()(path, reader.metadata["general.architecture"])
    writer.kv_data[0].clear()  # the constructor's architecture key comes back in order below
    overrides = {
        "general.quantization_version": (QUANTIZATION_VERSION, 4),  # 4 = UINT32
        "general.file_type": (ft.file_type, 4),
    }
    for key, value in reader.metadata.items():
        if key in _SPLIT_KEYS:
            continue
        if key in overrides:
            writer.add_key_value(key, overrides.pop(key)[0], _vtype(4))
            continue
        _copy_key(writer, reader, key, value)
    for key, (value, vtype) in overrides.items():
        writer.add_key_value(key, value, _vtype(vtype))
    writer.data_alignment = reader.alignment
    return writer


def _copy_key(writer: Any, reader: GGUFFile, key: str, value: Any) -> None:
    from llmapp.runtime.files.gguf_file import GGUFArray, GGUFValueType

    vtype = reader.value_type(key)
    if not isinstance(value, GGUFArray):
        writer.add_key_value(key, value, _vtype(vtype))
        return
    if value.elem_type == GGUFValueType.STRING:
        items: Any = value.all_bytes()  # raw bytes: written back exactly as read
    else:
        items = value.to_numpy()
    writer.add_key_value(key, items, _vtype(vtype), sub_type=_vtype(value.elem_type))


def _vtype(value_type: int) -> Any:
    from gguf import GGUFValueType

    return GGUFValueType(int(value_type))


_WRITER_CLASS: Any = None


def _writer_class() -> Any:
    """gguf's writer, taught two things it lacks: empty arrays, and numeric arrays as numpy
    (packed in one call instead of one struct.pack per item: vocabularies are 150k long)."""
    global _WRITER_CLASS
    if _WRITER_CLASS is not None:
        return _WRITER_CLASS
    import numpy as np
    from gguf import GGUFValueType, GGUFWriter

    formats = {
        GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
        GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
        GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "<u8",
        GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
    }  # fmt: skip

    class _Writer(GGUFWriter):  # type: ignore[misc]
        def _pack_val(self, val: Any, vtype: Any, add_vtype: bool, sub_type: Any = None) -> bytes:
            fast = vtype == GGUFValueType.ARRAY and sub_type is not None
            if fast and (len(val) == 0 or isinstance(val, np.ndarray)):
                head = struct.pack("<I", int(vtype)) if add_vtype else b""
                head += struct.pack("<IQ", int(sub_type), len(val))
                if len(val) == 0:
                    return head
                return head + np.ascontiguousarray(val, dtype=formats[sub_type]).tobytes()
            packed: bytes = super()._pack_val(val, vtype, add_vtype, sub_type)
            return packed

    _WRITER_CLASS = _Writer
    return _Writer
