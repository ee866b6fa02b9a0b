"""A compiled (numba) CPU kernel for the LSTM's recurrence over a padded
batch, for inference: the same numbers as ``nn.LSTM`` over a packed sequence.

Why: ML-100K users rate in bursts, so a worker's 512-event batch holds ~12
users and its longest user has ~150 events: ``nn.LSTM`` then runs ~150
sequential time steps of a dozen small ops each, and issue #13 measured that
loop as ~9 us of the worker's CPU per event (73% of ``forward_sequence``).
Each step is only ``4H x (F + H)`` multiply-adds per user, so plain compiled
loops over the real (unpadded) steps do it in a fraction of that.

Only the no-grad CPU float32 path uses it (a worker's batch, evaluation,
re-deriving states after a swap); training keeps ``nn.LSTM`` for autograd, and
the two are property-tested equal (``tests/test_lstm_kernel.py``).
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor, nn


@numba.njit(cache=True, inline="always")
def _sigmoid(x):
    return np.float32(1.0) / (np.float32(1.0) + np.exp(-x))


@numba.njit(cache=True, fastmath={"contract", "reassoc"}, error_model="numpy")
def _recurrence(x, lengths, w_ih_t, w_hh_t, bias, h0, c0, h_before, hn, cn):
    """For each user row ``u``, steps ``0 .. lengths[u]-1`` of ``x`` [U, T, F]:
    ``h_before[u, t]`` gets the hidden state *before* step t for t <= the
    length (``h0`` at 0; later positions stay as the caller set them, as
    ``pad_packed_sequence`` leaves them zero); ``hn``/``cn`` the final states
    (``h0``/``c0`` for a user with no steps).  Gate order i, f, g,
    o and ``bias = b_ih + b_hh``, as ``nn.LSTM``."""
    n_users, steps, f_in = x.shape
    hidden = h0.shape[1]
    gates = np.empty(4 * hidden, np.float32)
    h = np.empty(hidden, np.float32)
    c = np.empty(hidden, np.float32)
    for u in range(n_users):
        h[:] = h0[u]
        c[:] = c0[u]
        if steps:
            h_before[u, 0] = h
        for t in range(lengths[u]):
            gates[:] = bias
            for k in range(f_in):
                xk = x[u, t, k]
                for j in range(4 * hidden):
                    gates[j] += xk * w_ih_t[k, j]
            for k in range(hidden):
                hk = h[k]
                for j in range(4 * hidden):
                    gates[j] += hk * w_hh_t[k, j]
            for j in range(hidden):
                i_g = _sigmoid(gates[j])
                f_g = _sigmoid(gates[hidden + j])
                g_g = np.tanh(gates[2 * hidden + j])
                o_g = _sigmoid(gates[3 * hidden + j])
                c[j] = f_g * c[j] + i_g * g_g
                h[j] = o_g * np.tanh(c[j])
            if t + 1 < steps:
                h_before[u, t + 1] = h
        hn[u] = h
        cn[u] = c


def usable(lstm: nn.LSTM, x: Tensor) -> bool:
    """The kernel covers a one-layer, unidirectional, biased float32 LSTM on
    the CPU when no gradient is wanted; anything else goes to ``nn.LSTM``."""
    return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and lstm.num_layers == 1 and not lstm.bidirectional and lstm.bias and lstm.proj_size == 0)


def run(lstm: nn.LSTM, x: Tensor, lengths: Tensor, h0: Tensor, c0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``lstm`` over each row's first ``lengths`` steps of ``x`` [U, T, F]
    from (``h0``, ``c0``) [U, H]: (hidden state before each step [U, T, H],
    zeros after the step past a row's length; final h [U, H]; final c [U, H])."""
    n_users, steps, _ = x.shape
    hidden = lstm.hidden_size
    h_before = np.zeros((n_users, steps, hidden), np.float32)
    hn = np.empty((n_users, hidden), np.float32)
    cn = np.empty((n_users, hidden), np.float32)
    _recurrence(
        np.ascontiguousarray(x.numpy()), np.ascontiguousarray(lengths.numpy(), np.int64),
        np.ascontiguousarray(lstm.weight_ih_l0.detach().numpy().T),
        np.ascontiguousarray(lstm.weight_hh_l0.detach().numpy().T),
        (lstm.bias_ih_l0 + lstm.bias_hh_l0).detach().numpy(),
        np.ascontiguousarray(h0.numpy(), np.float32), np.ascontiguousarray(c0.numpy(), np.float32),
        h_before, hn, cn,
    )
    return torch.from_numpy(h_before), torch.from_numpy(hn), torch.from_numpy(cn)
