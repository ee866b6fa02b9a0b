"""Rating data sets, all turned into one shape: a time-ordered ratings frame
plus optional movie metadata.

Why one shape: training, evaluation, replay into Kafka and the benchmarks all
want "events in the order they happened", whatever file they came from.  So
every loader returns a :class:`Dataset` whose ``ratings`` frame has exactly the
columns ``user_id`` (int64), ``movie_id`` (int64), ``rating`` (float32) and
``ts`` (int64 unix seconds), sorted stably by ``ts`` (ties keep file order) and
with a fresh 0..n-1 index -- the row index is the event's position in the
stream, which replay uses to build deterministic event ids.

A file or source that cannot be read raises :class:`fbp_errors.DataError`
(a ValueError) saying what is wrong.

Sources understood by :func:`load_dataset`:

* ``"ml-100k"`` -- MovieLens-100K as shipped inside the recbole 1.2.1 wheel
  (downloaded once with pip into ``$FBP_DATA_CACHE`` or ``<repo>/.cache/data``
  and read with :mod:`zipfile`; recbole itself is never imported);
* a path to a file or directory holding ``u.data`` (+ ``u.item``),
  ``ratings.dat`` (+ ``movies.dat``) or ``ratings.csv`` (+ ``movies.csv``);
* ``"synthetic:<n_events>[:<seed>]"`` -- :func:`synthetic_stream`.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from fbp_errors import DataError

REPO_ROOT = Path(__file__).resolve().parent.parent

RATING_COLUMNS = ("user_id", "movie_id", "rating", "ts")
MOVIE_COLUMNS = ("movie_id", "title", "year", "genres")
USER_COLUMNS = ("user_id", "age", "gender", "occupation")
RATING_DTYPES = {"user_id": "int64", "movie_id": "int64", "rating": "float32", "ts": "int64"}

RECBOLE_VERSION = "1.2.1"
_RECBOLE_PREFIX = "recbole/dataset_example/ml-100k/ml-100k"

# The 19 genre flags of MovieLens-100K's u.item, in file order.
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
# Placeholders meaning "no genre"; dropped so an empty list means unknown.
_NO_GENRE = {"unknown", "(no genres listed)", ""}
_YEAR_IN_TITLE = re.compile(r"^(.*?)\s*\((\d{4})\)\s*$")


@dataclass
class Dataset:
    """Ratings in stream order plus (possibly empty) movie and user metadata.

    ``users`` (user_id, age float or NaN, gender "M"/"F"/"", occupation str) is
    empty when the source has no user file; models then use no user features."""

    name: str
    ratings: pd.DataFrame
    movies: pd.DataFrame
    users: pd.DataFrame = field(default_factory=lambda: _empty_users())

    @property
    def genre_vocab(self) -> list[str]:
        """Sorted unique genres over all movies (empty without metadata)."""
        if self.movies.empty:
            return []
        return sorted({g for gs in self.movies["genres"] for g in gs})

    def __len__(self) -> int:
        return len(self.ratings)

    def copy(self) -> "Dataset":
        """A deep-enough copy: callers may mutate the frames freely."""
        return Dataset(self.name, self.ratings.copy(), self.movies.copy(), self.users.copy())

    @property
    def n_users(self) -> int:
        return int(self.ratings["user_id"].nunique())

    @property
    def n_movies(self) -> int:
        return int(self.ratings["movie_id"].nunique())


# --------------------------------------------------------------------------- public API


def load_dataset(source: str | Path) -> Dataset:
    """Load a data set by name (``ml-100k``, ``synthetic:<n>[:<seed>]``) or path."""
    if isinstance(source, str):
        if source == "ml-100k":
            return _load_ml100k_cached().copy()
        if source.startswith("synthetic:"):
            return _parse_synthetic(source)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"unknown data source {str(source)!r}: not 'ml-100k', not 'synthetic:<n>[:<seed>]' "
            "and no such file or directory"
        )
    return _load_path(path)


def load_movies(source: str | Path) -> pd.DataFrame:
    """The movie metadata (movie_id, title, year, genres) of a source: what
    :func:`load_dataset` understands, or a movie file itself -- ML-100K's
    ``u.item``, ``movies.dat`` (ML-1M/10M) or ``movies.csv`` (ML-20M/25M,
    ml-latest) -- or a folder holding one.  An empty frame when the source
    has no movie file."""
    movie_files = (("u.item", _u_item), ("movies.dat", _movies_dat), ("movies.csv", _movies_csv))
    path = Path(source).expanduser()
    for name, parse in movie_files:
        f = path / name if path.is_dir() else path
        if f.name == name and f.is_file():
            return _finish(name, pd.DataFrame(columns=list(RATING_COLUMNS)), parse(f)).movies
    return load_dataset(source).movies


def synthetic_stream(
    n_events: int,
    n_users: int = 1000,
    n_movies: int = 2000,
    seed: int = 0,
    *,
    dim: int = 8,
    zipf_a: float = 1.0,
    drift: float = 0.6,
    noise: float = 0.6,
    start_ts: int = 1_577_836_800,  # 2020-01-01
    mean_gap_s: float = 60.0,
) -> Dataset:
    """A reproducible, learnable rating stream (vectorised; 1M events in ~1 s).

    Movies have Zipf-distributed popularity and a latent vector built from
    their (fake) genres; users have Zipf-ish activity and a latent taste that
    drifts linearly from ``taste_0`` towards ``taste_1`` over the stream, so a
    sequence model that tracks recent history beats a static one.  A rating is
    ``round(3 + user_bias + movie_bias + <taste(t), movie> + noise)`` clipped
    to 1..5.  Timestamps strictly increase.
    """
    if n_events < 0 or n_users < 1 or n_movies < 1:
        raise DataError("synthetic_stream needs n_events >= 0, n_users >= 1, n_movies >= 1")
    rng = np.random.default_rng(seed)
    genres = np.array(ML100K_GENRES[1:])
    n_genres = len(genres)

    # Movies: 1-3 genres each, latent vector = mean of genre vectors + own noise.
    genre_vec = rng.normal(0.0, 1.0, (n_genres, dim)) / np.sqrt(dim)
    n_g = rng.integers(1, 4, n_movies)
    g_idx = np.argsort(rng.random((n_movies, n_genres)), axis=1)[:, :3]
    mask = np.arange(3)[None, :] < n_g[:, None]
    movie_vec = (genre_vec[g_idx] * mask[..., None]).sum(1) / n_g[:, None]
    movie_vec += rng.normal(0.0, 0.5, (n_movies, dim)) / np.sqrt(dim)
    movie_bias = rng.normal(0.0, 0.4, n_movies)
    years = rng.integers(1930, 2021, n_movies).astype("float64")

    # Users: taste at the start and at the end of the stream, plus a bias.
    taste0 = rng.normal(0.0, 1.0, (n_users, dim))
    taste1 = taste0 + drift * rng.normal(0.0, 1.0, (n_users, dim))
    user_bias = rng.normal(0.0, 0.3, n_users)

    pop = 1.0 / np.arange(1, n_movies + 1) ** zipf_a
    pop = pop[rng.permutation(n_movies)]
    act = 1.0 / np.arange(1, n_users + 1) ** 0.5
    act = act[rng.permutation(n_users)]
    m = rng.choice(n_movies, size=n_events, p=pop / pop.sum())
    u = rng.choice(n_users, size=n_events, p=act / act.sum())

    frac = (np.arange(n_events) / max(n_events - 1, 1))[:, None]
    taste = taste0[u] * (1.0 - frac) + taste1[u] * frac
    score = (
        3.0 + user_bias[u] + movie_bias[m] + 1.2 * np.einsum("ij,ij->i", taste, movie_vec[m])
        + rng.normal(0.0, noise, n_events)
    )  # fmt: skip
    rating = np.clip(np.rint(score), 1, 5).astype("float32")
    gaps = 1 + rng.poisson(max(mean_gap_s - 1.0, 0.0), n_events)
    ts = start_ts + np.cumsum(gaps, dtype="int64") - gaps[0] if n_events else np.zeros(0, "int64")

    ratings = pd.DataFrame(
        {
            "user_id": (u + 1).astype("int64"),
            "movie_id": (m + 1).astype("int64"),
            "rating": rating,
            "ts": np.asarray(ts, dtype="int64"),
        }
    )
    movie_ids = np.arange(1, n_movies + 1, dtype="int64")
    movies = pd.DataFrame(
        {
            "movie_id": movie_ids,
            "title": [f"Synthetic Movie {i}" for i in movie_ids],
            "year": years,
            "genres": [genres[g_idx[i, : n_g[i]]].tolist() for i in range(n_movies)],
        }
    )
    return Dataset(f"synthetic-{n_events}-s{seed}", ratings, movies)


def time_split(ratings: pd.DataFrame, frac: float = 0.8) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split by time: the first ``frac`` of events (stable ts order) vs the rest.

    A random split would leak the future into training; streams are judged on
    what comes next.
    """
    if not 0.0 <= frac <= 1.0:
        raise DataError(f"time_split frac must be in [0, 1], got {frac}")
    ordered = ratings.sort_values("ts", kind="stable")
    cut = int(len(ordered) * frac)
    return ordered.iloc[:cut].reset_index(drop=True), ordered.iloc[cut:].reset_index(drop=True)


