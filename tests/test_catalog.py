"""The movie catalog: loading it from the three MovieLens movie formats, its
record on the ``movies`` topic (any bytes: a movie or a reason), the feed's
dead-lettering, the title cache, and the people-facing outputs that use it
(``fbp tail``, the versions table).  Integration tests (real Redis, Redis
Cluster, Kafka) are at the end."""

from __future__ import annotations

import httpx
import orjson
import pytest
from hypothesis import example, given, settings as hsettings, strategies as st

from core.catalog import Movie, decode_movie, encode_movie, movie_key, movies_from_frame
from core.events import REJECT_REASONS, KafkaRecord, Rejection

U_ITEM = (
    "1|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
    "50|Star Wars (1977)|01-Jan-1977||http://x|0|1|1|0|0|0|0|0|0|0|0|0|0|0|1|1|0|1|0\n"
    "267|unknown||||1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
)
MOVIES_DAT = "1::Toy Story (1995)::Animation|Children's|Comedy\n2::Jumanji (1995)::Adventure|Children's|Fantasy\n"
MOVIES_CSV = ('movieId,title,genres\n1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n'
              '2,"Shawshank Redemption, The (1994)",Crime|Drama\n3,Untitled,(no genres listed)\n')


def _movies(frame) -> dict[int, Movie]:
    return {m.movie_id: m for m in movies_from_frame(frame)}


# ----------------------------------------------------------------- loading
@pytest.mark.parametrize("name,text,expect", [
    ("u.item", U_ITEM, {1: ("Toy Story", 1995, ("Animation", "Children's", "Comedy")),
                        50: ("Star Wars", 1977, ("Action", "Adventure", "Romance", "Sci-Fi", "War"))}),
    ("movies.dat", MOVIES_DAT, {1: ("Toy Story", 1995, ("Animation", "Children's", "Comedy")),
                                2: ("Jumanji", 1995, ("Adventure", "Children's", "Fantasy"))}),
    ("movies.csv", MOVIES_CSV, {2: ("Shawshank Redemption, The", 1994, ("Crime", "Drama")),
                                3: ("Untitled", None, ())}),
])
def test_catalog_loads_from_each_movielens_format(tmp_path, name, text, expect):
    from core.datasets import load_movies

    (tmp_path / name).write_text(text, encoding="latin-1" if name != "movies.csv" else "utf-8")
    for source in (tmp_path / name, tmp_path):  # the file, or the folder holding it
        got = _movies(load_movies(source))
        for mid, (title, year, genres) in expect.items():
            assert (got[mid].title, got[mid].year, got[mid].genres) == (title, year, genres), source


def test_catalog_load_refuses_a_malformed_movie_file_with_its_line(tmp_path):
    from core.datasets import load_movies

    (tmp_path / "movies.dat").write_text("1::Toy Story (1995)::Comedy\nnot a movie line\n")
    with pytest.raises(ValueError, match="line 2"):
        load_movies(tmp_path / "movies.dat")


def test_catalog_of_ml100k_knows_star_wars(ml100k):
    movies = _movies(ml100k.movies)
    assert len(movies) == 1682
    assert movies[50].title == "Star Wars" and movies[50].year == 1977


# ----------------------------------------------------------------- the record
def test_movie_record_round_trips():
    m = Movie(50, "Star Wars", 1977, ("Action", "Sci-Fi"))
    assert decode_movie(encode_movie(m), movie_key(50)) == m
    assert decode_movie(b'{"movie_id": 7, "title": " Se7en "}') == Movie(7, "Se7en")


@pytest.mark.parametrize("raw,key,reason", [
    (b"", None, "empty_value"),
    (b"\xff\xfe", None, "bad_encoding"),
    (b'{"movie_id": 1, "title": ', None, "bad_json"),
    (b"[1, 2]", None, "not_an_object"),
    (b'{"title": "x"}', None, "missing_field"),
    (b'{"movie_id": 1, "title": "x", "rating": 5}', None, "unknown_field"),
    (b'{"movie_id": "1", "title": "x"}', None, "wrong_type"),
    (b'{"movie_id": 1, "title": ""}', None, "wrong_type"),
    (b'{"movie_id": 1, "title": "x", "year": "1977"}', None, "wrong_type"),
    (b'{"movie_id": 1, "title": "x", "genres": "Drama"}', None, "wrong_type"),
    (b'{"movie_id": -1, "title": "x"}', None, "id_out_of_range"),
    (b'{"movie_id": 1, "title": "x"}', b"2", "bad_key"),
    (b'{"movie_id": 1, "title": "' + b"x" * 20_000 + b'"}', None, "oversized_payload"),
])
def test_bad_movie_records_get_a_reason(raw, key, reason):
    got = decode_movie(raw, key)
    assert isinstance(got, Rejection) and got.reason == reason, got


