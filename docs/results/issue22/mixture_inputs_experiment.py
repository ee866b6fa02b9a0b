import sys, itertools
import numpy as np
from core.datasets import load_dataset
from trainer.prequential import run_prequential, stream_order
ds = load_dataset("ml-100k")
df = stream_order(ds.ratings)
df = df.iloc[: int(len(df) * 0.5)].reset_index(drop=True)
y = df["rating"].to_numpy()
for hp, s in itertools.product([{"mixture_inputs": True}], [int(x) for x in sys.argv[1].split(",")]):
    r = run_prequential("lstm", df, ds.movies, genre_vocab=ds.genre_vocab, hparams=hp, seed=s, epochs=int(sys.argv[2]) if len(sys.argv) > 2 else 2)
    net = r.extra["network"]
    print(hp, "seed", s, round(r.rmse, 5), "share", round(r.extra["final_network_weight"], 3),
          "net alone", round(float(np.sqrt(np.nanmean((net - y) ** 2))), 4), flush=True)
