"""A held-out MovieLens-format file the defaults were never tuned on:
``ratings.csv`` + ``movies.csv`` (ml-latest style, half-star ratings, no
user file) from a *different* generator than the one the settings saw --
another seed, more movies, stronger drift and noise, and user sessions
(bursts of ratings seconds apart with a per-session mood), rounded to half
stars.  Usage: ``python docs/results/issue12/make_halfstar_file.py OUT_DIR``.
"""

import sys
from pathlib import Path

import numpy as np

from core.datasets import synthetic_stream

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
ds = synthetic_stream(100_000, n_users=700, n_movies=4000, seed=1234, dim=12, drift=0.9, noise=0.8,
                      zipf_a=0.9, mean_gap_s=5.0)
rng = np.random.default_rng(99)
r = ds.ratings.copy()
# sessions: consecutive events of a user within 30 min share a mood offset
r = r.sort_values(["user_id", "ts"], kind="stable")
new_session = (r["user_id"].diff() != 0) | (r["ts"].diff() > 1800)
sid = np.cumsum(new_session.to_numpy())
mood = rng.normal(0.0, 0.35, sid.max() + 1)[sid]
half = np.clip(np.rint((r["rating"].to_numpy() + mood + rng.normal(0, 0.25, len(r))) * 2) / 2, 0.5, 5.0)
r["rating"] = half
r = r.sort_values("ts", kind="stable")
with open(out / "ratings.csv", "w") as f:
    f.write("userId,movieId,rating,timestamp\n")
    for u, m, x, t in zip(r.user_id, r.movie_id, r.rating, r.ts):
        f.write(f"{u},{m},{x:.1f},{t}\n")
with open(out / "movies.csv", "w") as f:
    f.write("movieId,title,genres\n")
    for mid, title, year, genres in zip(ds.movies.movie_id, ds.movies.title, ds.movies.year, ds.movies.genres):
        f.write(f'{mid},"{title} ({int(year)})",{"|".join(genres) or "(no genres listed)"}\n')
print(f"{len(r)} ratings, {r.user_id.nunique()} users, {r.movie_id.nunique()} movies, "
      f"half stars {float((r.rating % 1 != 0).mean()):.2f}, mean {r.rating.mean():.2f}")
