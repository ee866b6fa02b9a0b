"""Per-event predictions of the served lstm (seed 0), its network and online
halves, and online-hedge, on one stream, for blend.py.
Usage: python docs/results/issue22/netparts.py ml-100k /tmp/parts_full.npz
(and the second-half folder -> /tmp/parts_h2.npz)."""
import numpy as np, torch, sys
torch.set_num_threads(1)
from core.datasets import load_dataset
from trainer.prequential import run_prequential, stretch_cuts
from trainer.hedge import run_hedge_prequential
ds = load_dataset(sys.argv[1])
r = run_prequential('lstm', ds.ratings, ds.movies, genre_vocab=ds.genre_vocab, users=ds.users, seed=0)
h = run_hedge_prequential(ds, cuts=stretch_cuts(len(ds.ratings), 5000))
from trainer.prequential import stream_order  # noqa: E402
y = stream_order(ds.ratings)['rating'].to_numpy(np.float32)
np.savez(sys.argv[2], y=y, served=r.predictions, net=r.extra['network'], on=r.extra['online'], hedge=h.predictions)
print(r.rmse, h.rmse)
