"""Per-user histories as padded batches for ``forward_sequence``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd
import torch


@dataclass
class UserSequences:
    """Events grouped by user, each user's events in time order (ties keep input order)."""

    users: np.ndarray  # int64 [U] user ids
    offsets: np.ndarray  # int64 [U] start of each user's events in the flat arrays
    lengths: np.ndarray  # int64 [U]
    movie: np.ndarray  # int64 [N]
    rating: np.ndarray  # float32 [N]
    ts: np.ndarray  # int64 [N]
    flag: np.ndarray  # bool [N] (e.g. "score this event")
    row: np.ndarray  # int64 [N] position of the event in the input frame

    @property
    def n_users(self) -> int:
        return len(self.users)


def build_sequences(df: pd.DataFrame, flag: np.ndarray | None = None) -> UserSequences:
    n = len(df)
    user = df["user_id"].to_numpy(np.int64)
    ts = df["ts"].to_numpy(np.int64)
    order = np.lexsort((np.arange(n), ts, user))  # by user, then ts, then input order
    u_sorted = user[order]
    users, offsets, lengths = np.unique(u_sorted, return_index=True, return_counts=True)
    fl = np.ones(n, dtype=bool) if flag is None else np.asarray(flag, dtype=bool)
    return UserSequences(
        users=users.astype(np.int64),
        offsets=offsets.astype(np.int64),
        lengths=lengths.astype(np.int64),
        movie=df["movie_id"].to_numpy(np.int64)[order],
        rating=df["rating"].to_numpy(np.float32)[order],
        ts=ts[order],
        flag=fl[order],
        row=order.astype(np.int64),
    )


@dataclass
class Batch:
    idx: np.ndarray  # which users (indices into UserSequences)
    movie: torch.Tensor
    rating: torch.Tensor
    ts: torch.Tensor
    mask: torch.Tensor
    row: np.ndarray  # [B, T] input row per position (-1 on padding)


def pad(seqs: UserSequences, idx: np.ndarray, device: torch.device | str = "cpu") -> Batch:
    L = seqs.lengths[idx]
    T = max(1, int(L.max()) if len(idx) else 1)
    pos = np.arange(T)[None, :]
    mask = pos < L[:, None]
    src = np.where(mask, seqs.offsets[idx][:, None] + pos, 0)
    g = lambda a, fill: np.where(mask, a[src], fill)  # noqa: E731
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    return Batch(
        idx=idx,
        movie=t(g(seqs.movie, 0)),
        rating=t(g(seqs.rating, 0.0).astype(np.float32)),
        ts=t(g(seqs.ts, 0)),
        mask=t(mask),
        row=np.where(mask, seqs.row[src], -1),
    )


def batch_indices(
    seqs: UserSequences, batch_users: int, *, max_events: int | None = None,
    rng: np.random.Generator | None = None,
) -> list[np.ndarray]:
    """Users bucketed by length (little padding); batches shuffled if ``rng``.
    ``max_events`` caps B*T so long histories come in smaller batches."""
    order = np.argsort(seqs.lengths, kind="stable")
    if rng is not None:
        # shuffle within equal lengths a little, keep buckets
        noise = rng.random(len(order)) * 0.5
        order = np.argsort(seqs.lengths + noise, kind="stable")
    out: list[np.ndarray] = []
    i = 0
    while i < len(order):
        j = min(i + batch_users, len(order))
        if max_events:
            while j - i > 1 and seqs.lengths[order[j - 1]] * (j - i) > max_events:
                j -= 1
        out.append(order[i:j])
        i = j
    if rng is not None:
        rng.shuffle(out)
    return out


def iterate(
    seqs: UserSequences, batch_users: int, device: torch.device | str = "cpu", *,
    max_events: int | None = None, rng: np.random.Generator | None = None,
) -> Iterator[Batch]:
    for idx in batch_indices(seqs, batch_users, max_events=max_events, rng=rng):
        yield pad(seqs, idx, device)
