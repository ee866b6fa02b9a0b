"""Sub-minute gaps for the network (issue #22, measured and not kept): the
LSTM's gap input is hour-scaled (``models.common.gap_feature``: 5 s and 60 s
both read as ~0); this patches the served lstm to also read (``add``) or to
read instead (``replace``) a seconds-resolving gap, ``log1p(s) / 17.3``;
``none`` runs it unpatched.  One line of JSON per run (the figures README
cites: ``subminute-gap-ml100k-first-half.jsonl``).

``python docs/results/issue22/subminute_gap_experiment.py MODE ml-100k first SEED``
(``first``: ML-100K's first half by time; anything else: the whole stream).
"""
import json, sys
import numpy as np, torch
from torch import nn
from models import lstm as L
from models.common import gap_feature

MODE = sys.argv[1]  # add | replace | none


def seconds_gap(gap_s):
    """Log time gap that resolves seconds and minutes: log1p(seconds) / log1p(1 year)."""
    return torch.log1p(gap_s.clamp(min=0).to(torch.float32)) / 17.3


def _gs(self, state, ts):
    has = state["count"] > 0
    g = (ts - state["last_ts"]) * has
    return self._gapcols(g)

def _gq(self, state, ts):
    prev = torch.cat([state["last_ts"][:, None], ts[:, :-1]], 1)
    has = torch.ones_like(ts, dtype=torch.bool)
    has[:, 0] = state["count"] > 0
    return self._gapcols((ts - prev) * has)

def _gapcols(self, g):
    if MODE == "add":
        return torch.stack([gap_feature(g), seconds_gap(g)], -1)
    if MODE == "replace":
        return seconds_gap(g)[..., None]
    return gap_feature(g)[..., None]

def _inputs(self, movie, rating, mf_pred, gap):
    r0 = rating - self.global_mean
    return torch.cat([L.lookup(self.item_factors, movie), r0.unsqueeze(-1), (r0 - self._bias(movie)).unsqueeze(-1),
                      (rating - mf_pred).unsqueeze(-1), gap, torch.ones_like(r0).unsqueeze(-1), self._feats(movie)], -1)

init0 = L.LSTMModel.__init__
def __init__(self, *a, **kw):
    init0(self, *a, **kw)
    if MODE == "add":
        self.lstm = nn.LSTM(self.k + 6 + self.n_features, self.hidden, batch_first=True)

if MODE != "none":
    L.LSTMModel._gap_step = _gs; L.LSTMModel._gap_seq = _gq; L.LSTMModel._gapcols = _gapcols
    L.LSTMModel._inputs = _inputs; L.LSTMModel.__init__ = __init__

from core.datasets import load_dataset
from trainer.prequential import run_prequential, stream_order
torch.set_num_threads(1)
ds = load_dataset(sys.argv[2])
df = stream_order(ds.ratings)
if sys.argv[3] == "first":
    df = df.iloc[: len(df) // 2].reset_index(drop=True)
seed = int(sys.argv[4])
r = run_prequential("lstm", df, ds.movies, genre_vocab=ds.genre_vocab, users=ds.users, seed=seed)
y = df["rating"].to_numpy(np.float64)
rm = lambda p: float(np.sqrt(np.mean((p - y) ** 2)))
print(json.dumps({"mode": MODE, "data": sys.argv[2], "slice": sys.argv[3], "seed": seed, "rmse": round(r.rmse, 5),
                  "online": round(rm(r.extra["online"]), 5), "net": round(rm(r.extra["network"]), 5),
                  "share": round(rm(r.extra["online"]) - r.rmse, 5), "w": round(r.extra["final_network_weight"], 3)}))