@hsettings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200) | st.builds(lambda d: orjson.dumps(d), st.dictionaries(
    st.sampled_from(["movie_id", "title", "year", "genres", "x"]),
    st.none() | st.booleans() | st.integers(-5, 2_000_000) | st.text(max_size=5) | st.lists(st.text(max_size=3)),
    max_size=4)), key=st.none() | st.binary(max_size=8))
def test_any_bytes_decode_to_a_movie_or_a_known_reason(raw, key):
    got = decode_movie(raw, key)
    assert isinstance(got, Movie) or (isinstance(got, Rejection) and got.reason in REJECT_REASONS)


_VALUES = (st.none() | st.booleans() | st.integers(-5, 2_000_000) | st.sampled_from([1.0, 50.5, 1977.0, -1.0])
           | st.text(max_size=5) | st.sampled_from(["", " ", "\t\n", "x" * 301, "Star Wars"])
           | st.lists(st.text(max_size=3), max_size=3) | st.sampled_from([["x" * 65], ["a"] * 33, [1], {}]))


def example_each(cases):
    """Hypothesis ``@example`` for each of ``cases`` (keyword dicts): the boundaries, always tried."""
    def wrap(fn):
        for kw in reversed(cases):
            fn = example(**kw)(fn)
        return fn
    return wrap


_FIELD_NAMES = st.sampled_from(["movie_id", "title", "year", "genres", "rating"])


_BOUNDS = [{"movie_id": 999_999}, {"movie_id": 1_000_000}, {"movie_id": 0}, {"movie_id": -1},
           {"title": "x" * 300}, {"title": "x" * 301}, {"title": " "}, {"year": 9999}, {"year": 10_000},
           {"year": 0}, {"year": None}, {"genres": ["a"] * 32}, {"genres": ["a"] * 33}, {"genres": ["x" * 64]},
           {"genres": ["x" * 65]}, {"genres": [""]}, {"genres": None}, {"genres": 0}, {"movie_id": 50.0},
           {"movie_id": True}, {"year": 1977.5}]


@hsettings(max_examples=600, deadline=None)
@given(changes=st.dictionaries(_FIELD_NAMES, _VALUES, max_size=2), drop=st.sets(_FIELD_NAMES, max_size=1))
@example_each([{"changes": c, "drop": set()} for c in _BOUNDS])
def test_movie_schema_agrees_with_decode_movie(changes, drop):
    """core/schemas/movie.schema.json accepts exactly what decode_movie
    accepts (a valid movie with one or two fields changed, or one dropped)."""
    obj = {"movie_id": 50, "title": "Star Wars", "year": 1977, "genres": ["Sci-Fi"], **changes}
    for name in drop:
        obj.pop(name, None)
    from pathlib import Path

    from jsonschema import Draft202012Validator

    schema = orjson.loads((Path(__file__).resolve().parents[1] / "core/schemas/movie.schema.json").read_bytes())
    valid = Draft202012Validator(schema).is_valid(obj)
    assert isinstance(decode_movie(orjson.dumps(obj)), Movie) == valid, obj


# ----------------------------------------------------------------- the feed
class DictCatalog:
    """The catalog's interface over a dict (the Redis one is tested below)."""

    def __init__(self) -> None:
        self.movies: dict[int, Movie] = {}

    def put_many(self, movies):
        n = 0
        for m in movies:
            self.movies[m.movie_id] = m
            n += 1
        return n

    def remove(self, ids):
        return sum(self.movies.pop(i, None) is not None for i in ids)


def _rec(value, key, offset):
    return KafkaRecord(value, key, (), "movies", 0, offset, 0.0)


def test_feed_stores_movies_removes_tombstones_and_dead_letters_the_rest():
    from stream.catalog import apply_records

    cat = DictCatalog()
    cat.movies[9] = Movie(9, "Old")
    recs = [
        _rec(encode_movie(Movie(1, "First title")), b"1", 0),
        _rec(b"\x00garbage\xff", b"2", 1),
        _rec(encode_movie(Movie(1, "Toy Story", 1995)), b"1", 2),  # the later record wins
        _rec(None, b"9", 3),                                        # tombstone
        _rec(None, b"not-an-id", 4),                                # tombstone with a bad key
        _rec(encode_movie(Movie(3, "Three")), b"4", 5),             # key is not its id
    ]
    dead: list[tuple[Rejection, KafkaRecord]] = []
    counts = apply_records(recs, cat, lambda rej, rec: dead.append((rej, rec)))
    assert cat.movies == {1: Movie(1, "Toy Story", 1995)}
    assert (counts.records, counts.stored, counts.removed, counts.dead_lettered) == (6, 1, 1, 3)
    assert [(r.reason, rec.offset) for r, rec in dead] == [("bad_encoding", 1), ("bad_key", 4), ("bad_key", 5)]