def data_cache_dir() -> Path:
    """Where downloaded data lives: ``$FBP_DATA_CACHE`` or ``<repo>/.cache/data``."""
    return Path(os.environ.get("FBP_DATA_CACHE") or REPO_ROOT / ".cache" / "data")


# --------------------------------------------------------------------------- helpers


def _finish(name: str, ratings: pd.DataFrame, movies: pd.DataFrame | None) -> Dataset:
    """Coerce dtypes, order by time stably and reset the index."""
    ratings = ratings.loc[:, list(RATING_COLUMNS)].astype(RATING_DTYPES)
    ratings = ratings.sort_values("ts", kind="stable").reset_index(drop=True)
    if movies is None:
        movies = _empty_movies()
    else:
        movies = movies.loc[:, list(MOVIE_COLUMNS)].reset_index(drop=True)
        movies["movie_id"] = movies["movie_id"].astype("int64")
        movies["title"] = movies["title"].astype(str)
        movies["year"] = movies["year"].astype("float64")
    return Dataset(name, ratings, movies)


def _empty_users() -> pd.DataFrame:
    return pd.DataFrame({"user_id": pd.Series(dtype="int64"), "age": pd.Series(dtype="float64"),
                         "gender": pd.Series(dtype=str), "occupation": pd.Series(dtype=str)})


