import sys, itertools
import numpy as np
from core.datasets import load_dataset
from trainer.prequential import run_prequential, stream_order
ds = load_dataset("ml-100k")
df = stream_order(ds.ratings)
df = df.iloc[: int(len(df) * 0.5)].reset_index(drop=True)
y = df["rating"].to_numpy()
for res, lr, ep in itertools.product([True, False], [1e-2, 3e-3, 1e-3], [2, 4]):
    r = run_prequential("lstm", df, ds.movies, genre_vocab=ds.genre_vocab, hparams={"residual": res}, seed=0, lr=lr, epochs=ep)
    net = r.extra["network"]
    print("residual", res, "lr", lr, "epochs", ep, round(r.rmse, 5), "share", round(r.extra["final_network_weight"], 3),
          "net alone", round(float(np.sqrt(np.nanmean((net - y) ** 2))), 4), flush=True)
