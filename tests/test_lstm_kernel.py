"""models.lstm_kernel: the compiled recurrence computes what ``nn.LSTM`` over
a packed sequence computes (hidden state before each step, final h and c) on
random shapes, lengths (zero included) and weights; the LSTM model uses it
exactly where it may (no grad, CPU, float32)."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from models import lstm_kernel
from models.registry import build

torch.set_num_threads(1)


def _reference(lstm: torch.nn.LSTM, x, lengths, h0, c0):
    """nn.LSTM as the model's training path runs it (lengths clamped to 1)."""
    T = x.shape[1]
    packed = pack_padded_sequence(x, lengths.clamp(min=1), batch_first=True, enforce_sorted=False)
    out, (hn, cn) = lstm(packed, (h0[None].contiguous(), c0[None].contiguous()))
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=T)
    return torch.cat([h0[:, None], out[:, :-1]], 1), hn[0], cn[0]


@st.composite
def _case(draw):
    users, steps = draw(st.integers(1, 6)), draw(st.integers(1, 9))
    f_in, hidden = draw(st.integers(1, 7)), draw(st.integers(1, 9))
    lengths = draw(st.lists(st.integers(0, steps), min_size=users, max_size=users))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 8.0]))  # 8: saturated gates
    return users, steps, f_in, hidden, lengths, seed, scale


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_case())
def test_kernel_equals_nn_lstm(case):
    users, steps, f_in, hidden, lengths, seed, scale = case
    g = torch.Generator().manual_seed(seed)
    lstm = torch.nn.LSTM(f_in, hidden, batch_first=True)
    with torch.no_grad():
        for p in lstm.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale / hidden ** 0.5)
        x = torch.randn(users, steps, f_in, generator=g) * scale
        h0 = torch.randn(users, hidden, generator=g)
        c0 = torch.randn(users, hidden, generator=g) * scale
        L = torch.tensor(lengths, dtype=torch.int64)
        assert lstm_kernel.usable(lstm, x)
        hb, hn, cn = lstm_kernel.run(lstm, x, L, h0, c0)
        rb, rn, rc = _reference(lstm, x, L, h0, c0)
    for u, n in enumerate(lengths):
        # positions 0..n are defined (n: the state after the last step); later ones are padding
        upto = min(n + 1, steps)
        np.testing.assert_allclose(hb[u, :upto], rb[u, :upto], rtol=1e-5, atol=1e-5)
        if n == 0:  # no steps: the state is unchanged
            assert torch.equal(hn[u], h0[u]) and torch.equal(cn[u], c0[u])
        else:
            np.testing.assert_allclose(hn[u], rn[u], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(cn[u], rc[u], rtol=1e-5, atol=1e-5)


def test_used_only_without_grad_on_cpu_float32():
    lstm = torch.nn.LSTM(3, 4, batch_first=True)
    x = torch.zeros(2, 3, 3)
    with torch.no_grad():
        assert lstm_kernel.usable(lstm, x)
        assert not lstm_kernel.usable(lstm, x.double())
        assert not lstm_kernel.usable(torch.nn.LSTM(3, 4, num_layers=2, batch_first=True), x)
    assert not lstm_kernel.usable(lstm, x)  # grad enabled: training needs autograd


def test_model_forward_sequence_same_with_and_without_kernel(monkeypatch):
    """The whole LSTM model's sequence pass (predictions and final state) is
    the same through the kernel and through nn.LSTM."""
    torch.manual_seed(3)
    model = build("lstm", n_movies=30, window=5).eval()
    U, T = 5, 7
    movie = torch.randint(1, 30, (U, T))
    rating = torch.randint(1, 6, (U, T)).float()
    ts = torch.cumsum(torch.randint(1, 10_000, (U, T)), 1) + 1_000_000
    mask = torch.arange(T)[None] < torch.tensor([7, 1, 3, 0, 5])[:, None]
    state = model.init_state(U)
    with torch.no_grad():
        p1, s1 = model.forward_sequence(movie, rating, ts, mask, state=state, return_state=True)
        monkeypatch.setattr(lstm_kernel, "usable", lambda *a: False)
        p2, s2 = model.forward_sequence(movie, rating, ts, mask, state=state, return_state=True)
    np.testing.assert_allclose(p1[mask], p2[mask], rtol=1e-5, atol=1e-5)
    for k in s1:
        np.testing.assert_allclose(s1[k], s2[k], rtol=1e-5, atol=1e-5, err_msg=k)
