"""Our GGUF reader: tiny synthetic files written with gguf.GGUFWriter, every error kind, fuzzing,
and agreement with gguf.GGUFReader on the three real models."""

from __future__ import annotations

import functools
import hashlib
import struct
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmapp.runtime.errors import GGUFError
from llmapp.runtime.execution.models import load_config
from llmapp.runtime.files.gguf_file import GGUFArray, GGUFFile, GGUFValueType, TensorInfo

Q = gguf.GGMLQuantizationType
VT = gguf.GGUFValueType

# 2-D weights of the tiny model cycle through these types (all 32-element blocks or plain floats,
# so a 32-wide row holds any of them).
WEIGHT_TYPES = [Q.Q8_0, Q.F16, Q.BF16, Q.Q4_0, Q.Q5_0, Q.Q4_1, Q.Q5_1, Q.IQ4_NL, Q.F32]

LAYER_TENSORS = {
    "llama": ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate"]
    + ["ffn_up", "ffn_down"],
}
LAYER_TENSORS["qwen2"] = LAYER_TENSORS["llama"] + ["attn_q.bias", "attn_k.bias", "attn_v.bias"]
LAYER_TENSORS["gemma3"] = LAYER_TENSORS["llama"] + [
    "attn_q_norm",
    "attn_k_norm",
    "post_attention_norm",
    "post_ffw_norm",
]

# Scalar keys of every value type, with the Python value our reader must give back.
SCALAR_KEYS: list[tuple[str, Any, Any]] = [
    ("test.u8", 200, VT.UINT8),
    ("test.i8", -100, VT.INT8),
    ("test.u16", 60000, VT.UINT16),
    ("test.i16", -30000, VT.INT16),
    ("test.u32", 4_000_000_000, VT.UINT32),
    ("test.i32", -2_000_000_000, VT.INT32),
    ("test.f32", 0.5, VT.FLOAT32),
    ("test.bool", True, VT.BOOL),
    ("test.str", "héllo ✓", VT.STRING),
    ("test.u64", 2**63 + 5, VT.UINT64),
    ("test.i64", -(2**62), VT.INT64),
    ("test.f64", 1e-300, VT.FLOAT64),
    ("test.aaaa", 1, VT.UINT32),  # same length as the next key: duplicate-key patching
    ("test.bbbb", 2, VT.UINT32),
]
TOKENS = ["<unk>", "<s>", "</s>", "a", "b", "ab", "é", "✓"] + [f"tok{i}" for i in range(8)]


def tensor_shapes(arch: str, n_layer: int, d: int, n_q: int, n_kv: int, ff: int, hd: int) -> dict:
    """GGUF-order shapes of a tiny model's tensors (row length first)."""
    layer = {
        "attn_norm": (d,),
        "attn_q": (d, n_q),
        "attn_k": (d, n_kv),
        "attn_v": (d, n_kv),
        "attn_output": (n_q, d),
        "ffn_norm": (d,),
        "ffn_gate": (d, ff),
        "ffn_up": (d, ff),
        "ffn_down": (ff, d),
        "attn_q.bias": (n_q,),
        "attn_k.bias": (n_kv,),
        "attn_v.bias": (n_kv,),
        "attn_q_norm": (hd,),
        "attn_k_norm": (hd,),
        "post_attention_norm": (d,),
        "post_ffw_norm": (d,),
    }
    shapes = {"token_embd.weight": (d, len(TOKENS)), "output_norm.weight": (d,)}
    for il in range(n_layer):
        for short in LAYER_TENSORS.get(arch, LAYER_TENSORS["llama"]):
            full = short if short.endswith(".bias") else short + ".weight"
            shapes[f"blk.{il}.{full}"] = layer[short]
    return shapes