def _users_frame(rows: list[tuple[int, float, str, str]]) -> pd.DataFrame:
    if not rows:
        return _empty_users()
    df = pd.DataFrame(rows, columns=list(USER_COLUMNS))
    df["user_id"] = df["user_id"].astype("int64")
    df["age"] = df["age"].astype("float64")
    return df


def _parse_users(lines: list[str], sep: str, where: Path, gender_first: bool = False) -> pd.DataFrame:
    """user_id<sep>age<sep>gender<sep>occupation[...] (ML-100K; ML-1M's
    users.dat has gender before age: ``gender_first``).  A malformed line is
    skipped: user features are optional, a bad one must not stop an evaluation."""
    rows = []
    for line in lines:
        p = line.strip().split(sep)
        if len(p) < 4 or not p[0].strip().isdigit():
            continue
        a, g = (p[2], p[1]) if gender_first else (p[1], p[2])
        age = float(a) if a.strip().isdigit() else float("nan")
        gender = g.strip().upper() if g.strip().upper() in ("M", "F") else ""
        rows.append((int(p[0]), age, gender, p[3].strip()))
    return _users_frame(rows)


def _user_file(path: Path) -> pd.DataFrame:
    """u.user (ML-100K, ``|``) or users.dat (ML-1M, ``::``) beside a ratings file."""
    for fname, sep in (("u.user", "|"), ("users.dat", "::")):
        f = path / fname
        if f.is_file():
            return _parse_users(f.read_text(encoding="latin-1").splitlines(), sep, f, fname == "users.dat")
    return _empty_users()


def _empty_movies() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "movie_id": pd.Series(dtype="int64"),
            "title": pd.Series(dtype=str),
            "year": pd.Series(dtype="float64"),
            "genres": pd.Series(dtype=object),
        }
    )


def _parse_synthetic(source: str) -> Dataset:
    parts = source.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        n = int(parts[1])
        seed = int(parts[2]) if len(parts) == 3 else 0
        if n < 0:
            raise ValueError
    except ValueError:
        raise DataError(
            f"bad synthetic source {source!r}: expected 'synthetic:<n_events>[:<seed>]'"
        ) from None
    return synthetic_stream(n, seed=seed)


def _split_title(title: str) -> tuple[str, float]:
    m = _YEAR_IN_TITLE.match(title)
    if m:
        return m.group(1), float(m.group(2))
    return title.strip(), float("nan")