# ----------------------------------------------------------------- the title cache
def test_title_cache_reads_each_id_once_per_ttl_and_remembers_unknown_ids():
    from core.repos.catalog import TitleCache

    known = {50: Movie(50, "Star Wars")}
    asked: list[list[int]] = []

    def lookup(ids):
        asked.append(list(ids))
        return {i: known[i] for i in ids if i in known}

    now = [0.0]
    cache = TitleCache(lookup, size=3, ttl_s=10.0, clock=lambda: now[0])
    assert cache.titles([50, 99999]) == {50: "Star Wars"}
    assert cache.titles([99999, 50, 50]) == {50: "Star Wars"}
    assert asked == [[50, 99999]]  # the second call was answered from the cache, unknown id included
    known[99999] = Movie(99999, "New")
    now[0] = 11.0  # expired: a newly loaded title shows
    assert cache.titles([99999]) == {99999: "New"} and asked[-1] == [99999]
    cache.titles([1, 2, 3])  # bounded: the oldest entries go
    assert len(cache._cache) == 3


# ----------------------------------------------------------------- fbp tail
def test_tail_shows_titles_and_ids_for_unknown_movies():
    from core.events import PredictionRecord, encode_prediction
    from stream.tail import format_prediction_line

    raw = encode_prediction(PredictionRecord("e1", 7, 50, 4.1, 5.0, 3, top_k=[[172, 4.5], [424242, 4.4]]))
    names = {50: "Star Wars", 172: "The Empire Strikes Back"}
    line = format_prediction_line(raw, lambda ids: {i: names[i] for i in ids if i in names})
    assert 'movie="Star Wars" (50)' in line and 'top=["The Empire Strikes Back" (172),424242]' in line
    bare = format_prediction_line(raw)
    assert "movie=50 " in bare and "top=[172,424242]" in bare and "Star Wars" not in bare


# ----------------------------------------------------------------- the versions table
def test_versions_table_says_family_why_and_sha():
    from stream.live import version_rows

    hist = [
        {"version": 2, "model": "lstm", "published_at": 1_700_000_100.0, "sha256": "ab" * 32,
         "reason": "promoted by trainer (events): holdout RMSE 0.9700 vs champion v1 0.9747",
         "metrics": {"champion_rmse": 0.9747, "challenger_rmse": 0.97}},
        {"version": 1, "model": "lstm", "published_at": 1_700_000_000.0, "sha256": "cd" * 32,
         "reason": "bootstrap", "metrics": {"best_valid_rmse": 1.0123}},
    ]
    rows = version_rows(hist, [], {}, {})
    assert [(r["version"], r["family"], r["sha256"]) for r in rows] == [(2, "lstm", "ab" * 6), (1, "lstm", "cd" * 6)]
    assert "0.9700" in rows[0]["why"] and "0.9747" in rows[0]["why"]
    assert rows[1]["why"] == "bootstrap (validation RMSE 1.0123)"
    # a hand publish whose reason names no RMSE gets the challenger/champion figures appended
    assert version_rows([dict(hist[0], reason="publish x")], [], {}, {})[0]["why"] == \
        "publish x: challenger RMSE 0.9700 vs champion 0.9747"

    # nothing published: the local checkpoint the worker serves, described by its origin
    origin = {"source": "checkpoint", "version": 0, "model": "baseline", "sha256": "ef" * 32,
              "reason": "local checkpoint baseline.safetensors", "metrics": {}}
    rows = version_rows([], [{"t": 5.0, "version": 0}, {"t": 9.0, "version": 4}], origin,
                        {"name": "lstm", "version": 4})
    assert [(r["version"], r["family"], r["why"], r["sha256"]) for r in rows] == [
        (4, "lstm", "first served here", None),
        (0, "baseline", "local checkpoint baseline.safetensors", "ef" * 6)]


# ----------------------------------------------------------------- integration: real Redis / Cluster / Kafka
from tests.rediscluster import LocalCluster, local_cluster, redis_cfg  # noqa: E402,F401  (fixtures)


@pytest.mark.integration
def test_catalog_in_redis_single_and_cluster(redis_cfg):  # noqa: F811
    from core.datasets import load_movies
    from core.redis_conn import sync_redis
    from core.repos.catalog import MovieCatalog

    client = sync_redis(redis_cfg)
    try:
        cat = MovieCatalog(client, redis_cfg.key_prefix)
        assert cat.put_many(movies_from_frame(load_movies("ml-100k"))) == 1682
        got = cat.get_many([50, 172, 999_999])
        assert got[50].title == "Star Wars" and got[172].year == 1980 and 999_999 not in got
        assert cat.count() == 1682
        assert cat.remove([50, 999_999]) == 1 and 50 not in cat.get_many([50])
    finally:
        client.close()


