"""Per-user state slices <-> compact bytes, and the state-after-swap policy.

Callers outside ``models/`` go through the protocol
(:meth:`models.base.RatingModel.pack_states`, ``unpack_states``,
``rederive``), which delegates here.

Blob layout (all little-endian)::

    magic  b"FBPS"            4 bytes
    format u8 (=1)            1
    name_len u8, name utf-8   1 + len
    model version u32         4
    spec fingerprint          8  (first 8 bytes of sha256 over model name and
                                  every state tensor's name/shape/dtype)
    payload                   raw tensor bytes in ``state_spec`` order

The payload uses each tensor's dtype from ``state_spec`` (float32, int64,
int16).  Bytes per user at default hparams (W=32; payload + header):
baseline 670 + 26 = 696, cnn (k=8) 1022 + 21 = 1043, mf (k=10) 1190 + 20 = 1210,
lstm (hidden=32, k=12, with its online part's user side and no genres) 2838 + 22 = 2860,
toy 662 + 21 = 683.  The generic part (count, mean,
last_ts, window of 32 events, win_len) is 662 bytes of that.

Model version changes keep the layout (same fingerprint) but make a user's
model-specific state stale (it was computed with other weights):
:func:`unpack_batch` reports those rows and :func:`rederive` recomputes them
from the stored window -- the state-after-swap policy the stream uses.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # models.base delegates packing to this module
    from models.base import RatingModel

State = dict[str, Tensor]
StateSpec = dict[str, tuple[tuple[int, ...], torch.dtype]]

MAGIC = b"FBPS"
FORMAT = 1

_NP = {
    torch.float32: "<f4",
    torch.float64: "<f8",
    torch.int64: "<i8",
    torch.int32: "<i4",
    torch.int16: "<i2",
    torch.uint8: "u1",
    torch.bool: "?",
}


from fbp_errors import StateMismatch  # a stored state of another model (name or state layout)


def spec_fingerprint(name: str, spec: StateSpec) -> bytes:
    h = hashlib.sha256(name.encode())
    for k, (shape, dt) in spec.items():
        h.update(f"|{k}:{tuple(shape)}:{dt}".encode())
    return h.digest()[:8]


def _struct_dtype(spec: StateSpec) -> np.dtype:
    return np.dtype([(k, _NP[dt], tuple(shape)) for k, (shape, dt) in spec.items()])


def _header(model: RatingModel) -> bytes:
    name = model.name.encode()
    return (
        MAGIC
        + bytes([FORMAT, len(name)])
        + name
        + struct.pack("<I", int(model.version) & 0xFFFFFFFF)
        + spec_fingerprint(model.name, model.state_spec())
    )


def state_bytes(model: RatingModel) -> int:
    """Size of one packed user state (header + payload)."""
    return len(_header(model)) + _struct_dtype(model.state_spec()).itemsize


def pack_batch(model: RatingModel, state: State) -> list[bytes]:
    """One blob per row of ``state``."""
    spec = model.state_spec()
    sdt = _struct_dtype(spec)
    B = next(iter(state.values())).shape[0]
    arr = np.zeros(B, dtype=sdt)
    for k in spec:
        arr[k] = state[k].detach().cpu().numpy()
    head = _header(model)
    raw = arr.tobytes()
    n = sdt.itemsize
    return [head + raw[i * n : (i + 1) * n] for i in range(B)]


def parse_header(blob: bytes) -> tuple[str, int, bytes, int]:
    """(model name, version, fingerprint, payload offset); StateMismatch if malformed."""
    if len(blob) < 7 or blob[:4] != MAGIC:
        raise StateMismatch("not a feedback-predictor state blob (bad magic)")
    if blob[4] != FORMAT:
        raise StateMismatch(f"state blob format {blob[4]} unsupported (want {FORMAT})")
    nl = blob[5]
    off = 6 + nl
    if len(blob) < off + 12:
        raise StateMismatch("state blob truncated in header")
    name = blob[6:off].decode("utf-8", "replace")
    (version,) = struct.unpack("<I", blob[off : off + 4])
    fp = blob[off + 4 : off + 12]
    return name, version, fp, off + 12


def unpack_batch(
    model: RatingModel, blobs: Sequence[bytes | None], device: torch.device | str | None = None
) -> tuple[State, Tensor, Tensor]:
    """Blobs (None = new user) -> (state [B], stale bool[B], foreign bool[B]).

    ``stale[i]`` is True when blob i was written under another model version
    (same name and layout): its rows should go through :func:`rederive`.
    ``foreign[i]`` is True when blob i cannot be read by ``model`` at all
    (another model family, another state layout, a malformed blob): its row
    is left at the initial state -- the caller resets that user (and counts
    it) rather than stopping, since a family switch must not stop a stream.
    """
    device = device or model.device
    spec = model.state_spec()
    sdt = _struct_dtype(spec)
    fp_want = spec_fingerprint(model.name, spec)
    B = len(blobs)
    state = model.init_state(B, "cpu")
    stale = torch.zeros(B, dtype=torch.bool)
    foreign = torch.zeros(B, dtype=torch.bool)
    rows: list[int] = []
    payloads: list[bytes] = []
    for i, blob in enumerate(blobs):
        if blob is None:
            continue
        try:
            version, off = _readable(model, bytes(blob), fp_want, sdt.itemsize)
        except StateMismatch:
            foreign[i] = True
            continue
        if version != (int(model.version) & 0xFFFFFFFF):
            stale[i] = True
        rows.append(i)
        payloads.append(bytes(blob[off:]))
    if rows:
        arr = np.frombuffer(b"".join(payloads), dtype=sdt)
        idx = torch.tensor(rows, dtype=torch.int64)
        for k, (_, dt) in spec.items():
            col = arr[k]
            # via bytes: fresh, aligned, writable memory whatever numpy's strides were
            fresh = np.frombuffer(bytearray(col.tobytes()), dtype=col.dtype.base).reshape(col.shape)
            state[k][idx] = torch.from_numpy(fresh).to(dt)
    return {k: v.to(device) for k, v in state.items()}, stale.to(device), foreign.to(device)


def _readable(model: RatingModel, blob: bytes, fp_want: bytes, itemsize: int) -> tuple[int, int]:
    """(version, payload offset) of a blob ``model`` can read; StateMismatch saying why not."""
    name, version, fp, off = parse_header(blob)
    if name != model.name:
        raise StateMismatch(f"state of model {name!r} cannot be read by model {model.name!r}")
    if fp != fp_want:
        raise StateMismatch(
            f"state layout of {name!r} differs from the loaded model's (hparams changed); "
            "drop the stored states or load the matching checkpoint"
        )
    if len(blob) - off != itemsize:
        raise StateMismatch(f"state payload is {len(blob) - off} bytes, want {itemsize}")
    return version, off


def select(state: State, idx: Tensor) -> State:
    """Rows ``idx`` of every tensor (a copy)."""
    return {k: v[idx] for k, v in state.items()}


def scatter(state: State, idx: Tensor, sub: State) -> State:
    """Write ``sub`` into rows ``idx`` of ``state`` (in place); returns ``state``."""
    for k, v in state.items():
        v[idx] = sub[k].to(v.dtype)
    return state


def window_sequence(model: RatingModel, state: State) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The stored windows as left-aligned padded histories (movie, rating, ts, mask) [B, W]."""
    win = state["win_movie"]
    W = win.shape[1]
    n = state["win_len"].to(torch.int64)
    pos = torch.arange(W, device=win.device)[None, :]
    idx = (pos + (W - n)[:, None]).clamp(max=W - 1)
    mask = pos < n[:, None]
    g = lambda x: torch.where(mask, x.gather(1, idx), torch.zeros_like(x))  # noqa: E731
    return g(win), g(state["win_rating"]), g(state["win_ts"]), mask


@torch.no_grad()
def rederive(model: RatingModel, state: State) -> State:
    """State after a weight change: a fresh pass of ``model`` over each stored
    window (the last W events).  ``count``, ``mean`` and ``last_ts`` describe
    the whole history and are weight-independent, so they are kept."""
    movie, rating, ts, mask = window_sequence(model, state)
    fresh = model.final_state(movie, rating, ts, mask)
    for k in ("count", "mean", "last_ts"):
        fresh[k] = state[k].clone()
    return fresh


def after_swap(model: RatingModel, state: State, stale: Tensor) -> State:
    """The policy the stream applies after loading a new model version:
    re-derive the stale rows from their windows, keep the others."""
    if bool(stale.any()):
        idx = torch.nonzero(stale).flatten()
        state = scatter(state, idx, rederive(model, select(state, idx)))
    return state
