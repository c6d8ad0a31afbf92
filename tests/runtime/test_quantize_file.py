"""`quantize_file` and `llmapp quantize`: llama.cpp's type mix, metadata kept, files both
readers accept, atomic writes, clear refusals, and (peer) the same choices and errors as
llama.cpp's own quantizer on the same F32 model."""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path
from types import ModuleType
from typing import Any

import gguf
import numpy as np
import pytest
from bench_loader import load_benchmark

from llmapp.app.cli import main
from llmapp.runtime.errors import LlmappError
from llmapp.runtime.files.ggml_types import GGMLType as G
from llmapp.runtime.files.gguf_file import GGUFFile
from llmapp.runtime.files.quantize import (
    FILE_TYPES,
    ModelFacts,
    QuantizeError,
    TensorSpec,
    allows_quantization,
    plan_tensor_types,
    quantize_file,
    use_more_bits,
)


def _bench() -> ModuleType:
    return load_benchmark("bench_quantize")


bench = _bench()

# Model shapes: "k256" holds real K-quants; "odd" (96 / 200) forces every fallback, 200 even
# past the 32-blocks (F16); "f16" is an F16 source with 64-wide rows.
MODELS: dict[str, dict[str, Any]] = {
    "k256": dict(n_embd=256, n_ff=512, n_layer=8, n_head=4, n_head_kv=1),
    "k256-gqa2-tied": dict(n_embd=256, n_ff=768, n_layer=8, n_head=4, n_head_kv=2, tied=True),
    "odd-tied": dict(n_embd=96, n_ff=200, n_layer=3, n_head=4, n_head_kv=1, tied=True),
    "f16": dict(n_embd=64, n_ff=128, n_layer=2, n_head=2, n_head_kv=1, dtype=np.float16),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    return {
        name: bench.write_synthetic_llama(root / f"{name}.gguf", seed=i, **kw)
        for i, (name, kw) in enumerate(MODELS.items())
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def types_of(path: Path) -> dict[str, int]:
    with GGUFFile(path) as f:
        return {name: info.ggml_type for name, info in f.tensors.items()}


# ----------------------------------------------------------------------------------------------
# The rules, tensor by tensor


def expected_k256(ftype: str, name: str) -> int:
    """llama.cpp's choice for the "k256" model (8 layers, GQA 4, untied), written out."""
    if name.endswith("norm.weight"):
        return G.F32
    if ftype in ("Q6_K", "Q8_0"):
        return G[ftype]
    more_bits = any(name.startswith(f"blk.{i}.") for i in (0, 3, 6, 7))  # 8 layers
    if name == "output.weight":
        return G.Q6_K
    if ftype == "Q4_K_M":
        if ("attn_v" in name or "ffn_down" in name) and more_bits:
            return G.Q6_K
        return G.Q4_K
    # Q2_K
    if "attn_v" in name:
        return G.Q4_K  # n_head / n_head_kv = 4
    if "attn_output" in name or "ffn_down" in name:
        return G.Q3_K
    return G.Q2_K


def test_use_more_bits() -> None:
    assert [i for i in range(8) if use_more_bits(i, 8)] == [0, 3, 6, 7]
    assert [i for i in range(24) if use_more_bits(i, 24)] == [
        0,
        1,
        2,
        5,
        8,
        11,
        14,
        17,
        20,
        21,
        22,
        23,
    ]


def test_what_is_never_quantized() -> None:
    assert not allows_quantization("blk.0.attn_norm.weight", (256, 256))
    assert not allows_quantization("output_norm.weight", (256,))
    assert not allows_quantization("blk.0.attn_q.bias", (256, 256))
    assert not allows_quantization("blk.0.attn_q.weight", (256, 1))  # 1-D for ggml
    assert not allows_quantization("blk.0.ffn_gate_inp.weight", (256, 8))
    assert not allows_quantization("position_embd.weight", (256, 512))
    assert allows_quantization("blk.0.ffn_down_exps.weight", (256, 512, 8))
    assert allows_quantization("token_embd.weight", (256, 1000))


@pytest.mark.parametrize("ftype", list(FILE_TYPES))
def test_type_mix_k256(models: dict[str, Path], tmp_path: Path, ftype: str) -> None:
    out = tmp_path / "q.gguf"
    report = quantize_file(models["k256"], out, ftype)
    got = types_of(out)
    assert got == {name: expected_k256(ftype, name) for name in got}
    assert report.n_fallback == 0
    with GGUFFile(out) as f:
        assert f.metadata["general.file_type"] == FILE_TYPES[ftype].file_type


def test_q2_k_attn_v_follows_gqa(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "q.gguf"
    quantize_file(models["k256-gqa2-tied"], out, "Q2_K")
    got = types_of(out)
    assert got["blk.3.attn_v.weight"] == G.Q3_K  # n_head / n_head_kv = 2 < 4
    assert got["token_embd.weight"] == G.Q6_K  # tied: token_embd is the output head
    assert got["blk.3.ffn_down.weight"] == G.Q3_K  # row length 768 = 3 * 256


def test_shape_fallbacks(models: dict[str, Path], tmp_path: Path) -> None:
    expect = {
        # ftype: (attn_q 96, attn_v of a more-bits layer 96, attn_output 96, ffn_down 200)
        "Q4_K_M": (G.Q5_0, G.Q8_0, G.Q5_0, G.F16),
        "Q2_K": (G.Q4_0, G.Q5_0, G.Q4_0, G.F16),
        "Q6_K": (G.Q8_0, G.Q8_0, G.Q8_0, G.F16),
        "Q8_0": (G.Q8_0, G.Q8_0, G.Q8_0, G.F16),
    }
    for ftype, (q, v, o, down) in expect.items():
        out = tmp_path / f"{ftype}.gguf"
        report = quantize_file(models["odd-tied"], out, ftype)
        got = types_of(out)
        assert (got["blk.1.attn_q.weight"], got["blk.2.attn_v.weight"]) == (q, v), ftype
        assert (got["blk.0.attn_output.weight"], got["blk.0.ffn_down.weight"]) == (o, down)
        assert got["token_embd.weight"] == G.Q8_0  # tied head, 96 % 256 != 0
        assert report.n_fallback > 0 or ftype == "Q8_0"


def test_pure_gives_the_base_type_everywhere(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "pure.gguf"
    report = quantize_file(models["k256"], out, "Q4_K_M", pure=True)
    assert report.pure
    for name, t in types_of(out).items():
        assert t == (G.F32 if name.endswith("norm.weight") else G.Q4_K), name


def test_plan_of_expert_and_fused_tensors() -> None:
    facts = ModelFacts("qwen2moe", n_layer=2, n_head=8, n_head_kv=8, n_expert=8)
    specs = [
        TensorSpec("blk.0.attn_qkv.weight", (256, 768), G.F32),
        TensorSpec("blk.1.ffn_down_exps.weight", (512, 256, 8), G.F32),
        TensorSpec("blk.1.attn_k.weight", (256, 256), G.F32),
        TensorSpec("blk.0.ffn_gate_inp.weight", (256, 8), G.F32),
    ]
    plan = plan_tensor_types(specs, facts, FILE_TYPES["Q4_K_M"]).types
    assert plan["blk.0.attn_qkv.weight"] == G.Q8_0  # attn_v-like; 8 experts bump it to Q8_0
    assert plan["blk.1.attn_k.weight"] == G.Q8_0
    assert plan["blk.1.ffn_down_exps.weight"] == G.Q6_K  # layer 1 of 2 is a more-bits layer
    assert plan["blk.0.ffn_gate_inp.weight"] == G.F32


# ----------------------------------------------------------------------------------------------
# The written file


@pytest.mark.parametrize("model", ["k256", "f16"])
def test_output_reads_back_with_both_readers(
    models: dict[str, Path], tmp_path: Path, model: str
) -> None:
    src, out = models[model], tmp_path / "q.gguf"
    before = sha256(src)
    report = quantize_file(src, out, "Q4_K_M")
    assert sha256(src) == before  # the input is only read
    assert out.stat().st_size == report.dst_file_bytes < report.src_file_bytes
    assert [p.name for p in tmp_path.iterdir()] == ["q.gguf"]  # no temp file left

    ref = gguf.GGUFReader(out)
    with GGUFFile(src) as f_in, GGUFFile(out) as f_out:
        assert list(f_out.tensors) == list(f_in.tensors)  # order kept
        assert [t.name for t in ref.tensors] == list(f_out.tensors)
        for t in ref.tensors:
            info = f_out.tensors[t.name]
            assert int(t.tensor_type) == info.ggml_type
            assert tuple(int(d) for d in t.shape) == info.shape == f_in.tensors[t.name].shape
            assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1),
                                  f_out.tensor_data(t.name).reshape(-1))  # fmt: skip
        _assert_metadata_kept(f_in, f_out)
        _assert_values_close(f_in, f_out)


def _assert_metadata_kept(f_in: GGUFFile, f_out: GGUFFile) -> None:
    changed = {"general.file_type", "general.quantization_version"}
    keys_in = [k for k in f_in.metadata if k not in changed]
    assert [k for k in f_out.metadata if k not in changed] == keys_in
    for key in keys_in:
        a, b = f_in.metadata[key], f_out.metadata[key]
        assert f_in.value_type(key) == f_out.value_type(key), key
        if hasattr(a, "elem_type"):
            assert a.elem_type == b.elem_type and len(a) == len(b), key
            same = (
                a.all_bytes() == b.all_bytes()
                if a.elem_type == 8
                else np.array_equal(a.to_numpy(), b.to_numpy())
            )
            assert same, key
        else:
            assert a == b, key
    assert f_out.metadata["general.quantization_version"] == 2


def _assert_values_close(f_in: GGUFFile, f_out: GGUFFile) -> None:
    from llmapp.kernels_cpu.quants import dequantize

    for name, info in f_in.tensors.items():
        a = dequantize(f_in.tensor_data(name), info.ggml_type, info.row_len)
        o = f_out.tensors[name]
        b = dequantize(f_out.tensor_data(name), o.ggml_type, o.row_len)
        rel = np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(a**2))
        assert rel < 0.25, name  # Q4_K of random weights: ~0.1


def test_f16_source_is_not_a_requantize(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "q.gguf"
    quantize_file(models["f16"], out, "Q8_0")  # F16 -> Q8_0 needs no flag
    assert set(types_of(out).values()) == {G.F32, G.Q8_0}


def test_requantize_refused_then_allowed(models: dict[str, Path], tmp_path: Path) -> None:
    q8, q4 = tmp_path / "q8.gguf", tmp_path / "q4.gguf"
    quantize_file(models["k256"], q8, "Q8_0")
    with pytest.raises(QuantizeError, match="already quantized.*--allow-requantize"):
        quantize_file(q8, q4, "Q4_K_M")
    assert not q4.exists()
    quantize_file(q8, q4, "Q4_K_M", allow_requantize=True)
    assert types_of(q4) == {name: expected_k256("Q4_K_M", name) for name in types_of(q4)}
    # Same type in and out: tensors are copied, so no flag is needed.
    quantize_file(q8, tmp_path / "again.gguf", "Q8_0")
    with GGUFFile(q8) as a, GGUFFile(tmp_path / "again.gguf") as b:
        for name in a.tensors:
            assert np.array_equal(a.tensor_data(name), b.tensor_data(name))


def test_metadata_edge_values_survive(tmp_path: Path) -> None:
    from llmapp.runtime.files.quantize import _writer_class

    src = tmp_path / "edge.gguf"
    w = _writer_class()(str(src), "llama")
    w.add_uint32("llama.block_count", 1)
    w.add_key_value("edge.empty_array", [], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT64)
    w.add_key_value("edge.empty_string", "", gguf.GGUFValueType.STRING)
    w.add_key_value("edge.u64", 2**63 + 5, gguf.GGUFValueType.UINT64)
    w.add_key_value("edge.f64", 0.1, gguf.GGUFValueType.FLOAT64)
    w.add_key_value(
        "edge.bytes", [b"\xff\xfe", b"ok"], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING
    )
    w.add_tensor("blk.0.ffn_up.weight", np.ones((32, 256), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "out.gguf"
    quantize_file(src, out, "Q8_0")
    with GGUFFile(src) as a, GGUFFile(out) as b:
        _assert_metadata_kept(a, b)
        assert b.metadata["edge.bytes"].all_bytes() == [b"\xff\xfe", b"ok"]


# ----------------------------------------------------------------------------------------------
# Refusals and failures


def test_clear_errors(models: dict[str, Path], tmp_path: Path) -> None:
    src = models["k256"]
    with pytest.raises(QuantizeError, match="unknown quantization type 'Q3_X'"):
        quantize_file(src, tmp_path / "o.gguf", "Q3_X")
    with pytest.raises(QuantizeError, match="overwrite the input"):
        quantize_file(src, src, "Q8_0")
    with pytest.raises(QuantizeError, match="does not exist"):
        quantize_file(src, tmp_path / "missing" / "o.gguf", "Q8_0")
    with pytest.raises(QuantizeError, match="no such file"):
        quantize_file(tmp_path / "nope.gguf", tmp_path / "o.gguf", "Q8_0")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(LlmappError, match="junk.gguf"):
        quantize_file(junk, tmp_path / "o.gguf", "Q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.gguf"]


def test_disk_full_leaves_nothing(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmapp.runtime.files import quantize as rq

    def full(self: Any, tensor: Any, *args: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rq._writer_class(), "write_tensor_data", full)
    out = tmp_path / "q.gguf"
    with pytest.raises(QuantizeError, match="No space left on device"):
        quantize_file(models["k256"], out, "Q8_0")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_replaced_whole(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "q.gguf"
    out.write_bytes(b"old")
    quantize_file(models["f16"], out, "Q8_0")
    assert out.read_bytes()[:4] == b"GGUF"


# ----------------------------------------------------------------------------------------------
# The command


def test_cli_quantize(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "q.gguf"
    assert main(["quantize", str(models["k256"]), str(out), "--type", "q4_k_m"]) == 0
    text = capsys.readouterr().out
    assert "[ 1/75] token_embd.weight" in text
    assert "F32 -> Q6_K" in text and "F32 (copied)" in text
    assert "size: " in text and f"wrote {out}" in text
    assert main(["quantize", str(out), str(tmp_path / "r.gguf"), "--type", "Q2_K"]) == 1
    assert "--allow-requantize" in capsys.readouterr().err
    flags = ["--type", "Q2_K", "--allow-requantize", "--pure"]
    assert main(["quantize", str(out), str(tmp_path / "r.gguf"), *flags]) == 0


# ----------------------------------------------------------------------------------------------
# The peer: llama.cpp's quantizer on the same F32 files


def _peer_compare(src: Path, ftype: str, tmp_path: Path) -> dict[str, Any]:
    pytest.importorskip("llama_cpp")
    return dict(bench.compare(src, ftype, tmp_path))


@pytest.mark.peer
@pytest.mark.parametrize("ftype", list(FILE_TYPES))
@pytest.mark.parametrize("model", ["k256", "k256-gqa2-tied", "odd-tied"])
def test_same_choices_and_error_as_llama_cpp(
    models: dict[str, Path], tmp_path: Path, ftype: str, model: str
) -> None:
    result = _peer_compare(models[model], ftype, tmp_path)
    for row in result["tensors"]:
        assert row["type"] == row["llama_type"], row["tensor"]
        assert row["ratio"] <= 1.1, row
    # The same algorithms in the same float order: in practice the very same bytes.
    with GGUFFile(tmp_path / f"ours-{ftype}.gguf") as a:
        with GGUFFile(tmp_path / f"llama-{ftype}.gguf") as b:
            for name in a.tensors:
                assert np.array_equal(a.tensor_data(name), b.tensor_data(name)), name


@pytest.mark.real_model
def test_real_model_requantized_reads_back(smollm2_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "smollm2-q8.gguf"
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize_file(smollm2_path, out, "Q8_0")
    report = quantize_file(smollm2_path, out, "Q8_0", allow_requantize=True)
    assert report.type_counts["Q8_0"] > 0
    gguf.GGUFReader(out)
    with GGUFFile(out) as f:
        assert f.metadata["general.file_type"] == 7
        assert {info.ggml_type for info in f.tensors.values()} <= {G.F32, G.Q8_0}
