"""Every tensor of the three real models dequantizes exactly as the gguf package does."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf import quants as oracle

from llmapp.kernels_cpu import quants

# Rows per comparison step: keeps the oracle's temporaries small on the big embedding tables.
CHUNK_ELEMENTS = 1 << 22


def check_model(path: Path) -> Counter[str]:
    """Compare every tensor of a GGUF file; returns the count of tensors per type name."""
    reader = GGUFReader(path)
    seen: Counter[str] = Counter()
    rng = np.random.default_rng(0)
    for tensor in reader.tensors:
        ggml_type = int(tensor.tensor_type)
        row_len = int(tensor.shape[0])
        assert ggml_type in quants.supported_types(), f"{tensor.name}: type {ggml_type}"
        data = tensor.data  # raw uint8 rows for quant types; float arrays for F32/F16
        n_rows = int(tensor.n_elements) // row_len
        rows = data.reshape(n_rows, -1)
        step = max(1, CHUNK_ELEMENTS // row_len)
        for r0 in range(0, n_rows, step):
            chunk = rows[r0 : r0 + step]
            want = np.asarray(oracle.dequantize(chunk, GGMLQuantizationType(ggml_type)))
            got = quants.dequantize(chunk, ggml_type, row_len)
            assert np.array_equal(
                got.view(np.uint32), want.astype(np.float32).reshape(got.shape).view(np.uint32)
            ), f"{tensor.name} rows {r0}..{r0 + len(chunk)}"
        # Single-row lookups on the whole tensor, as an embedding lookup does.
        picks = rng.integers(0, n_rows, size=min(n_rows, 4))
        want_rows = np.asarray(oracle.dequantize(rows[picks], GGMLQuantizationType(ggml_type)))
        got_rows = quants.dequantize_rows(rows, ggml_type, row_len, picks)
        assert np.array_equal(
            got_rows.view(np.uint32), want_rows.reshape(got_rows.shape).view(np.uint32)
        )
        seen[GGMLQuantizationType(ggml_type).name] += 1
    return seen


@pytest.mark.real_model
@pytest.mark.parametrize(
    ("fixture", "types"),
    [
        ("smollm2_path", {"Q4_1", "Q8_0", "F32"}),
        ("gemma3_path", {"Q5_0", "Q4_K", "Q6_K", "Q8_0", "F32"}),
        ("qwen2_path", {"Q5_0", "Q4_K", "Q6_K", "Q8_0", "F32"}),
    ],
)
def test_every_tensor_matches_oracle(
    fixture: str, types: set[str], request: pytest.FixtureRequest
) -> None:
    path = request.getfixturevalue(fixture)
    seen = check_model(path)
    assert set(seen) == types
