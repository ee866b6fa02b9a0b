"""The network blended with the single learner or the mixture at fixed
weights, and a learned scalar weight (one gradient step per 1,024-event
batch), from netparts.py's files /tmp/parts_{full,h2}.npz.
Usage: python docs/results/issue22/blend.py"""
import numpy as np
def rm(p, y): return float(np.sqrt(np.mean((p.astype(np.float64) - y) ** 2)))
for name in ("full", "h2", "half"):
    d = np.load(f"/tmp/parts_{name}.npz"); y = d["y"].astype(np.float64)
    net, on, hd = d["net"], d["on"], d["hedge"]
    n = len(y); h = n // 2
    print(f"== {name}: served {rm(d['served'], y):.4f} net {rm(net, y):.4f} online {rm(on, y):.4f} hedge {rm(hd, y):.4f}")
    for a in (0.7, 0.8, 0.9, 0.95, 1.0):
        print(f"  a={a}: net+online {rm((1-a)*net + a*on, y):.4f}  net+hedge {rm((1-a)*net + a*hd, y):.4f}  (2nd half of this stream: {rm(((1-a)*net + a*hd)[h:], y[h:]):.4f})")
    # learned combination: a scalar on the network's deviation from the mixture, online gradient per 1024-event batch
    for lr in (0.01, 0.03, 0.1):
        w, out = 0.0, np.empty(n)
        for s in range(0, n, 1024):
            e = min(n, s + 1024)
            dv = net[s:e] - hd[s:e]
            out[s:e] = np.clip(hd[s:e] + w * dv, 1, 5)
            g = np.mean((out[s:e] - y[s:e]) * dv)
            w = float(np.clip(w - lr * g / (np.mean(dv * dv) + 1e-3), 0.0, 1.0))
        print(f"  learned weight (lr {lr}): {rm(out, y):.4f}  final w {w:.3f}")
