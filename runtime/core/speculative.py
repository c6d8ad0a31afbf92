"""N-gram speculative decoding: draft tokens by prompt lookup, verify them in one forward pass.

Editing work (rewrite this function, fix this file, reformat this JSON) repeats long runs of
its own context. The drafter finds the latest earlier place where the last n tokens occurred
(n from `max_ngram` down to 1) and proposes the tokens that followed there. The engine feeds
the pending token and the drafts as one sequence chunk, gets logits for every row, and samples
position by position from the same sampler as plain decoding: while the sampled token equals
the draft, the next row's logits are valid and the next position is sampled too. With a
one-token (deterministic) draft this acceptance is exact: every emitted token is drawn from
the same distribution, with the same random numbers, as without speculation, so greedy output
is identical and sampled output has the same distribution.

`DraftBudget` adapts how many tokens to draft: it doubles after a fully accepted draft, halves
after a rejected first token, and rests a while when drafts keep failing, so speculation costs
little where the text does not repeat itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def ngram_draft(
    token_ids: Sequence[int], k: int, max_ngram: int = 3, min_ngram: int = 1
) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the context's last n-gram."""
    if k <= 0 or len(token_ids) < 2:
        return []
    ids = np.asarray(token_ids, dtype=np.int64)
    last = len(ids)
    for n in range(min(max_ngram, last - 1), min_ngram - 1, -1):
        tail = ids[last - n :]
        # Candidate starts: where the n-gram's first token occurs, before the tail itself.
        starts = np.flatnonzero(ids[: last - n] == tail[0])
        for start in starts[::-1]:  # the latest occurrence first: most like what comes next
            if np.array_equal(ids[start : start + n], tail):
                follow = ids[start + n : start + n + k]
                if len(follow):
                    return [int(t) for t in follow]
    return []


@dataclass
class DraftBudget:
    """How many tokens one request drafts next, from how its drafts fared so far."""

    max_tokens: int
    current: int = 0
    rest: int = 0  # steps left without drafting
    misses: int = 0  # consecutive drafts whose first token was rejected
    drafted: int = 0
    accepted: int = 0

    def __post_init__(self) -> None:
        self.current = self.max_tokens

    def next_k(self) -> int:
        if self.rest > 0:
            self.rest -= 1
            return 0
        return self.current

    def record(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        if drafted == 0:
            return
        if accepted == drafted:
            self.current = min(self.max_tokens, self.current * 2)
            self.misses = 0
        elif accepted == 0:
            self.current = max(1, self.current // 2)
            self.misses += 1
            if self.misses >= 3:  # the text is not repeating itself: stop paying for drafts
                self.rest = 8 * (self.misses - 2)
        else:
            self.current = max(1, accepted + 1)
            self.misses = 0