def _genre_list(tokens: list[str]) -> list[str]:
    return [g for g in tokens if g not in _NO_GENRE]


def _numeric_ratings(df: pd.DataFrame, path: Path, line_offset: int) -> pd.DataFrame:
    """Turn string columns into numbers, naming the first bad line if any."""
    out = {}
    for col in RATING_COLUMNS:
        num = pd.to_numeric(df[col], errors="coerce")
        bad = num.isna()
        if col != "rating":
            bad |= num.notna() & (num != np.floor(num.fillna(0)))
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(
                f"{path}: line {i + line_offset}: {col} is {df[col].iloc[i]!r}, expected a "
                + ("number" if col == "rating" else "whole number")
            )
        out[col] = num
    res = pd.DataFrame(out)
    r = res["rating"].to_numpy()
    bad = ~((r >= 0.5) & (r <= 5.0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}: line {i + line_offset}: rating {r[i]} outside 0.5..5")
    for col in ("user_id", "movie_id", "ts"):
        v = res[col].to_numpy()
        if (v < 0).any():
            i = int(np.flatnonzero(v < 0)[0])
            raise DataError(f"{path}: line {i + line_offset}: negative {col} {v[i]}")
    return res


def _read_table(data: bytes | Path, path: Path, sep: str, names: list[str], header: int | None):
    src = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        df = pd.read_csv(
            src, sep=sep, header=header, dtype=str, keep_default_na=False, engine="c",
            encoding="latin-1",
        )  # fmt: skip
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty") from None
    except pd.errors.ParserError as exc:
        raise DataError(f"{path}: malformed: {exc}") from None
    if header is None:
        if df.shape[1] != len(names):
            raise DataError(
                f"{path}: line 1: expected {len(names)} fields separated by {sep!r}, "
                f"found {df.shape[1]}"
            )
        df.columns = names
        missing = df[names[-1]].isna() | (df[names[-1]] == "")
        if missing.any():
            i = int(np.flatnonzero(missing.to_numpy())[0])
            raise DataError(
                f"{path}: line {i + 1}: expected {len(names)} fields separated by {sep!r}"
            )
    return df


# --------------------------------------------------------------------------- ML-100K (recbole)


def _recbole_wheel() -> Path:
    """The cached recbole wheel, downloaded once with pip (atomically)."""
    cache = data_cache_dir()
    wheel = cache / f"recbole-{RECBOLE_VERSION}-py3-none-any.whl"
    if wheel.is_file():
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", f"recbole=={RECBOLE_VERSION}", "-d", tmp]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = list(Path(tmp).glob("recbole-*.whl"))
        if proc.returncode != 0 or not got:
            raise RuntimeError(
                f"could not download recbole=={RECBOLE_VERSION} for ML-100K "
                f"({' '.join(cmd)}): {proc.stderr.strip()[-500:]}"
            )
        os.replace(got[0], wheel)
    return wheel


@lru_cache(maxsize=1)
def _load_ml100k_cached() -> Dataset:
    wheel = _recbole_wheel()
    with zipfile.ZipFile(wheel) as zf:
        inter = zf.read(_RECBOLE_PREFIX + ".inter")
        item = zf.read(_RECBOLE_PREFIX + ".item")
        try:
            user = zf.read(_RECBOLE_PREFIX + ".user").decode("utf-8")
        except KeyError:
            user = ""
    where = Path(f"{wheel}!{_RECBOLE_PREFIX}.inter")
    df = _read_table(inter, where, "\t", [], header=0)
    df.columns = [c.split(":")[0] for c in df.columns]
    df = df.rename(columns={"item_id": "movie_id", "timestamp": "ts"})
    ratings = _numeric_ratings(df, where, line_offset=2)

    rows = []
    for line in item.decode("utf-8").splitlines()[1:]:
        p = line.split("\t")
        if len(p) != 4:
            raise DataError(f"{wheel}!{_RECBOLE_PREFIX}.item: bad line {line!r}")
        year = float(p[2]) if p[2].isdigit() else float("nan")
        rows.append((int(p[0]), p[1], year, _genre_list(p[3].split(" "))))
    movies = pd.DataFrame(rows, columns=list(MOVIE_COLUMNS))
    ds = _finish("ml-100k", ratings, movies)
    ds.users = _parse_users(user.splitlines()[1:], "\t", Path(f"{wheel}!{_RECBOLE_PREFIX}.user"))
    return ds


# --------------------------------------------------------------------------- MovieLens files


def _with_users(ds: Dataset, folder: Path) -> Dataset:
    ds.users = _user_file(folder)
    return ds


def _load_path(path: Path) -> Dataset:
    if path.is_dir():
        for fname in ("u.data", "ratings.dat", "ratings.csv"):
            if (path / fname).is_file():
                return _load_path(path / fname)
        raise DataError(f"{path}: directory has none of u.data, ratings.dat, ratings.csv")
    name = path.parent.name or path.stem
    if path.name == "u.data" or path.suffix == ".data":
        df = _read_table(path, path, "\t", list(RATING_COLUMNS), header=None)
        ratings = _numeric_ratings(df, path, line_offset=1)
        return _with_users(_finish(name, ratings, _u_item(path.parent / "u.item")), path.parent)
    if path.suffix == ".dat":
        raw = path.read_bytes().replace(b"::", b"\t")
        df = _read_table(raw, path, "\t", list(RATING_COLUMNS), header=None)
        ratings = _numeric_ratings(df, path, line_offset=1)
        return _with_users(_finish(name, ratings, _movies_dat(path.parent / "movies.dat")), path.parent)
    if path.suffix == ".csv":
        df = _read_table(path, path, ",", [], header=0)
        cols = {c.strip().lower(): c for c in df.columns}
        want = {"userid": "user_id", "movieid": "movie_id", "rating": "rating", "timestamp": "ts"}
        missing = [k for k in want if k not in cols]
        if missing:
            raise DataError(
                f"{path}: header must name userId,movieId,rating,timestamp; "
                f"missing {missing} in {list(df.columns)}"
            )
        df = df.rename(columns={cols[k]: v for k, v in want.items()})
        ratings = _numeric_ratings(df, path, line_offset=2)
        return _finish(name, ratings, _movies_csv(path.parent / "movies.csv"))
    raise DataError(f"{path}: unknown ratings file (want u.data, ratings.dat or ratings.csv)")


def _movie_fields(path: Path, sep: str, n_fields: int, expected: str) -> Iterator[list[str]]:
    """The fields of each non-blank line of a MovieLens movie file (latin-1),
    the first a numeric id; a line of another shape is refused with its number."""
    for n, line in enumerate(path.read_text(encoding="latin-1").splitlines(), 1):
        if not line.strip():
            continue
        p = line.split(sep)
        if len(p) != n_fields or not p[0].isdigit():
            raise DataError(f"{path}: line {n}: expected {expected}")
        yield p


def _u_item(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    rows = []
    for p in _movie_fields(path, "|", 5 + len(ML100K_GENRES), "id|title|date|video date|url|19 genre flags"):
        title, year = _split_title(p[1])
        if np.isnan(year) and p[2][-4:].isdigit():
            year = float(p[2][-4:])
        flags = p[5:]
        rows.append((int(p[0]), title, year,
                     _genre_list([g for g, f in zip(ML100K_GENRES, flags) if f.strip() == "1"])))  # fmt: skip
    return pd.DataFrame(rows, columns=list(MOVIE_COLUMNS))


def _movies_dat(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    rows = []
    for p in _movie_fields(path, "::", 3, "MovieID::Title::Genres"):
        title, year = _split_title(p[1])
        rows.append((int(p[0]), title, year, _genre_list(p[2].split("|"))))
    return pd.DataFrame(rows, columns=list(MOVIE_COLUMNS))


def _movies_csv(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: malformed: {exc}") from None
    cols = {c.strip().lower(): c for c in df.columns}
    if not {"movieid", "title", "genres"} <= cols.keys():
        raise DataError(f"{path}: header must name movieId,title,genres, got {list(df.columns)}")
    ids = pd.to_numeric(df[cols["movieid"]], errors="coerce")
    if ids.isna().any():
        i = int(np.flatnonzero(ids.isna().to_numpy())[0])
        raise DataError(f"{path}: line {i + 2}: movieId {df[cols['movieid']].iloc[i]!r}")
    split = [_split_title(t) for t in df[cols["title"]]]
    return pd.DataFrame(
        {
            "movie_id": ids.astype("int64"),
            "title": [s[0] for s in split],
            "year": [s[1] for s in split],
            "genres": [_genre_list(g.split("|")) for g in df[cols["genres"]]],
        }
    )
