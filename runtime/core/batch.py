"""What one forward step computes: token rows of several sequences and where their K/V go."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ForwardBatch:
    """Rows of the step, grouped by sequence (rows of sequence s: query_start_loc[s]:[s+1]).

    token_ids, positions, slot_mapping: [T]; block_tables: [S, max_blocks] (-1 padded);
    seq_lens: [S] keys visible to each sequence after this step; logits_rows: rows whose
    logits are wanted (usually each sequence's last row).
    """

    token_ids: np.ndarray  # int32 [T]
    positions: np.ndarray  # int32 [T]
    query_start_loc: np.ndarray  # int32 [S+1]
    seq_lens: np.ndarray  # int32 [S]
    block_tables: np.ndarray  # int32 [S, max_blocks]
    slot_mapping: np.ndarray  # int64 [T]
    logits_rows: np.ndarray  # int64 [R]

    def __post_init__(self) -> None:
        t = len(self.token_ids)
        if len(self.positions) != t or len(self.slot_mapping) != t:
            raise ValueError("token_ids, positions and slot_mapping differ in length")
        if self.query_start_loc[-1] != t or len(self.query_start_loc) != len(self.seq_lens) + 1:
            raise ValueError("query_start_loc does not cover the rows")

    @property
    def num_rows(self) -> int:
        return len(self.token_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)


def build_batch(seqs: list[tuple[list[int], int, list[int], int]], block_size: int) -> ForwardBatch:
    """Pack (token ids of the whole sequence, num_computed, block_table, num_logits) tuples.

    Each sequence contributes its tokens from num_computed to the end of its id list; logits
    are wanted for its last num_logits rows (1 for generation, all of them for perplexity).
    """
    tokens: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    starts = [0]
    seq_lens: list[int] = []
    logits_rows: list[int] = []
    max_blocks = max(len(s[2]) for s in seqs)
    tables = np.full((len(seqs), max(max_blocks, 1)), -1, dtype=np.int32)
    for s, (ids, num_computed, table, num_logits) in enumerate(seqs):
        new = ids[num_computed:]
        pos = range(num_computed, num_computed + len(new))
        tokens.extend(new)
        positions.extend(pos)
        slots.extend(table[p // block_size] * block_size + p % block_size for p in pos)
        starts.append(len(tokens))
        seq_lens.append(num_computed + len(new))
        tables[s, : len(table)] = table
        first = len(tokens) - min(num_logits, len(new))
        logits_rows.extend(range(first, len(tokens)))
    return ForwardBatch(
        token_ids=np.asarray(tokens, dtype=np.int32),
        positions=np.asarray(positions, dtype=np.int32),
        query_start_loc=np.asarray(starts, dtype=np.int32),
        seq_lens=np.asarray(seq_lens, dtype=np.int32),
        block_tables=tables,
        slot_mapping=np.asarray(slots, dtype=np.int64),
        logits_rows=np.asarray(logits_rows, dtype=np.int64),
    )
