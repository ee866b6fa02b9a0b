"""A compiled (numba) CPU kernel for a whole online batch: the same
predict-then-learn rounds as :func:`models.online.online_round` called once
per round, over numpy float32 arrays.

Why: ML-100K users rate in bursts, so a 512-event batch is ~157 rounds, and
each round through ``online_round`` is ~60 small torch ops (~0.4 ms of
dispatch overhead for a handful of flops): issue #13 measured that loop as
~75% of a worker's CPU per event.  Here the round loop is plain compiled
loops over the events, the movie side is updated in place after each round
(as :meth:`models.online.MovieSide.apply` does), and the batch's increments
are summed per touched movie row in a dense scratch (no ``torch.unique``).

Semantics (kept identical to the torch reference, which stays the CUDA path
and the test oracle): events arrive grouped by round; within a round every
event reads the movie side as it was before the round; the round's
movie-side increments (rows b, bG, q, qG; mu; the feature weights) are
applied after it when ``apply``; the user side is updated per event; movie
ids outside ``[0, capacity)`` read as zero rows and get no row increment.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor

#: order of the float hyper-parameters in the kernel's ``hp`` array
_HP = ("lr_bias", "lr_factor", "lr_feat", "l2_bias", "l2_factor", "tau_s", "lr_session", "mu_prior",
       "mu_prior_n", "eps")


@numba.njit(cache=True, inline="always")
def _rate(lr, G, g2, eps, adaptive):
    if not adaptive:
        return lr
    return lr / np.sqrt(G + g2 + eps)


@numba.njit(cache=True)
def _online_rounds(row, movie, rating, ts, mfeat, ufeat, starts,
                   ub, ubG, p, pG, s, last_ts, count,
                   b, bG, q, qG, q0, mu, wm, wmG, V, VG, wu, wuG, U, UG,
                   hp, lo, hi, apply, use_session, use_features, adaptive,
                   pred_out, uniq, acc_b, acc_bG, acc_q, acc_qG, acc_mu, acc_wm, acc_wmG, acc_V, acc_VG,
                   acc_wu, acc_wuG, acc_U, acc_UG):
    """Rounds ``starts[r]:starts[r+1]`` of the event arrays: user arrays
    (rows ``row``) always updated in place, movie side only when ``apply``;
    ``acc_*`` receive the increments summed per ``uniq`` row / global."""
    lr_bias, lr_factor, lr_feat, l2_bias, l2_factor = hp[0], hp[1], hp[2], hp[3], hp[4]
    tau, lr_s, mu_prior, mu_n, eps = hp[5], hp[6], hp[7], hp[8], hp[9]
    one, five, zero = np.float32(1.0), np.float32(5.0), np.float32(0.0)
    n, k, cap = len(row), q.shape[1], b.shape[0]
    fm, fu = mfeat.shape[1], ufeat.shape[1]
    # per-event scratch of the current round: row deltas, slot in ``uniq``
    d_b = np.zeros(n, np.float32)
    d_bG = np.zeros(n, np.float32)
    d_q = np.zeros((n, k), np.float32)
    d_qG = np.zeros((n, k), np.float32)
    slot = np.full(n, -1, np.int64)
    for i in range(n):
        if 0 <= movie[i] < cap:
            slot[i] = np.searchsorted(uniq, movie[i])
    g_wm, g_wu = np.zeros(fm, np.float32), np.zeros(fu, np.float32)
    g_V, g_U = np.zeros((fm, k), np.float32), np.zeros((fu, k), np.float32)
    qf, qe, pe = np.zeros(k, np.float32), np.zeros(k, np.float32), np.zeros(k, np.float32)
    for r in range(len(starts) - 1):
        mu_hat = (mu[0] + mu_prior * mu_n) / (mu[1] + mu_n)
        g_wm[:] = zero
        g_wu[:] = zero
        g_V[:] = zero
        g_U[:] = zero
        rsum = zero
        for i in range(starts[r], starts[r + 1]):
            u, m, known = row[i], movie[i], slot[i] >= 0
            # -- predict (movie side as before the round)
            bm = b[m] if known else zero
            for j in range(k):
                qf[j] = q0[m, j] + q[m, j] if known else zero
                qe[j], pe[j] = qf[j], p[u, j]
            pr = mu_hat + bm + ub[u]
            if use_features:
                for j in range(k):
                    for f in range(fm):
                        qe[j] += mfeat[i, f] * V[f, j]
                    for f in range(fu):
                        pe[j] += ufeat[i, f] * U[f, j]
                dm, du = zero, zero
                for f in range(fm):
                    dm += mfeat[i, f] * wm[f]
                for f in range(fu):
                    du += ufeat[i, f] * wu[f]
                pr = pr + dm + du
            decay = zero
            if count[u] > 0:
                decay = np.exp(-np.float32(max(ts[i] - last_ts[u], 0)) / tau)
            sess = s[u] * decay if use_session else zero
            dot = zero
            for j in range(k):
                dot += qe[j] * pe[j]
            pr = pr + sess + dot
            e = rating[i] - min(max(pr, one), five)
            pred_out[i] = min(max(pr, lo), hi)
            # -- user side, now
            g = -e + l2_bias * ub[u]
            ub[u] -= _rate(lr_bias, ubG[u], g * g, eps, adaptive) * g
            ubG[u] += g * g
            for j in range(k):
                g = -e * qe[j] + l2_factor * p[u, j]
                p[u, j] -= _rate(lr_factor, pG[u, j], g * g, eps, adaptive) * g
                pG[u, j] += g * g
            if use_session:
                s[u] = sess + lr_s * e
            last_ts[u] = ts[i]
            count[u] += 1
            # -- movie side: this event's row deltas and the round's feature gradients
            if known:
                g = -e + l2_bias * bm
                d_b[i] = -_rate(lr_bias, bG[m], g * g, eps, adaptive) * g
                d_bG[i] = g * g
                for j in range(k):
                    g = -e * pe[j] + l2_factor * qf[j]
                    d_q[i, j] = -_rate(lr_factor, qG[m, j], g * g, eps, adaptive) * g
                    d_qG[i, j] = g * g
            if use_features:
                for f in range(fm):
                    g_wm[f] -= e * mfeat[i, f]
                    for j in range(k):
                        g_V[f, j] -= mfeat[i, f] * (e * pe[j])
                for f in range(fu):
                    g_wu[f] -= e * ufeat[i, f]
                    for j in range(k):
                        g_U[f, j] -= ufeat[i, f] * (e * qe[j])
            rsum += rating[i]
        if not apply:
            continue
        # -- after the round: merge its increments into the movie side and the batch sums
        for i in range(starts[r], starts[r + 1]):
            if slot[i] < 0:
                continue
            m, sl = movie[i], slot[i]
            b[m] += d_b[i]
            bG[m] += d_bG[i]
            acc_b[sl] += d_b[i]
            acc_bG[sl] += d_bG[i]
            for j in range(k):
                q[m, j] += d_q[i, j]
                qG[m, j] += d_qG[i, j]
                acc_q[sl, j] += d_q[i, j]
                acc_qG[sl, j] += d_qG[i, j]
        nr = np.float32(starts[r + 1] - starts[r])
        mu[0] += rsum
        mu[1] += nr
        acc_mu[0] += rsum
        acc_mu[1] += nr
        if use_features:
            for f in range(fm):
                _merge_global(wm, wmG, acc_wm, acc_wmG, f, g_wm[f], lr_feat, eps, adaptive)
                for j in range(k):
                    _merge_global(V[f], VG[f], acc_V[f], acc_VG[f], j, g_V[f, j], lr_feat, eps, adaptive)
            for f in range(fu):
                _merge_global(wu, wuG, acc_wu, acc_wuG, f, g_wu[f], lr_feat, eps, adaptive)
                for j in range(k):
                    _merge_global(U[f], UG[f], acc_U[f], acc_UG[f], j, g_U[f, j], lr_feat, eps, adaptive)


@numba.njit(cache=True, inline="always")
def _merge_global(w, G, acc_w, acc_G, i, g, lr, eps, adaptive):
    d = -_rate(lr, G[i], g * g, eps, adaptive) * g
    w[i] += d
    G[i] += g * g
    acc_w[i] += d
    acc_G[i] += g * g


def _np(t: Tensor, dtype) -> np.ndarray:
    """A numpy view of a CPU tensor (a copy only when dtype or layout differ)."""
    a = t.detach().numpy()
    return np.ascontiguousarray(a, dtype=dtype)


def _view(t: Tensor) -> np.ndarray:
    """A writable numpy view sharing memory with ``t`` (updated in place)."""
    if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError("the online kernel updates float32 contiguous CPU tensors in place")
    return t.detach().numpy()


def online_events(ms, user: dict[str, Tensor], last_ts: np.ndarray, count: np.ndarray, row: np.ndarray,
                  movie: np.ndarray, rating: np.ndarray, ts: np.ndarray, mfeat: np.ndarray, ufeat: np.ndarray,
                  starts: np.ndarray, apply: bool, lo: float = 1.0, hi: float = 5.0
                  ) -> tuple[np.ndarray, dict[str, tuple[Tensor | None, Tensor]]]:
    """Run events grouped in rounds (``starts``: round boundaries) through the
    kernel.  ``user`` (``on_ub, on_ubG, on_p, on_pG, on_s`` tensors), ``last_ts``
    and ``count`` (int64 arrays) are updated in place at rows ``row``; the
    movie side ``ms`` (:class:`models.online.MovieSide`) in place when ``apply``.
    Returns (predictions clamped to [lo, hi] per event, the increments summed
    per unique movie row, the :func:`models.batch.sum_increments` format;
    empty without ``apply`` or events)."""
    cfg, t = ms.cfg, ms.t
    cap = ms.capacity
    movie = np.ascontiguousarray(movie, np.int64)
    known = movie[(movie >= 0) & (movie < cap)]
    uniq = np.unique(known)
    k = int(t["q"].shape[1])
    fm, fu = int(t["V"].shape[0]), int(t["U"].shape[0])
    z = np.zeros
    acc = {"b": z(len(uniq), np.float32), "bG": z(len(uniq), np.float32), "q": z((len(uniq), k), np.float32),
           "qG": z((len(uniq), k), np.float32), "mu": z(2, np.float32),
           "wm": z(fm, np.float32), "wmG": z(fm, np.float32), "V": z((fm, k), np.float32),
           "VG": z((fm, k), np.float32), "wu": z(fu, np.float32), "wuG": z(fu, np.float32),
           "U": z((fu, k), np.float32), "UG": z((fu, k), np.float32)}  # fmt: skip
    hp = np.array([getattr(cfg, n) for n in _HP], np.float32)
    pred = np.zeros(len(movie), np.float32)
    tables = [_view(t[n]) for n in ("b", "bG", "q", "qG")] + [_np(ms.q0_table(), np.float32)] + \
        [_view(t[n]) for n in ("mu", "wm", "wmG", "V", "VG", "wu", "wuG", "U", "UG")]
    users = [_view(user[n]) for n in ("on_ub", "on_ubG", "on_p", "on_pG", "on_s")]
    _online_rounds(np.ascontiguousarray(row, np.int64), movie, np.ascontiguousarray(rating, np.float32),
                   np.ascontiguousarray(ts, np.int64), np.ascontiguousarray(mfeat, np.float32),
                   np.ascontiguousarray(ufeat, np.float32), np.ascontiguousarray(starts, np.int64),
                   *users, last_ts, count, *tables, hp, np.float32(lo), np.float32(hi), bool(apply),
                   bool(cfg.use_session), bool(cfg.use_features), bool(cfg.adaptive), pred, uniq, *acc.values())
    if not apply or not len(movie):
        return pred, {}
    rows = torch.from_numpy(uniq)
    inc = {n: (rows, torch.from_numpy(acc[n])) for n in ("b", "bG", "q", "qG")}
    inc["mu"] = (None, torch.from_numpy(acc["mu"]))
    if cfg.use_features:
        inc.update({n: (None, torch.from_numpy(acc[n])) for n in ("wm", "wmG", "wu", "wuG", "V", "VG", "U", "UG")})
    return pred, inc


def round_order(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The events of a padded [U, T] ``mask`` in round order (round j = every
    user's j-th slot, users ascending): (user rows, slots, round boundaries)."""
    j, u = np.nonzero(mask.T)
    starts = np.unique(np.searchsorted(j, np.arange(mask.shape[1] + 1)))  # empty rounds dropped
    return u.astype(np.int64), j.astype(np.int64), starts.astype(np.int64)
