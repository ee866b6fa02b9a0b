"""online-hedge with fewer members: each subset's settings chosen on
ML-100K's first half by time, scored on the full stream.
Usage: python docs/results/issue22/subsets.py"""
import numpy as np, time
from core.datasets import load_dataset
from trainer.prequential import stream_order, stretch_cuts
from trainer import hedge as H
ds = load_dataset('ml-100k'); df = stream_order(ds.ratings)
n = len(df); starts = H.batch_starts(n, 1024, stretch_cuts(n, 5000))
cf = H.members()
t = time.time(); P = H.member_predictions(ds, df, cf, starts); el = time.time() - t
print(f"15 members x {n} events: {el:.1f} s wall = {el / n / 15 * 1e6:.2f} us per event per member")
y = df.rating.to_numpy(np.float64); u = np.unique(df.user_id.to_numpy(), return_inverse=True)[1]
h = n // 2; sh = starts[starts <= h]; sh = np.r_[sh[sh < h], h]
grid = dict(H.GRID)
subsets = {"15 (5 taus x 3 scales)": list(range(15)),
           "10 (5 taus x scales 0.5, 1)": [k for k, c in enumerate(cf) if c.lr_bias <= 0.2],
           "5 (5 taus, scale 1)": [k for k, c in enumerate(cf) if c.lr_bias == 0.2],
           "3 (tau 10 x 3 scales)": [k for k, c in enumerate(cf) if c.tau_s == 10],
           "3 (taus 10, 30, 120, scale 1)": [k for k, c in enumerate(cf) if c.lr_bias == 0.2 and c.tau_s in (10, 30, 120)]}
for name, ks in subsets.items():
    best, rows = H.choose(P[:h, ks], y[:h], u[:h], grid, sh)
    p = H.mix(P[:, ks], y, u, best, starts)
    print(f"{name}: first half {H._rmse(p[:h], y[:h]):.4f}  full {H._rmse(p, y):.4f}  second half (continuing) {H._rmse(p[h:], y[h:]):.4f}  {best}")
print("default member: full", round(H._rmse(P[:, 4], y), 4), "2nd half (continuing)", round(H._rmse(P[h:, 4], y[h:]), 4))
