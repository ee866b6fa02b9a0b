"""Side information from the movie catalog for movies the model has none for
(issue #22): the model's rows (``add_movies``), the asking policy, a swap,
what it is worth on real ratings, and the worker's batch path against the
real Redis of the stack (single node and Cluster)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pandas as pd

from core import side_features as sf
from core.catalog import Movie
from core.repos.catalog import AsyncMovieCatalog, MovieCatalog
from tests.rediscluster import local_cluster, redis_cfg  # noqa: F401  (fixtures)
from trainer.train import make_model


def _model(ml100k, upto: int = 100, family: str = "lstm"):
    """A model whose movie file had only the movies below ``upto``."""
    return make_model(family, ml100k.movies[ml100k.movies.movie_id < upto], ml100k.genre_vocab, 1682)


def test_only_empty_rows_are_filled_and_the_model_grows_for_them(ml100k):
    m = _model(ml100k)
    before = m.movie_features.clone()
    assert sf.missing(m, [5, 150, 150, 3000]).tolist() == [150, 3000]
    given = {5: Movie(5, "not what the movie file said", 1900, ("Horror",)),
             150: Movie(150, "new", 1995, ("Comedy", "Drama")),
             3000: Movie(3000, "beyond the tables", None, ("Action", "no such genre")),
             4000: Movie(4000, "nothing to tell", None, ())}
    assert sf.fill(m, given) == 2
    assert m.capacity >= 3001
    assert torch_equal(m.movie_features[5], before[5])  # the movie file's row is kept
    g = m.genre_vocab
    row = m.movie_features[150]
    assert row[g.index("Comedy")] == 1 and row[g.index("Drama")] == 1 and row[-1] == 1 and row.sum() > 2
    assert m.movie_features[3000][g.index("Action")] == 1 and m.movie_features[3000][-1] == 0
    assert sf.missing(m, [150, 3000, 4000]).tolist() == [4000]  # no genre, no year: still nothing known
    assert bool(m.known_movies()[150]) and 150 in m.candidate_ids().tolist()


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_a_swap_keeps_what_the_catalog_gave_unless_the_features_differ(ml100k):
    old = _model(ml100k)
    sf.fill(old, {150: Movie(150, "new", 1995, ("Comedy",))})
    new = _model(ml100k)
    new.adopt_local(old)
    assert torch_equal(new.movie_features[150], old.movie_features[150]) and not sf.missing(new, [150]).size
    other = make_model("lstm", None, ["Comedy", "Drama"], 1682)  # another genre vocabulary
    other.adopt_local(old)
    assert sf.missing(other, [150]).tolist() == [150]
    plain = make_model("baseline", None, ml100k.genre_vocab, 1682)
    plain.adopt_local(old)  # a family without side features takes nothing and does not fail


def test_each_id_is_asked_for_at_most_once_per_retry_interval():
    now = [0.0]
    asked = sf.Asked(60.0, clock=lambda: now[0], limit=3)
    assert asked.due([1, 2]) == [1, 2]
    now[0] = 59.0
    assert asked.due([1, 2, 3]) == [3]
    now[0] = 61.0
    assert asked.due([1, 2, 3]) == [1, 2]
    assert asked.due([4]) == [4]  # over the limit: 3, asked longest ago, is forgotten
    assert asked.due([3]) == [3]  # and now 1 goes
    assert asked.due([4, 2]) == [] and asked.due([1]) == [1]


def test_catalog_features_for_new_movies_help_on_real_ratings(ml100k):
    """The demo protocol on ML-100K's first 30,000 events: the bootstrap's
    movie file has only the movies of its 20%; a catalog gives the rest
    their genres and year.  The events on movies the bootstrap never saw
    are predicted better with them (the full-stream figure is in README)."""
    from trainer.prequential import run_prequential, stream_order

    df = stream_order(ml100k.ratings).iloc[:30000].reset_index(drop=True)
    cut = int(len(df) * 0.2)
    seen = set(df.movie_id.iloc[:cut].tolist())
    new = ~df.movie_id.iloc[cut:].isin(seen).to_numpy()
    y = df.rating.to_numpy()[cut:]
    kw = dict(genre_vocab=ml100k.genre_vocab, users=ml100k.users, bootstrap_frac=0.2, bootstrap_epochs=2,
              finetune_every=10000, seed=0)
    rmse = {}
    for name, movies in (("catalog", ml100k.movies), ("bootstrap only", ml100k.movies[ml100k.movies.movie_id.isin(seen)])):
        p = run_prequential("lstm", df, movies, **kw).predictions
        rmse[name] = float(np.sqrt(np.mean((p[new] - y[new]) ** 2)))
    print(f"{new.sum()} events on new movies: {rmse}")
    assert new.sum() > 1000
    assert rmse["catalog"] < rmse["bootstrap only"] - 0.005, rmse


# -- the worker's batch path, real Redis ---------------------------------------------
def test_the_worker_fills_movies_from_the_catalog_and_asks_again_only_later(redis_cfg, ml100k):
    """A rating of a movie the model has no features for: the batch reads the
    catalog with the states and predicts with its genres; a movie the catalog
    does not know is asked for once per retry interval, and found once it
    is published; a swap keeps what was filled."""
    from core.events import RatingEvent, encode_rating, rating_key
    from core.redis_conn import async_redis, sync_redis
    from core.repos.states import StateStore
    from stream import metrics as met
    from stream.predictor import BatchConfig, Incoming, Predictor

    def counted(outcome: str) -> float:
        return met.REGISTRY.get_sample_value("fbp_catalog_features_total", {"outcome": outcome}) or 0.0

    async def send(topic, key, value):
        f = asyncio.get_running_loop().create_future()
        f.set_result(None)
        return f

    cat = MovieCatalog(sync_redis(redis_cfg), redis_cfg.key_prefix)
    cat.put_many([Movie(150, "Known to the catalog", 1996, ("Comedy", "Romance"))])
    cat._hset({"152": b"\xff{not a movie", "153": b""})  # written by some other client: unreadable
    seq = iter(range(1000))

    def record(user: int, movie: int) -> Incoming:
        ev = RatingEvent(f"e{user}-{movie}", user, movie, 4.0, 880_000_000 + next(seq))
        return Incoming(encode_rating(ev), 0, next(seq), time.time(), key=rating_key(ev))

    async def go() -> None:
        client = async_redis(redis_cfg)
        store = StateStore(client, redis_cfg.key_prefix)
        model = _model(ml100k)
        p = Predictor(model, store, send, BatchConfig(predictions_topic="p", dlq_topic="d", top_k=0),
                      catalog=AsyncMovieCatalog(client, redis_cfg.key_prefix), catalog_retry_s=60.0)
        now = [0.0]
        p.side_features.asked.clock = lambda: now[0]  # the retry interval passes when the test says so
        filled, missing = counted("filled"), counted("not_in_catalog")
        res = await p.process([record(1, 150), record(2, 151), record(3, 5), record(7, 152), record(8, 153)])
        assert len(res.predictions) == 5 and not res.rejected
        g = model.genre_vocab
        assert p.model.movie_features[150][g.index("Romance")] == 1
        assert sf.missing(p.model, [150, 151, 152, 153]).tolist() == [151, 152, 153]
        assert counted("filled") - filled == 1 and counted("not_in_catalog") - missing == 3
        await p.process([record(4, 151)])  # within the retry interval: not asked again
        assert counted("not_in_catalog") - missing == 3
        MovieCatalog(sync_redis(redis_cfg), redis_cfg.key_prefix).put_many([Movie(151, "Published later", 1997, ("Drama",))])
        now[0] += 61.0
        await p.process([record(5, 151)])
        assert counted("filled") - filled == 2 and not sf.missing(p.model, [151]).size
        p.offer_model(_model(ml100k))
        await p.process([record(6, 7)])
        assert not sf.missing(p.model, [150, 151]).size  # the swap kept them
        await client.aclose()

    asyncio.run(go())


def test_the_blocking_fill_the_trainer_runs_before_a_fine_tune(redis_cfg, ml100k):
    """``fill_from_catalog``, what the trainer calls on its champion: the same
    steps with a blocking client; a filled row is not asked for again."""
    from core.redis_conn import sync_redis

    r = sync_redis(redis_cfg)
    cat = MovieCatalog(r, redis_cfg.key_prefix)
    cat.put_many([Movie(150, "x", 1996, ("Comedy",)), Movie(200, "y", None, ("Drama",))])
    m = _model(ml100k)
    ids = pd.Series([5, 150, 200, 201])
    assert sf.fill_from_catalog(m, cat, ids) == 2
    assert sf.missing(m, ids).tolist() == [201]
    assert sf.fill_from_catalog(m, cat, ids) == 0
    r.close()
