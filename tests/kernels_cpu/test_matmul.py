"""Packed weights against gguf-py's dequantizer, and both matmul paths against numpy."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize, quantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmapp.kernels_cpu import matmul as mm

BLOCK32 = (mm.Q4_0, mm.Q4_1, mm.Q5_0, mm.Q5_1, mm.Q8_0)
ALL_TYPES = mm.SUPPORTED_TYPES


def type_name(kind: int) -> str:
    return gguf.GGMLQuantizationType(kind).name


def make_raw(kind: int, n_rows: int, row_len: int, seed: int = 0) -> np.ndarray:
    """Raw rows of a type: the gguf quantizer where it has one, else random bytes (K-quants,
    IQ4_NL) with small finite f16 scale fields."""
    rng = np.random.default_rng(seed)
    if kind in mm.FLOAT_TYPES:
        w = rng.standard_normal((n_rows, row_len)).astype(np.float32)
        if kind == mm.F32:
            return w.view(np.uint8)
        if kind == mm.F16:
            return w.astype(np.float16).view(np.uint8)
        return (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    if kind in BLOCK32:
        w = rng.standard_normal((n_rows, row_len)).astype(np.float32)
        return quantize(w, gguf.GGMLQuantizationType(kind))
    spec = mm.QUANT_SPECS[kind]
    nb = row_len // spec.block
    raw = rng.integers(0, 256, size=(n_rows, nb, spec.nbytes), dtype=np.uint8)
    for off in spec.halves:
        half = (rng.random((n_rows, nb)) * 0.01 + 0.001).astype(np.float16)
        raw[:, :, off : off + 2] = half.view(np.uint8).reshape(n_rows, nb, 2)
    return raw.reshape(n_rows, nb * spec.nbytes)


def oracle(raw: np.ndarray, kind: int) -> np.ndarray:
    return dequantize(raw, gguf.GGMLQuantizationType(kind)).astype(np.float32)


@pytest.fixture(scope="module", params=ALL_TYPES, ids=type_name)
def packed(request: pytest.FixtureRequest) -> tuple[int, np.ndarray, mm.PackedWeight]:
    kind = request.param
    raw = make_raw(kind, 45, 512)  # 45 rows: the last tile is partial
    return kind, raw, mm.pack_weight(raw, kind, 512)


def test_unpack_equals_gguf_dequantize(packed: tuple[int, np.ndarray, mm.PackedWeight]) -> None:
    kind, raw, w = packed
    np.testing.assert_array_equal(mm.unpack_weight(w), oracle(raw, kind))


def test_layout_fields(packed: tuple[int, np.ndarray, mm.PackedWeight]) -> None:
    kind, _, w = packed
    assert (w.ggml_type, w.n_rows, w.row_len, w.n_tiles) == (kind, 45, 512, 2)
    if kind in mm.FLOAT_TYPES:
        assert w.is_float and w.lo.shape == (2, 0)
        return
    spec, lay = mm.QUANT_SPECS[kind], mm.LAYOUTS[kind]
    assert w.group == spec.group and w.has_min == spec.has_min and w.bias == lay.bias
    assert w.lo.shape == (2, 512 * mm.TILE * lay.lo_bits // 8) and w.lo.dtype == np.uint8
    assert w.hi.shape == (2, 512 * mm.TILE * lay.hi_bits // 8)
    assert w.d.shape == (2, 512 // lay.block * mm.TILE) and w.d.dtype == np.uint16
    assert w.dm.shape == (2, w.d.shape[1] if spec.has_min else 0)
    n_sub = 512 // spec.group * mm.TILE if lay.block > 32 else 0
    assert w.sub.shape == (2, n_sub)
    # The file's bits per weight, give or take the K-quants' sub-scales kept a byte each.
    file_bits = spec.nbytes * 8 / spec.block
    assert file_bits <= w.nbytes * 8 / (2 * mm.TILE * 512) <= file_bits + 0.13


def quantized_input(x: np.ndarray) -> np.ndarray:
    """x as the int8 path sees it: int8 blocks of 32 times their scale."""
    xq, xs, _ = mm.quantize_activations(x)
    return xq.astype(np.float32) * np.repeat(xs, 32, axis=1)


def assert_close(got: np.ndarray, want: np.ndarray, rel: float) -> None:
    scale = float(np.abs(want).max())
    assert float(np.abs(got - want).max()) <= rel * scale


def assert_within_activation_error(got: np.ndarray, x: np.ndarray, wf: np.ndarray) -> None:
    """|error| <= sum_k |W[n, k]| * (half an int8 step of x's block k), element by element."""
    _, xs, _ = mm.quantize_activations(x)
    half_step = np.repeat(xs, 32, axis=1) * 0.5
    bound = half_step.astype(np.float64) @ np.abs(wf.astype(np.float64)).T
    want = mm.matmul_ref(x, wf)
    assert np.all(np.abs(got - want) <= bound * 1.01 + 1e-5 * np.abs(want).max())


@pytest.mark.parametrize("m_rows", [1, 2, 3, 4, 5, 8])
def test_int_path(packed: tuple[int, np.ndarray, mm.PackedWeight], m_rows: int) -> None:
    kind, raw, w = packed
    wf = oracle(raw, kind)
    x = np.random.default_rng(m_rows).standard_normal((m_rows, 512)).astype(np.float32)
    got = mm.matmul(x, w, path="int")
    if w.is_float:  # float weights always take the float path
        assert_close(got, mm.matmul_ref(x, wf), 1e-5)
        return
    # Exact up to float rounding against the quantized activations it really used ...
    assert_close(got, mm.matmul_ref(quantized_input(x), wf), 1e-5)
    # ... and within int8 activation error of the float product.
    assert_within_activation_error(got, x, wf)


@pytest.mark.parametrize("m_rows", [1, 6, 64, 70])
def test_float_path(packed: tuple[int, np.ndarray, mm.PackedWeight], m_rows: int) -> None:
    kind, raw, w = packed
    x = np.random.default_rng(m_rows).standard_normal((m_rows, 512)).astype(np.float32)
    got = mm.matmul(x, w, path="float")
    assert got.shape == (m_rows, 45)
    assert_close(got, mm.matmul_ref(x, oracle(raw, kind)), 1e-5)


def test_auto_path_is_int8_for_quantized_weights() -> None:
    # The default path computes with int8 activations at every M: exact against the reference
    # fed the quantized activations, and measurably not the float path's (exact) result.
    raw = make_raw(mm.Q8_0, 64, 256)
    w = mm.pack_weight(raw, mm.Q8_0, 256)
    x = np.random.default_rng(0).standard_normal((130, 256)).astype(np.float32)
    for m_rows in (1, 2, 130):
        got = mm.matmul(x[:m_rows], w)
        assert_close(got, mm.matmul_ref(quantized_input(x[:m_rows]), oracle(raw, mm.Q8_0)), 1e-5)
        assert np.abs(got - mm.matmul(x[:m_rows], w, path="float")).max() > 1e-4
    with pytest.raises(ValueError):
        mm.matmul(x, w, path="fast")


@pytest.mark.parametrize("kind", [mm.Q4_0, mm.Q4_K, mm.Q6_K, mm.Q8_0])
def test_row_result_independent_of_batch(kind: int) -> None:
    # A row computes the same bits alone (1-row kernel) as in any block of 4 (padded or not):
    # a session's tokens must not depend on which sessions share its step.
    w = mm.pack_weight(make_raw(kind, 70, 512), kind, 512)
    x = np.random.default_rng(6).standard_normal((7, 512)).astype(np.float32)
    together = mm.matmul(x, w)
    for m in range(7):
        np.testing.assert_array_equal(mm.matmul(x[m : m + 1], w)[0], together[m])
    np.testing.assert_array_equal(mm.matmul(x[:2], w), together[:2])


@pytest.mark.parametrize("kind", list(mm.QUANT_SPECS), ids=type_name)
def test_unpacked_tiles_match_registers(kind: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # The two ways of the int8 path (planes unpacked in registers per 4 rows, or each tile once
    # into the byte-per-weight form) give the same bits, 1-row kernel and 4-row passes alike.
    w = mm.pack_weight(make_raw(kind, 40, 512), kind, 512)
    x = np.random.default_rng(8).standard_normal((6, 512)).astype(np.float32)
    monkeypatch.setattr(mm, "UNPACK_ROWS", {})
    direct = mm.matmul(x, w)
    monkeypatch.setattr(mm, "UNPACK_ROWS", {kind: 2})
    np.testing.assert_array_equal(mm.matmul(x, w), direct)
    np.testing.assert_array_equal(mm.matmul(x[:2], w), direct[:2])


@pytest.mark.skipif(not mm.USE_VNNI, reason="no VNNI here: both runs would be the portable code")
@pytest.mark.parametrize("kind", [mm.Q4_1, mm.Q5_0, mm.Q2_K, mm.Q3_K, mm.Q6_K, mm.IQ4_NL])
@pytest.mark.parametrize("m_rows", [1, 6])
def test_portable_dot_matches_vnni(kind: int, m_rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # The code for CPUs without VNNI, run here: integer sums are exact, so the bits agree.
    raw = make_raw(kind, 40, 512)
    w = mm.pack_weight(raw, kind, 512)
    x = np.random.default_rng(7).standard_normal((m_rows, 512)).astype(np.float32)
    fast = mm.matmul(x, w)
    monkeypatch.setattr(mm, "USE_VNNI", False)
    portable = mm.matmul(x, w)
    np.testing.assert_array_equal(portable, fast)
    assert_close(portable, mm.matmul_ref(quantized_input(x), oracle(raw, kind)), 1e-5)


def test_out_argument_and_strided_input() -> None:
    raw = make_raw(mm.Q4_0, 64, 256)
    w = mm.pack_weight(raw, mm.Q4_0, 256)
    big = np.random.default_rng(1).standard_normal((3, 512)).astype(np.float32)
    x = big[:, ::2]  # not contiguous
    out = np.full((3, 64), np.nan, np.float32)
    res = mm.matmul(x, w, out=out)
    assert res is out
    np.testing.assert_array_equal(out, mm.matmul(np.ascontiguousarray(x), w))


def test_odd_float_row_length() -> None:
    # F32 rows need no block: K = 37 is padded inside the tile.
    w_float = np.random.default_rng(2).standard_normal((33, 37)).astype(np.float32)
    w = mm.pack_weight(w_float.view(np.uint8), mm.F32, 37)
    x = np.random.default_rng(3).standard_normal((2, 37)).astype(np.float32)
    np.testing.assert_array_equal(mm.unpack_weight(w), w_float)
    assert_close(mm.matmul(x, w), mm.matmul_ref(x, w_float), 1e-5)


def test_readonly_memmap_like_input() -> None:
    raw = make_raw(mm.Q6_K, 32, 256)
    ro = raw.copy()
    ro.setflags(write=False)
    w = mm.pack_weight(ro, mm.Q6_K, 256)
    np.testing.assert_array_equal(mm.unpack_weight(w), oracle(raw, mm.Q6_K))


def test_pack_weights_matches_parts() -> None:
    raw_a, raw_b = make_raw(mm.Q5_0, 64, 256, 1), make_raw(mm.Q8_0, 40, 256, 2)
    a, b = mm.pack_weight(raw_a, mm.Q5_0, 256), mm.pack_weight(raw_b, mm.Q8_0, 256)
    ab = mm.pack_weights([(raw_a, mm.Q5_0, 256), (raw_b, mm.Q8_0, 256)])
    assert ab.n_rows == 104 and ab.ggml_type == -1 and ab.n_tiles == 4
    np.testing.assert_array_equal(
        mm.unpack_weight(ab), np.vstack([oracle(raw_a, mm.Q5_0), oracle(raw_b, mm.Q8_0)])
    )
    x = np.random.default_rng(4).standard_normal((3, 256)).astype(np.float32)
    np.testing.assert_array_equal(mm.matmul(x, ab), np.hstack([mm.matmul(x, a), mm.matmul(x, b)]))


@pytest.mark.parametrize(
    "parts, problem",
    [
        ([(mm.Q5_0, 40, 256), (mm.Q5_0, 32, 256)], "whole tiles"),
        ([(mm.Q5_0, 32, 256), (mm.Q5_0, 32, 512)], "row length"),
        ([(mm.Q8_0, 32, 256), (mm.F16, 32, 256)], "float"),
    ],
)
def test_pack_weights_refuses_parts_that_cannot_share_tiles(
    parts: list[tuple[int, int, int]], problem: str
) -> None:
    raws = [(make_raw(t, n, k), t, k) for t, n, k in parts]
    with pytest.raises(ValueError, match=problem):
        mm.pack_weights(raws)


def test_pack_weights_of_mixed_layouts() -> None:
    # Mins on one side only, groups of 32 and 16, the same type twice in a row (one run): each
    # run of a type is its own sub-weight, writing its columns of the one output.
    kinds = [(mm.Q5_0, 64), (mm.Q5_0, 32), (mm.Q4_1, 32), (mm.Q6_K, 45)]
    raws = [(make_raw(t, n, 256, i), t, 256) for i, (t, n) in enumerate(kinds)]
    w = mm.pack_weights(raws)
    assert w.ggml_type == -1 and [p.ggml_type for p in w.parts] == [mm.Q5_0, mm.Q4_1, mm.Q6_K]
    assert w.n_rows == 173 and w.nbytes == sum(p.nbytes for p in w.parts)
    np.testing.assert_array_equal(
        mm.unpack_weight(w), np.vstack([oracle(r, t) for r, t, _ in raws])
    )
    x = np.random.default_rng(4).standard_normal((5, 256)).astype(np.float32)
    alone = [mm.matmul(x, mm.pack_weight(*part)) for part in raws]
    for path in ("int", "float"):
        want = np.hstack([mm.matmul(x, mm.pack_weight(*p), path=path) for p in raws])
        np.testing.assert_array_equal(mm.matmul(x, w, path=path), want)
    np.testing.assert_array_equal(mm.matmul(x[:1], w), np.hstack(alone)[:1])


def test_quantize_activations() -> None:
    x = np.random.default_rng(5).standard_normal((2, 64)).astype(np.float32) * 3
    x[1, :32] = 0  # an all-zero block
    xq, xs, xsum = mm.quantize_activations(x, group=16)
    assert xq.dtype == np.int8 and np.abs(xq).max() <= 127
    assert xs[1, 0] == 0 and not xq[1, :32].any()
    deq = xq.astype(np.float32) * np.repeat(xs, 32, axis=1)
    assert np.all(np.abs(deq - x) <= np.repeat(xs, 32, axis=1) * 0.5 + 1e-6)
    np.testing.assert_allclose(xsum, deq.reshape(2, 4, 16).sum(axis=2), rtol=1e-5, atol=1e-5)


def test_rejects_bad_input() -> None:
    raw = make_raw(mm.Q4_0, 4, 64)
    with pytest.raises(ValueError):
        mm.pack_weight(raw, mm.Q4_0, 96)  # wrong row bytes
    with pytest.raises(ValueError):
        mm.pack_weight(raw, 99, 64)  # unknown type
    with pytest.raises(ValueError):
        mm.pack_weight(raw[:, :17], mm.Q4_0, 33)  # not a multiple of the block
    w = mm.pack_weight(raw, mm.Q4_0, 64)
    with pytest.raises(ValueError):
        mm.matmul(np.zeros((1, 32), np.float32), w)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from([mm.Q4_K, mm.Q2_K, mm.Q5_1, mm.IQ4_NL, mm.BF16]),
    n_rows=st.integers(1, 70),
    n_blocks=st.integers(1, 3),
    m_rows=st.integers(1, 9),
)
def test_shapes(kind: int, n_rows: int, n_blocks: int, m_rows: int) -> None:
    row_len = 256 * n_blocks
    raw = make_raw(kind, n_rows, row_len, seed=n_rows)
    w = mm.pack_weight(raw, kind, row_len)
    wf = oracle(raw, kind)
    x = np.random.default_rng(m_rows).standard_normal((m_rows, row_len)).astype(np.float32)
    assert_close(mm.matmul(x, w, path="float"), mm.matmul_ref(x, wf), 1e-5)
    assert_within_activation_error(mm.matmul(x, w, path="int"), x, wf)


@pytest.mark.parametrize("m_rows", [1, 5, 64])
def test_threaded_split_matches_reference(m_rows: int) -> None:
    # Big enough for the parallel kernels (>= SERIAL_MACS); 10 tiles split over the threads.
    raw = make_raw(mm.Q4_K, 300, 2048)
    w = mm.pack_weight(raw, mm.Q4_K, 2048)
    assert 300 * 2048 * -(-m_rows // 4) >= mm.SERIAL_MACS
    x = np.random.default_rng(9).standard_normal((m_rows, 2048)).astype(np.float32)
    wf = oracle(raw, mm.Q4_K)
    assert_close(mm.matmul(x, w), mm.matmul_ref(quantized_input(x), wf), 1e-5)
    assert_close(mm.matmul(x, w, path="float"), mm.matmul_ref(x, wf), 1e-5)


def test_rejects_bad_out() -> None:
    w = mm.pack_weight(make_raw(mm.Q8_0, 32, 64), mm.Q8_0, 64)
    x = np.ones((2, 64), np.float32)
    for bad in (np.empty((2, 31), np.float32), np.empty((2, 32)), np.empty((32, 2), np.float32).T):
        with pytest.raises(ValueError):
            mm.matmul(x, w, out=bad)