@pytest.mark.integration
def test_follow_reads_the_movies_topic_and_dead_letters_bad_records(stack, ns):
    """Good records reach the catalog, a tombstone removes one, each bad one
    is a dead letter with its reason, and the feed goes on past them."""
    from core.kafka_io import make_consumer, make_producer
    from core.redis_conn import sync_redis
    from core.repos.catalog import MovieCatalog
    from stream.catalog import follow

    s = ns.scoped()  # its own movies topic, DLQ, Redis prefix and consumer group
    prod = make_producer(s)
    t = s.kafka.movies_topic
    prod.send(t, key=b"50", value=encode_movie(Movie(50, "Star Wars", 1977)))
    prod.send(t, key=b"51", value=b"\xde\xad\xbe\xef")
    prod.send(t, key=b"52", value=b'{"movie_id": 52, "title": 52}')
    prod.send(t, key=b"53", value=encode_movie(Movie(53, "Removed soon")))
    prod.send(t, key=b"53", value=None)
    prod.send(t, key=b"172", value=encode_movie(Movie(172, "The Empire Strikes Back", 1980)))
    prod.flush()
    prod.close()

    counts = follow(s, idle_timeout_s=3.0)
    assert (counts.records, counts.dead_lettered) == (6, 2)

    client = sync_redis(s.redis)
    try:
        got = MovieCatalog(client, s.redis.key_prefix).get_many([50, 51, 52, 53, 172])
    finally:
        client.close()
    assert {i: m.title for i, m in got.items()} == {50: "Star Wars", 172: "The Empire Strikes Back"}

    c = make_consumer(s, s.kafka.dlq_topic, consumer_timeout_ms=5000)
    letters = [orjson.loads(m.value) for m in c]
    c.close()
    mine = sorted((d["source"]["offset"], d["reason"]) for d in letters if d["source"]["topic"] == t)
    assert mine == [(1, "bad_encoding"), (2, "wrong_type")]

    # `fbp dlq replay` republishes ratings only: the catalog's dead letters are skipped
    from stream.dlq.replay import replay as dlq_replay

    report = dlq_replay(s)
    assert report.replayed == 0 and report.skipped == {"movies_topic": 2}


@pytest.mark.integration
def test_top_k_api_returns_ml100k_titles(stack, ns, ckpt, ml100k, tmp_path):
    """A real worker on ML-100K: each top-K movie the catalog knows comes
    with its ML-100K title; the others (odd ids, left out of the catalog
    here) have none, and ``top`` keeps its [[id, score], ...] shape."""
    from stack import procs
    from stream.catalog import load_into_redis
    from stream.replay import replay
    from tests.streamkit import read_topic
    from tests.test_live_page import free_port

    movies = ml100k.movies
    titles = dict(zip(movies["movie_id"].tolist(), movies["title"].tolist()))
    assert load_into_redis(ns.scoped(), movies[movies["movie_id"] % 2 == 0]) == 841
    port = free_port()
    worker = procs.start_worker(port, tmp_path, {**ns.env(512, port), "FBP_WORKER__CHECKPOINT": str(ckpt)})
    try:
        replay(ns.scoped(), ml100k.ratings.iloc[:2000], progress=False)
        read_topic(stack, ns.predictions, until=2000, timeout=120)
        user = int(ml100k.ratings.iloc[0]["user_id"])
        top = httpx.get(f"{worker.url}/api/v1/users/{user}/top?k=30", timeout=10).json()
    finally:
        worker.stop()
    assert top["known_user"] and len(top["top"]) == 30 and all(len(e) == 2 for e in top["top"])
    ids = [int(i) for i, _ in top["top"]]
    assert top["titles"] == {str(i): titles[i] for i in ids if i % 2 == 0}
    assert 0 < len(top["titles"]) < len(ids)  # both kinds were in the answer


@pytest.mark.integration
def test_movies_topic_is_compacted_with_one_partition(stack, ns):
    from kafka.admin import ConfigResource, ConfigResourceType

    from core.kafka_io import make_admin

    admin = make_admin(stack)
    try:
        got = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, ns.movies)])
        parts = {t["name"]: len(t["partitions"]) for t in admin.describe_topics([ns.movies, ns.ratings])}
    finally:
        admin.close()
    assert got["topic"][ns.movies]["cleanup.policy"]["value"] == "compact"
    assert parts == {ns.movies: 1, ns.ratings: ns.partitions}