def tensor_payload(shape: tuple[int, ...], qtype: int, rng: np.random.Generator) -> np.ndarray:
    """Random data of this type, in the layout GGUFWriter.add_tensor expects (numpy order:
    the GGUF shape reversed; quantized rows as bytes)."""
    outer = tuple(reversed(shape[1:]))
    if qtype == Q.F32:
        return rng.standard_normal((*outer, shape[0])).astype(np.float32)
    if qtype == Q.F16:
        return rng.standard_normal((*outer, shape[0])).astype(np.float16)
    block, size = gguf.GGML_QUANT_SIZES[Q(qtype)]
    return rng.integers(0, 256, (*outer, shape[0] // block * size), dtype=np.uint8)


def write_tiny_model(
    path: Path,
    *,
    arch: str = "llama",
    n_layer: int = 2,
    n_embd: int = 32,
    n_head: int = 4,
    n_head_kv: int = 2,
    head_dim: int | None = None,
    n_ff: int = 64,
    tied: bool = True,
    alignment: int | None = None,
    omit_keys: Iterable[str] = (),
    omit_tensors: Iterable[str] = (),
    extra_kv: dict[str, tuple[Any, Any]] | None = None,
    shape_overrides: dict[str, tuple[int, ...]] | None = None,
) -> Path:
    """A small valid model file of `arch`, with metadata of every type and mixed tensor types."""
    head_dim = head_dim or n_embd // n_head
    omit_keys, omit_tensors = set(omit_keys), set(omit_tensors)
    w = gguf.GGUFWriter(path, arch)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    kv: dict[str, tuple[Any, Any]] = {
        "general.name": ("Tiny Test Model", VT.STRING),
        f"{arch}.block_count": (n_layer, VT.UINT32),
        f"{arch}.context_length": (256, VT.UINT32),
        f"{arch}.embedding_length": (n_embd, VT.UINT32),
        f"{arch}.feed_forward_length": (n_ff, VT.UINT32),
        f"{arch}.attention.head_count": (n_head, VT.UINT32),
        f"{arch}.attention.head_count_kv": (n_head_kv, VT.UINT32),
        f"{arch}.attention.layer_norm_rms_epsilon": (1e-5, VT.FLOAT32),
        f"{arch}.rope.freq_base": (10000.0, VT.FLOAT32),
        "general.file_type": (7, VT.UINT32),
    }
    if head_dim != n_embd // n_head:
        kv[f"{arch}.attention.key_length"] = (head_dim, VT.UINT32)
        kv[f"{arch}.attention.value_length"] = (head_dim, VT.UINT32)
    kv.update({k: (v, t) for k, v, t in SCALAR_KEYS})
    kv.update(extra_kv or {})
    for key, (value, vtype) in kv.items():
        if key not in omit_keys:
            w.add_key_value(key, value, vtype)
    if "tokenizer.ggml.tokens" not in omit_keys:
        w.add_array("tokenizer.ggml.tokens", TOKENS)
    w.add_key_value(
        "tokenizer.ggml.scores", [float(-i) for i in range(len(TOKENS))], VT.ARRAY, VT.FLOAT32
    )
    w.add_key_value("tokenizer.ggml.token_type", [1] * len(TOKENS), VT.ARRAY, VT.INT32)
    w.add_key_value("test.bools", [True, False, True], VT.ARRAY, VT.BOOL)
    w.add_key_value("test.u16s", [1, 2, 65535], VT.ARRAY, VT.UINT16)

    shapes = tensor_shapes(arch, n_layer, n_embd, n_head * head_dim, n_head_kv * head_dim,
                           n_ff, head_dim)  # fmt: skip
    if not tied:
        shapes["output.weight"] = (n_embd, len(TOKENS))
    shapes.update(shape_overrides or {})
    rng = np.random.default_rng(0)
    n_2d = 0
    for name, shape in shapes.items():
        if name in omit_tensors:
            continue
        qtype = Q.F32
        if len(shape) == 2:
            qtype = WEIGHT_TYPES[n_2d % len(WEIGHT_TYPES)]
            n_2d += 1
        data = tensor_payload(shape, qtype, rng)
        raw = qtype if qtype not in (Q.F32, Q.F16) else None
        w.add_tensor(name, data, raw_shape=data.shape if raw else None, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@functools.cache
def tiny_model_bytes() -> bytes:
    """The tiny llama file's bytes, built once per session."""
    with tempfile.TemporaryDirectory() as tmp:
        return write_tiny_model(Path(tmp) / "tiny.gguf").read_bytes()


@pytest.fixture
def tiny_bytes() -> bytes:
    return tiny_model_bytes()


@pytest.fixture
def tiny_path(tmp_path: Path, tiny_bytes: bytes) -> Path:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(tiny_bytes)
    return path


def write_bytes(tmp_path: Path, data: bytes | bytearray, name: str = "patched.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return path


def string_pos(data: bytes, text: str) -> int:
    """Offset of a length-prefixed GGUF string (its u64 length field) in the file."""
    raw = text.encode()
    pos = data.index(struct.pack("<Q", len(raw)) + raw)
    return pos


def after_string(data: bytes, text: str) -> int:
    return string_pos(data, text) + 8 + len(text.encode())


def tensor_fields(data: bytes, name: str) -> dict[str, int]:
    """Byte positions of one tensor info's fields."""
    pos = after_string(data, name)
    (n_dims,) = struct.unpack_from("<I", data, pos)
    dims = pos + 4
    type_pos = dims + 8 * n_dims
    return {"n_dims": pos, "dims": dims, "type": type_pos, "offset": type_pos + 4}


def expect_error(path: Path, *fragments: str) -> GGUFError:
    with pytest.raises(GGUFError) as info:
        GGUFFile(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return info.value


# -- reading a valid file --------------------------------------------------------------------


def test_header_and_layout(tiny_path: Path) -> None:
    with GGUFFile(tiny_path) as g:
        assert g.version == 3
        assert g.alignment == 32
        assert g.data_offset % 32 == 0
        assert g.file_size == tiny_path.stat().st_size
        assert g.path == tiny_path
        assert "tensors" in repr(g)


def test_scalar_values_round_trip(tiny_path: Path) -> None:
    with GGUFFile(tiny_path) as g:
        assert g.metadata["general.architecture"] == "llama"
        for key, value, vtype in SCALAR_KEYS:
            got = g.metadata[key]
            assert got == value and type(got) is type(value), key
            assert g.value_type(key) == int(vtype)


def test_arrays_are_lazy_sequences(tiny_path: Path) -> None:
    with GGUFFile(tiny_path) as g:
        tokens = g.metadata["tokenizer.ggml.tokens"]
        assert isinstance(tokens, GGUFArray)
        assert tokens.elem_type == GGUFValueType.STRING
        assert len(tokens) == len(TOKENS)
        assert tokens[6] == "é" and tokens[-1] == TOKENS[-1]
        assert tokens[2:5] == TOKENS[2:5]
        assert tokens.item_bytes(7) == "✓".encode()
        assert tokens.to_list() == TOKENS
        assert list(tokens) == TOKENS
        with pytest.raises(IndexError):
            tokens[len(TOKENS)]
        with pytest.raises(TypeError):
            tokens.to_numpy()
        assert g.metadata["test.bools"].to_list() == [True, False, True]
        assert g.metadata["test.u16s"][2] == 65535


def test_numeric_array_to_numpy_is_a_read_only_view(tiny_path: Path) -> None:
    with GGUFFile(tiny_path) as g:
        scores = g.metadata["tokenizer.ggml.scores"]
        arr = scores.to_numpy()
        assert arr.dtype == np.float32 and arr.shape == (len(TOKENS),)
        assert not arr.flags.writeable and not arr.flags.owndata
        assert arr.tolist() == [float(-i) for i in range(len(TOKENS))] == scores.to_list()
        assert g.metadata["tokenizer.ggml.token_type"].to_numpy().dtype == np.int32
        del arr


def test_tensor_infos_in_file_order(tiny_path: Path) -> None:
    expected = tensor_shapes("llama", 2, 32, 32, 16, 64, 8)
    with GGUFFile(tiny_path) as g:
        assert list(g.tensors) == list(expected)
        for name, shape in expected.items():
            info = g.tensors[name]
            assert isinstance(info, TensorInfo)
            assert info.shape == shape
            assert info.row_len == shape[0] and info.n_rows == int(np.prod(shape[1:]))
            assert info.offset % 32 == 0 and info.offset >= g.data_offset
        types = {g.tensors[n].type_name for n in g.tensors}
        assert {"Q8_0", "F16", "BF16", "Q4_0", "Q5_0", "Q4_1", "Q5_1", "IQ4_NL", "F32"} <= types


def test_tensor_data_views_match_written_bytes(tiny_path: Path) -> None:
    reader = gguf.GGUFReader(tiny_path)
    with GGUFFile(tiny_path) as g:
        for t in reader.tensors:
            view = g.tensor_data(t.name)
            info = g.tensors[t.name]
            assert view.dtype == np.uint8 and not view.flags.writeable
            assert view.shape == (info.n_rows, info.n_bytes // info.n_rows)
            assert view.tobytes() == np.asarray(t.data).tobytes()
        with pytest.raises(GGUFError, match="missing tensor 'nope'"):
            g.tensor_data("nope")


def test_agrees_with_gguf_reader_on_tiny_file(tiny_path: Path) -> None:
    with GGUFFile(tiny_path) as g:
        assert_agrees_with_reader(g, gguf.GGUFReader(tiny_path), hash_all=True)


def test_get_and_require(tiny_path: Path) -> None:
    with GGUFFile(tiny_path) as g:
        assert g.get("nope") is None and g.get("nope", 3) == 3
        assert g.require("test.u32", int) == 4_000_000_000
        assert g.require("test.u32", float) == 4_000_000_000  # ints pass for floats
        assert g.require("test.str", (int, str)) == "héllo ✓"
        assert isinstance(g.require("tokenizer.ggml.tokens", GGUFArray), GGUFArray)
        with pytest.raises(GGUFError, match="missing required key 'nope'"):
            g.require("nope")
        with pytest.raises(GGUFError, match="key 'test.str' has type STRING, expected int"):
            g.require("test.str", int)
        with pytest.raises(GGUFError, match="has type BOOL, expected int"):
            g.require("test.bool", int)


def test_close_and_views_outliving_the_file(tiny_path: Path) -> None:
    g = GGUFFile(tiny_path)
    view = g.tensor_data("token_embd.weight")
    tokens = g.metadata["tokenizer.ggml.tokens"]
    expected = view.copy()
    g.close()
    g.close()  # idempotent
    assert np.array_equal(view, expected)  # the map lives while a view does
    with pytest.raises(GGUFError, match="closed"):
        tokens.to_list()
    with pytest.raises(GGUFError, match="closed"):
        g.tensor_data("token_embd.weight")


def test_custom_alignment(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "a64.gguf", alignment=64)
    with GGUFFile(path) as g:
        assert g.alignment == 64 and g.data_offset % 64 == 0
        assert all(t.offset % 64 == 0 for t in g.tensors.values())
        assert_agrees_with_reader(g, gguf.GGUFReader(path), hash_all=True)


def test_version_2_reads_the_same(tmp_path: Path, tiny_bytes: bytes) -> None:
    data = bytearray(tiny_bytes)
    struct.pack_into("<I", data, 4, 2)
    with GGUFFile(write_bytes(tmp_path, data)) as g:
        assert g.version == 2 and len(g.tensors) > 0


# -- one test per error ----------------------------------------------------------------------


def test_nonexistent_file(tmp_path: Path) -> None:
    expect_error(tmp_path / "missing.gguf", "no such file")


def test_directory(tmp_path: Path) -> None:
    expect_error(tmp_path, "directory")


def test_empty_file(tmp_path: Path) -> None:
    expect_error(write_bytes(tmp_path, b""), "empty file")


def test_bad_magic(tmp_path: Path, tiny_bytes: bytes) -> None:
    expect_error(write_bytes(tmp_path, b"GGUX" + tiny_bytes[4:]), "not a GGUF file")
    expect_error(write_bytes(tmp_path, b"GG"), "not a GGUF file")
    expect_error(write_bytes(tmp_path, b"hello world, not a model at all"), "not a GGUF file")


@pytest.mark.parametrize("version", [0, 1, 4, 0x03000000])
def test_unsupported_version(tmp_path: Path, tiny_bytes: bytes, version: int) -> None:
    data = bytearray(tiny_bytes)
    struct.pack_into("<I", data, 4, version)
    expect_error(write_bytes(tmp_path, data), f"unsupported GGUF version {version}")


@pytest.mark.parametrize(
    ("cut", "fragment"),
    [
        (lambda d: 6, "truncated while reading header version"),
        (lambda d: 12, "truncated while reading header tensor count"),
        (lambda d: 20, "truncated while reading header metadata count"),
        (lambda d: string_pos(d, "test.f64") + 4, "truncated while reading length of key"),
        (lambda d: after_string(d, "test.f64") + 6, "value of key 'test.f64'"),
        (lambda d: after_string(d, "test.str") + 12, "value of key 'test.str'"),
        (lambda d: after_string(d, "tokenizer.ggml.tokens") + 30, "tokenizer.ggml.tokens"),
        (lambda d: after_string(d, "blk.1.ffn_up.weight") + 2, "tensor 'blk.1.ffn_up.weight'"),
        (lambda d: len(d) - 1, "out of bounds"),  # last tensor's data cut short
    ],
)
def test_truncated(
    tmp_path: Path, tiny_bytes: bytes, cut: Callable[[bytes], int], fragment: str
) -> None:
    at = cut(tiny_bytes)
    error = expect_error(write_bytes(tmp_path, tiny_bytes[:at]), fragment)
    assert "truncated" in error.problem or "out of bounds" in error.problem


@pytest.mark.parametrize(
    ("where", "fragment"),
    [
        (lambda d: 8, "tensor count"),
        (lambda d: 16, "metadata count"),
        (lambda d: string_pos(d, "test.str"), "key of metadata entry"),
        (lambda d: after_string(d, "test.str") + 4, "value of key 'test.str'"),
        (lambda d: after_string(d, "tokenizer.ggml.tokens") + 4, "tokenizer.ggml.tokens"),
        (lambda d: after_string(d, "tokenizer.ggml.scores") + 4, "tokenizer.ggml.scores"),
        (lambda d: string_pos(d, "output_norm.weight"), "name of tensor"),
    ],
)
def test_huge_counts_fail_fast(
    tmp_path: Path, tiny_bytes: bytes, where: Callable[[bytes], int], fragment: str
) -> None:
    data = bytearray(tiny_bytes)
    struct.pack_into("<Q", data, where(tiny_bytes), 2**60)
    start = time.perf_counter()
    expect_error(write_bytes(tmp_path, data), fragment)
    assert time.perf_counter() - start < 0.5


def test_tensor_offset_out_of_bounds(tmp_path: Path, tiny_bytes: bytes) -> None:
    data = bytearray(tiny_bytes)
    struct.pack_into("<Q", data, tensor_fields(tiny_bytes, "blk.0.attn_q.weight")["offset"], 2**40)
    expect_error(write_bytes(tmp_path, data), "tensor 'blk.0.attn_q.weight' data", "out of bounds")


def test_tensor_offset_unaligned(tmp_path: Path, tiny_bytes: bytes) -> None:
    data = bytearray(tiny_bytes)
    pos = tensor_fields(tiny_bytes, "blk.0.attn_q.weight")["offset"]
    struct.pack_into("<Q", data, pos, struct.unpack_from("<Q", data, pos)[0] + 4)
    expect_error(write_bytes(tmp_path, data), "not 32-aligned")


def test_overlapping_tensors(tmp_path: Path, tiny_bytes: bytes) -> None:
    data = bytearray(tiny_bytes)
    first = tensor_fields(tiny_bytes, "blk.0.attn_k.weight")["offset"]
    second = tensor_fields(tiny_bytes, "blk.0.attn_v.weight")["offset"]
    data[second : second + 8] = data[first : first + 8]
    expect_error(write_bytes(tmp_path, data), "overlap")


@pytest.mark.parametrize(
    ("type_id", "fragment"),
    [(15, "unsupported tensor type Q8_K (id 15)"), (16, "type id 16"), (999, "type id 999")],
)
def test_unsupported_tensor_type(
    tmp_path: Path, tiny_bytes: bytes, type_id: int, fragment: str
) -> None:
    data = bytearray(tiny_bytes)
    struct.pack_into("<I", data, tensor_fields(tiny_bytes, "blk.0.ffn_up.weight")["type"], type_id)
    expect_error(write_bytes(tmp_path, data), "tensor 'blk.0.ffn_up.weight'", fragment)


def test_row_length_not_a_multiple_of_the_block(tmp_path: Path, tiny_bytes: bytes) -> None:
    data = bytearray(tiny_bytes)
    name = "token_embd.weight"  # Q8_0, 32-element blocks
    struct.pack_into("<Q", data, tensor_fields(tiny_bytes, name)["dims"], 48)
    expect_error(write_bytes(tmp_path, data), "row length 48 is not a multiple", "Q8_0")


@pytest.mark.parametrize("n_dims", [0, 5, 2**31])
def test_bad_dimension_count(tmp_path: Path, tiny_bytes: bytes, n_dims: int) -> None:
    data = bytearray(tiny_bytes)
    struct.pack_into("<I", data, tensor_fields(tiny_bytes, "output_norm.weight")["n_dims"], n_dims)
    expect_error(write_bytes(tmp_path, data), f"has {n_dims} dimensions")


def test_zero_dimension(tmp_path: Path, tiny_bytes: bytes) -> None:
    data = bytearray(tiny_bytes)
    struct.pack_into("<Q", data, tensor_fields(tiny_bytes, "output_norm.weight")["dims"], 0)
    expect_error(write_bytes(tmp_path, data), "zero dimension")


def test_duplicate_key(tmp_path: Path, tiny_bytes: bytes) -> None:
    data = tiny_bytes.replace(b"test.bbbb", b"test.aaaa")
    expect_error(write_bytes(tmp_path, data), "duplicate metadata key 'test.aaaa'")


def test_duplicate_tensor(tmp_path: Path, tiny_bytes: bytes) -> None:
    data = tiny_bytes.replace(b"blk.1.ffn_up.weight", b"blk.0.ffn_up.weight")
    expect_error(write_bytes(tmp_path, data), "duplicate tensor 'blk.0.ffn_up.weight'")


def test_bad_utf8_in_key(tmp_path: Path, tiny_bytes: bytes) -> None:
    data = tiny_bytes.replace(b"test.aaaa", b"test.\xff\xfeaa")
    expect_error(write_bytes(tmp_path, data), "key of metadata entry", "not valid UTF-8")


def test_bad_utf8_in_string_value(tmp_path: Path, tiny_bytes: bytes) -> None:
    data = tiny_bytes.replace("héllo".encode(), b"h\xff\xffllo")
    expect_error(write_bytes(tmp_path, data), "value of key 'test.str'", "not valid UTF-8")


def test_bad_utf8_in_vocab_item_is_reported_on_decode(tmp_path: Path, tiny_bytes: bytes) -> None:
    prefix = struct.pack("<Q", 4)
    data = tiny_bytes.replace(prefix + b"tok3", prefix + b"\xfftok")
    with GGUFFile(write_bytes(tmp_path, data)) as g:  # open never decodes the vocabulary
        tokens = g.metadata["tokenizer.ggml.tokens"]
        assert tokens[0] == "<unk>"
        with pytest.raises(GGUFError, match="item 11 of 'tokenizer.ggml.tokens'"):
            tokens.to_list()


@pytest.mark.parametrize("value_type", [13, 255, 2**31])
def test_unknown_value_type(tmp_path: Path, tiny_bytes: bytes, value_type: int) -> None:
    data = bytearray(tiny_bytes)
    struct.pack_into("<I", data, after_string(tiny_bytes, "test.u16"), value_type)
    expect_error(write_bytes(tmp_path, data), "key 'test.u16' has unknown")


def test_unknown_array_element_type(tmp_path: Path, tiny_bytes: bytes) -> None:
    data = bytearray(tiny_bytes)
    struct.pack_into("<I", data, after_string(tiny_bytes, "test.u16s") + 4, 77)
    expect_error(write_bytes(tmp_path, data), "array 'test.u16s' has unknown element")
    struct.pack_into("<I", data, after_string(tiny_bytes, "test.u16s") + 4, int(VT.ARRAY))
    expect_error(write_bytes(tmp_path, data), "holds arrays")


@pytest.mark.parametrize("alignment", [0, 3, 48])
def test_bad_alignment(tmp_path: Path, alignment: int) -> None:
    path = tmp_path / "align.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_key_value("general.alignment", alignment, VT.UINT32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    expect_error(path, "general.alignment", "power of two")


# -- fuzzing: anything else must end in GGUFError ---------------------------------------------


def exercise(path: Path) -> None:
    """Open, build the config, decode every array and view every tensor: GGUFError or success."""
    try:
        with GGUFFile(path) as g:
            for value in g.metadata.values():
                if isinstance(value, GGUFArray):
                    value.to_list()
                    if value.elem_type != GGUFValueType.STRING:
                        value.to_numpy()
            for name in g.tensors:
                g.tensor_data(name)
            load_config(g)
    except GGUFError:
        pass


FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(fraction=st.floats(0.0, 1.0), near_header=st.booleans())
def test_random_truncations(tmp_path: Path, fraction: float, near_header: bool) -> None:
    tiny_bytes = tiny_model_bytes()
    limit = 4096 if near_header else len(tiny_bytes)
    cut = int(fraction * min(limit, len(tiny_bytes)))
    exercise(write_bytes(tmp_path, tiny_bytes[:cut], "trunc.gguf"))


@FUZZ
@given(
    mutations=st.lists(
        st.tuples(st.integers(0, 2**31), st.integers(0, 255), st.sampled_from([1, 4, 8])),
        min_size=1,
        max_size=6,
    ),
    near_header=st.booleans(),
)
def test_random_byte_mutations(
    tmp_path: Path, mutations: list[tuple[int, int, int]], near_header: bool
) -> None:
    data = bytearray(tiny_model_bytes())
    # Most of the file is tensor data, which the reader never interprets: aim at the header.
    span = min(len(data), 4096) if near_header else len(data)
    for pos, value, width in mutations:
        at = pos % span
        # Width 4/8 writes a small or huge little-endian number (counts, lengths, offsets).
        chunk = (value if width == 1 else (value << (8 * width - 8)) | value).to_bytes(
            width, "little"
        )
        data[at : at + width] = chunk[: len(data) - at]
    exercise(write_bytes(tmp_path, data, "mutated.gguf"))


U32_KEYS = [
    "llama.block_count",
    "llama.context_length",
    "llama.embedding_length",
    "llama.feed_forward_length",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "general.file_type",
]


@FUZZ
@given(key=st.sampled_from(U32_KEYS), value=st.integers(0, 2**32 - 1), as_type=st.integers(0, 13))
def test_random_hyperparameters(tmp_path: Path, key: str, value: int, as_type: int) -> None:
    # Aim at the config: any count or width, declared as any value type.
    data = bytearray(tiny_model_bytes())
    at = after_string(data, key)
    struct.pack_into("<II", data, at, as_type if as_type < 13 else int(VT.UINT32), value)
    exercise(write_bytes(tmp_path, data, "hparams.gguf"))


# -- the three real models agree with gguf.GGUFReader ----------------------------------------


def assert_agrees_with_reader(g: GGUFFile, reader: gguf.GGUFReader, hash_all: bool) -> None:
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(fields) == list(g.metadata)
    for key, field in fields.items():
        assert g.value_type(key) == int(field.types[0]), key
        ours = g.metadata[key]
        if field.types[0] == VT.ARRAY:
            assert isinstance(ours, GGUFArray) and ours.elem_type == int(field.types[1]), key
            assert ours.to_list() == field.contents(), key
            if ours.elem_type != GGUFValueType.STRING:
                theirs = np.array([field.parts[i][0] for i in field.data])
                assert np.array_equal(ours.to_numpy(), theirs.astype(ours.to_numpy().dtype)), key
        else:
            assert ours == field.contents(), key
    assert [t.name for t in reader.tensors] == list(g.tensors)
    for i, t in enumerate(reader.tensors):
        info = g.tensors[t.name]
        assert info.shape == tuple(int(d) for d in t.shape), t.name
        assert info.ggml_type == int(t.tensor_type), t.name
        assert info.offset == t.data_offset, t.name
        assert info.n_bytes == t.n_bytes, t.name
        if hash_all or i in (0, 1, len(reader.tensors) // 2, len(reader.tensors) - 1):
            ours_hash = hashlib.sha256(g.tensor_data(t.name).tobytes()).hexdigest()
            assert ours_hash == hashlib.sha256(np.asarray(t.data).tobytes()).hexdigest(), t.name


@pytest.mark.real_model
def test_real_model_agrees_with_gguf_reader(real_model_path: Path) -> None:
    reader = gguf.GGUFReader(real_model_path)
    with GGUFFile(real_model_path) as g:
        assert g.version == 3 and g.alignment == 32
        assert g.data_offset == min(t.data_offset for t in reader.tensors)
        assert_agrees_with_reader(g, reader, hash_all=False)
    del reader
