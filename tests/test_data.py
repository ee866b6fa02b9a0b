"""Loaders turn every MovieLens flavour into the same time-ordered frame."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from core.datasets import Dataset, load_dataset, synthetic_stream, time_split

RATING_DTYPES = {"user_id": "int64", "movie_id": "int64", "rating": "float32", "ts": "int64"}


def _check_shape(ds: Dataset) -> None:
    assert list(ds.ratings.columns) == list(RATING_DTYPES)
    assert {c: str(t) for c, t in ds.ratings.dtypes.items()} == RATING_DTYPES
    assert ds.ratings["ts"].is_monotonic_increasing
    assert list(ds.ratings.index) == list(range(len(ds.ratings)))
    assert list(ds.movies.columns) == ["movie_id", "title", "year", "genres"]


def test_u_data_with_u_item(tmp_path):
    # Two events share ts 100: file order must be kept (stable sort).
    (tmp_path / "u.data").write_text("1\t10\t5\t300\n2\t11\t3\t100\n1\t12\t4\t100\n")
    flags = ["0"] * 19
    flags[1] = flags[5] = "1"  # Action, Comedy
    (tmp_path / "u.item").write_bytes(
        ("10|Caf\xe9 Movie (1995)|01-Jan-1995||http://x|" + "|".join(flags) + "\n").encode(
            "latin-1"
        )
    )
    ds = load_dataset(tmp_path)
    _check_shape(ds)
    assert ds.ratings[["user_id", "movie_id", "ts"]].values.tolist() == [
        [2, 11, 100],
        [1, 12, 100],
        [1, 10, 300],
    ]
    row = ds.movies.iloc[0]
    assert (row.movie_id, row.title, row.year, row.genres) == (10, "Caf\xe9 Movie", 1995.0, ["Action", "Comedy"])
    assert ds.genre_vocab == ["Action", "Comedy"]


def test_ratings_dat_with_movies_dat(tmp_path):
    (tmp_path / "ratings.dat").write_text("1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n")
    (tmp_path / "movies.dat").write_bytes(
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n661::James and the Giant Peach (1996)::Animation|Children's|Musical\n".encode(
            "latin-1"
        )
    )
    ds = load_dataset(tmp_path / "ratings.dat")
    _check_shape(ds)
    assert ds.ratings["user_id"].tolist() == [2, 1, 1]
    assert ds.ratings["rating"].tolist() == [4.0, 5.0, 3.0]
    m = ds.movies.set_index("movie_id")
    assert m.loc[661, "genres"] == ["Animation", "Children's", "Musical"]
    assert m.loc[1193, "year"] == 1975.0


def test_ratings_csv_half_stars_and_titles(tmp_path):
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,3.5,964982703\n1,3,4.0,964981247\n2,1,0.5,964982224\n")
    (tmp_path / "movies.csv").write_text(
        'movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n3,"Grumpier Old Men, The (1995)",Comedy|Romance\n4,No Year,(no genres listed)\n'
    )
    ds = load_dataset(str(tmp_path))
    _check_shape(ds)
    assert sorted(ds.ratings["rating"].tolist()) == [0.5, 3.5, 4.0]
    m = ds.movies.set_index("movie_id")
    assert m.loc[3, "title"] == "Grumpier Old Men, The"
    assert m.loc[1, "year"] == 1995.0
    assert math.isnan(m.loc[4, "year"]) and m.loc[4, "genres"] == []


def test_ratings_without_metadata_gives_empty_movies(tmp_path):
    (tmp_path / "u.data").write_text("1\t2\t3\t4\n")
    ds = load_dataset(tmp_path / "u.data")
    _check_shape(ds)
    assert ds.movies.empty and ds.genre_vocab == []


@pytest.mark.parametrize(
    ("fname", "content", "needle"),
    [
        ("u.data", "1\t2\t3\n", "expected 4 fields"),
        ("u.data", "1\t2\t3\t4\n1\t2\t3\t4\t5\n", "malformed"),
        ("u.data", "1\tx\t3\t4\n", "line 1: movie_id"),
        ("u.data", "1\t2\t3\t4\n1\t2\t9\t4\n", "line 2: rating 9 outside"),
        ("u.data", "", "empty"),
        ("ratings.dat", "1::2::3::4.5\n", "ts"),
        ("ratings.csv", "user,movie,rating,time\n1,2,3,4\n", "header must name"),
        ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,,4\n", "line 2: rating"),
    ],
)
def test_malformed_input_names_file_and_problem(tmp_path, fname, content, needle):
    p = tmp_path / fname
    p.write_text(content)
    with pytest.raises(ValueError) as ei:
        load_dataset(p)
    assert str(p) in str(ei.value) and needle in str(ei.value)


def test_unknown_source_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown data source"):
        load_dataset("no-such-dataset")
    with pytest.raises(ValueError, match="synthetic"):
        load_dataset("synthetic:lots")
    with pytest.raises(ValueError, match="none of"):
        load_dataset(tmp_path)


def test_ml100k_from_recbole_wheel():
    ds = load_dataset("ml-100k")
    _check_shape(ds)
    r = ds.ratings
    assert len(r) == 100_000
    assert r["user_id"].nunique() == 943
    assert r["movie_id"].nunique() == 1682
    assert set(r["rating"].unique()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert len(ds.movies) == 1682
    assert "Drama" in ds.genre_vocab and len(ds.genre_vocab) == 18
    toy = ds.movies.set_index("movie_id").loc[1]
    assert toy.title == "Toy Story" and toy.year == 1995.0
    # Callers get their own copy: mutating it must not leak into the next load.
    r.loc[0, "rating"] = 0.0
    assert load_dataset("ml-100k").ratings.loc[0, "rating"] != 0.0


def test_synthetic_is_deterministic_and_sane():
    a = synthetic_stream(5_000, n_users=50, n_movies=200, seed=7)
    b = synthetic_stream(5_000, n_users=50, n_movies=200, seed=7)
    c = synthetic_stream(5_000, n_users=50, n_movies=200, seed=8)
    _check_shape(a)
    pd.testing.assert_frame_equal(a.ratings, b.ratings)
    assert not a.ratings.equals(c.ratings)
    r = a.ratings
    assert (np.diff(r["ts"].to_numpy()) > 0).all()
    assert set(r["rating"].unique()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert r["user_id"].between(1, 50).all() and r["movie_id"].between(1, 200).all()
    # Zipf popularity: the top movie is far more common than the median one.
    counts = r["movie_id"].value_counts()
    assert counts.iloc[0] > 10 * counts.median()
    assert a.genre_vocab and all(isinstance(g, str) for gs in a.movies["genres"] for g in gs)
    assert load_dataset("synthetic:300:7").ratings.shape == (300, 4)


def test_synthetic_ratings_are_learnable():
    """A per-(user, genre) mean clearly beats the global mean: there is taste to learn."""
    ds = synthetic_stream(60_000, n_users=100, n_movies=300, seed=1)
    train, test = time_split(ds.ratings, 0.8)
    glob = float(train["rating"].mean())
    first_genre = ds.movies.set_index("movie_id")["genres"].str[0]
    tr = train.assign(g=train["movie_id"].map(first_genre))
    te = test.assign(g=test["movie_id"].map(first_genre))
    ug = tr.groupby(["user_id", "g"])["rating"].mean()
    pred = pd.Series(list(zip(te["user_id"], te["g"]))).map(ug).fillna(glob).to_numpy()
    rmse = float(np.sqrt(((pred - te["rating"].to_numpy()) ** 2).mean()))
    base = float(np.sqrt(((glob - te["rating"]) ** 2).mean()))
    assert rmse < 0.85 * base


def test_time_split_orders_by_time():
    df = pd.DataFrame({"user_id": [1, 2, 3, 4, 5], "movie_id": [1] * 5, "rating": [1.0] * 5, "ts": [5, 1, 4, 2, 3]})
    train, test = time_split(df, 0.6)
    assert train["ts"].tolist() == [1, 2, 3] and test["ts"].tolist() == [4, 5]
    with pytest.raises(ValueError):
        time_split(df, 1.5)


def test_user_side_info_from_u_user_and_users_dat(tmp_path):
    """u.user (id|age|gender|occupation|zip) and ML-1M users.dat
    (id::gender::age::occupation::zip) give the same frame; a bad line is
    skipped; no user file gives an empty frame (models then use no user features)."""
    a = tmp_path / "a"
    a.mkdir()
    (a / "u.data").write_text("1\t10\t4\t100\n2\t11\t3\t101\n")
    (a / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\nbroken line\n")
    b = tmp_path / "b"
    b.mkdir()
    (b / "ratings.dat").write_text("1::10::4::100\n2::11::3::101\n")
    (b / "users.dat").write_text("1::M::24::technician::85711\n2::F::53::other::94043\n")
    for folder in (a, b):
        u = load_dataset(folder).users
        assert u["user_id"].tolist() == [1, 2] and u["age"].tolist() == [24.0, 53.0]
        assert u["gender"].tolist() == ["M", "F"] and u["occupation"].tolist() == ["technician", "other"]
    c = tmp_path / "c"
    c.mkdir()
    (c / "u.data").write_text("1\t10\t4\t100\n")
    assert load_dataset(c).users.empty and load_dataset("synthetic:50").users.empty


def test_ml100k_has_user_side_info():
    u = load_dataset("ml-100k").users
    assert len(u) == 943 and set(u["gender"]) == {"M", "F"} and u["age"].notna().all()
