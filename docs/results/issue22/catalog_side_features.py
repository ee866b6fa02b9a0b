"""What the movie catalog's side information is worth for movies a model's
training data never had (issue #22; README "Side information from the
catalog").

The demo protocol (``fbp evaluate --protocol demo``'s schedule:
``trainer.evaluate.DEMO_*``): the
bootstrap model's movie file has only the movies of the bootstrap's 20%,
against the whole movie file -- what a worker has once the catalog filled
the rest (``worker.catalog_features``; in the simulator every movie's
features are there before its first rating).  RMSE of all streamed events
and of those on movies the bootstrap never saw, mean and std over seeds.

Usage: ``python docs/results/issue22/catalog_side_features.py OUT.json DATA [DATA ...]``
(``ml-100k``, or a MovieLens folder such as the half-star file of
``docs/results/issue12/make_halfstar_file.py``).
"""

import json
import sys

import numpy as np

from core.datasets import load_dataset
from trainer.evaluate import DEMO_BOOTSTRAP, DEMO_EPOCHS, DEMO_FINETUNE_EVERY
from trainer.prequential import run_prequential, stream_order

SEEDS = (0, 1, 2)


def measure(data: str) -> dict:
    ds = load_dataset(data)
    df = stream_order(ds.ratings)
    cut = int(len(df) * DEMO_BOOTSTRAP)
    seen = set(df.movie_id.iloc[:cut].tolist())
    new = ~df.movie_id.iloc[cut:].isin(seen).to_numpy()
    y = df.rating.to_numpy(np.float64)[cut:]
    rows: dict[str, dict[str, list[float]]] = {}
    for seed in SEEDS:
        for name, movies in (("with the catalog", ds.movies),
                             ("bootstrap's movies only", ds.movies[ds.movies.movie_id.isin(seen)])):
            p = run_prequential("lstm", df, movies, genre_vocab=ds.genre_vocab, users=ds.users,
                                bootstrap_frac=DEMO_BOOTSTRAP, bootstrap_epochs=DEMO_EPOCHS,
                                finetune_every=DEMO_FINETUNE_EVERY, seed=seed).predictions.astype(np.float64)
            r = rows.setdefault(name, {"all": [], "new movies": []})
            r["all"].append(float(np.sqrt(np.mean((p - y) ** 2))))
            r["new movies"].append(float(np.sqrt(np.mean((p[new] - y[new]) ** 2))))
            print(f"{data} seed {seed} {name}: {r['all'][-1]:.4f} (new movies {r['new movies'][-1]:.4f})", flush=True)
    return {"events": int(len(y)), "events on new movies": int(new.sum()), "seeds": list(SEEDS),
            "rows": {name: {k: {"rmse": float(np.mean(v)), "std": float(np.std(v)), "per_seed": v}
                            for k, v in r.items()} for name, r in rows.items()}}


if __name__ == "__main__":
    out = {data: measure(data) for data in sys.argv[2:]}
    for data, d in out.items():
        for name, r in d["rows"].items():
            print(f"{data} | {name} | {r['all']['rmse']:.4f} ± {r['all']['std']:.4f} | "
                  f"{r['new movies']['rmse']:.4f} ± {r['new movies']['std']:.4f} ({d['events on new movies']} events)")
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1)
