"""ggml tensor types: id, elements per block, bytes per block (facts of the GGUF format)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class GGMLType(IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ4_NL = 20
    BF16 = 30


@dataclass(frozen=True)
class TypeTraits:
    block_size: int  # elements per block
    type_size: int  # bytes per block


TYPE_TRAITS: dict[int, TypeTraits] = {
    GGMLType.F32: TypeTraits(1, 4),
    GGMLType.F16: TypeTraits(1, 2),
    GGMLType.BF16: TypeTraits(1, 2),
    GGMLType.Q4_0: TypeTraits(32, 18),
    GGMLType.Q4_1: TypeTraits(32, 20),
    GGMLType.Q5_0: TypeTraits(32, 22),
    GGMLType.Q5_1: TypeTraits(32, 24),
    GGMLType.Q8_0: TypeTraits(32, 34),
    GGMLType.IQ4_NL: TypeTraits(32, 18),
    GGMLType.Q2_K: TypeTraits(256, 84),
    GGMLType.Q3_K: TypeTraits(256, 110),
    GGMLType.Q4_K: TypeTraits(256, 144),
    GGMLType.Q5_K: TypeTraits(256, 176),
    GGMLType.Q6_K: TypeTraits(256, 210),
}
"""Types we can read and run. Q8_1 and Q8_K exist only as activation formats."""


def type_name(type_id: int) -> str:
    try:
        return GGMLType(type_id).name
    except ValueError:
        return f"type {type_id}"


def row_bytes(type_id: int, n_elements: int) -> int:
    """Bytes taken by one row of n_elements of this type (n_elements a multiple of the block)."""
    t = TYPE_TRAITS[type_id]
    return n_elements // t.block_size * t.type_size
