"""Offline training: ``fbp train`` and the Python API the fine-tuner reuses.

* :func:`make_model` -- a model sized and featurised for a data set;
* :func:`fit` -- Adam on MSE through ``forward_sequence`` over whole user
  histories (ML-100K's longest is ~740 events, so no truncation), early
  stopping on the last ``valid_frac`` of the events by time, warm start when
  the model already has weights;
* :func:`evaluate_rmse` -- predict each event from the state built from all
  the user's earlier events (context events are replayed but not scored);
* :func:`replay_states` -- final states of users after their histories.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch
import typer

from models.base import RatingModel, State
from models.devices import pick_device
from models import online_pack as opk
from models.registry import build, model_class
from trainer.stream_order import step_online_events, stream_order
from trainer.sequences import UserSequences, build_sequences, iterate, pad, batch_indices

#: per-model defaults found on ML-100K (see trainer/evaluate.py's docstring for figures)
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "lstm": {},
    "cnn": {},
    "mf": {},
    "baseline": {},
}
TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "lstm": {"lr": 3e-2, "l2": 1e-3},  # lr: docs/results/issue22/network_half_tune.py
    "online": {"lr": 1e-2, "l2": 1e-3},
    "cnn": {"lr": 3e-3, "l2": 1e-3},
    "mf": {"lr": 1e-2, "l2": 1e-3},
    "baseline": {"lr": 3e-2, "l2": 0.0},
}


def make_model(
    name: str,
    movies: pd.DataFrame | None = None,
    genre_vocab: list[str] | None = None,
    max_movie_id: int = 0,
    users: pd.DataFrame | None = None,
    **hparams: Any,
) -> RatingModel:
    """Build ``name`` with the data set's genre vocabulary, year range and movie
    ids (and what the family derives from the users: ``RatingModel.hparams_from_users``)."""
    hp: dict[str, Any] = dict(MODEL_DEFAULTS.get(name, {}))
    hp.update(hparams)
    for key, value in model_class(name).hparams_from_users(users).items():
        hp.setdefault(key, value)
    hp.setdefault("genre_vocab", list(genre_vocab or []))
    if movies is not None and len(movies):
        years = pd.to_numeric(movies["year"], errors="coerce").dropna()
        if len(years):
            hp.setdefault("year_min", float(years.min()))
            hp.setdefault("year_max", float(years.max()))
        max_movie_id = max(max_movie_id, int(movies["movie_id"].max()))
    hp.setdefault("n_movies", max_movie_id + 1)
    model = build(name, **hp)
    if movies is not None:
        model.set_movies(movies)
    return model


@dataclass
class FitReport:
    epochs_run: int = 0
    best_epoch: int = 0
    train_rmse: list[float] = field(default_factory=list)
    valid_rmse: list[float] = field(default_factory=list)
    best_valid_rmse: float | None = None
    n_train: int = 0
    n_valid: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalResult:
    rmse: float
    mae: float
    n: int
    predictions: np.ndarray  # float32, aligned with the rows of the scored frame

    def to_dict(self) -> dict[str, Any]:
        return {"rmse": self.rmse, "mae": self.mae, "n": self.n}


def _time_order(df: pd.DataFrame) -> np.ndarray:
    return np.lexsort((np.arange(len(df)), df["ts"].to_numpy()))


def fit(
    model: RatingModel,
    ratings_df: pd.DataFrame,
    *,
    epochs: int = 10,
    lr: float | None = None,
    batch_users: int = 64,
    device: str | torch.device | None = "auto",
    valid_frac: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    l2: float | None = None,
    patience: int = 2,
    max_events: int = 16384,
    grad_clip: float = 5.0,
) -> FitReport:
    """Train ``model`` in place on ``ratings_df`` (warm start if it has weights).

    The last ``valid_frac`` of the events by time is held out for early stopping
    (their users' earlier events still build their states); with
    ``valid_frac=0`` it trains exactly ``epochs`` epochs on everything.  The best
    epoch's weights are kept.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    defaults = TRAIN_DEFAULTS.get(model.name, {})
    lr = float(defaults.get("lr", 3e-3) if lr is None else lr)
    l2 = float(defaults.get("l2", 0.0) if l2 is None else l2)
    dev = pick_device(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model.to(dev)
    if len(ratings_df) == 0:
        return FitReport(seconds=time.perf_counter() - t0)
    model.ensure_capacity(int(ratings_df["movie_id"].max()))
    model.to(dev)
    model.init_from_data(float(ratings_df["rating"].mean()))
    n = len(ratings_df)
    n_valid = int(round(n * valid_frac)) if valid_frac > 0 else 0
    is_valid = np.zeros(n, dtype=bool)
    if n_valid > 0:
        is_valid[_time_order(ratings_df)[n - n_valid :]] = True
    # a fresh online movie side learns the training events only, so early
    # stopping never scores ratings it has already learned; the validation
    # events follow after training, so the checkpoint ships all of them
    online_pass = None
    side = model.movie_side()
    if side is not None and opk.is_blank(side):
        online_pass = OnlinePass(model, ratings_df)
        online_pass.learn(n - n_valid)
    train_seqs = build_sequences(ratings_df[~is_valid]) if n_valid else build_sequences(ratings_df)
    valid_seqs = build_sequences(ratings_df, flag=is_valid) if n_valid else None
    if n_valid:
        keep = np.isin(valid_seqs.users, np.unique(ratings_df["user_id"].to_numpy()[is_valid]))
        valid_seqs = _subset_users(valid_seqs, keep)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    rep = FitReport(n_train=int(n - n_valid), n_valid=n_valid)
    best = math.inf
    best_sd = None
    bad = 0
    for ep in range(epochs):
        model.train()
        sse, cnt = 0.0, 0
        batches = batch_indices(train_seqs, batch_users, max_events=max_events, rng=rng)
        bar = tqdm(batches, desc=f"{model.name} epoch {ep + 1}/{epochs}", disable=not progress, leave=False)
        for idx in bar:
            b = pad(train_seqs, idx, dev)
            pred = model.forward_sequence(b.movie, b.rating, b.ts, b.mask)
            err = (pred - b.rating)[b.mask]
            loss = err.pow(2).mean()
            if l2 > 0:
                loss = loss + l2 * model.movie_l2(b.movie[b.mask]) / err.numel()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            sse += float(err.detach().pow(2).sum())
            cnt += int(err.numel())
            bar.set_postfix(rmse=f"{math.sqrt(sse / max(cnt, 1)):.4f}")
        rep.train_rmse.append(math.sqrt(sse / max(cnt, 1)))
        rep.epochs_run = ep + 1
        if valid_seqs is not None:
            with model.judging():  # a learned share is fixed while networks are compared
                v = _score(model, valid_seqs, dev)
            vr = v.rmse
            rep.valid_rmse.append(vr)
            if progress:
                tqdm.write(f"{model.name} epoch {ep + 1}: train {rep.train_rmse[-1]:.4f} valid {vr:.4f}")
            if vr < best - 1e-5:
                best, bad, rep.best_epoch = vr, 0, ep + 1
                best_sd = copy.deepcopy(model.state_dict())
            else:
                bad += 1
                if bad >= patience:
                    break
        else:
            rep.best_epoch = ep + 1
    if best_sd is not None:
        model.load_state_dict(best_sd)
        rep.best_valid_rmse = best
    model.eval()
    if online_pass is not None:
        model.start_network_share()  # what the pass before training learned of it judged an untrained network
        online_pass.learn(n)
    rep.seconds = time.perf_counter() - t0
    return rep


def learn_online_once(model: RatingModel, ratings_df: pd.DataFrame, batch_events: int = 1024) -> None:
    """A model whose online movie side never learned (offline training from
    scratch) gets one predict-then-learn pass over the data in time order,
    as the stream would have given it, so a bootstrap checkpoint ships a
    learned movie side.  Fine-tunes skip this: their movie side is live."""
    OnlinePass(model, ratings_df, batch_events).learn(len(ratings_df))


class OnlinePass:
    """One predict-then-learn pass of a model's online part over ``ratings_df``
    in stream order, as a worker's batches of ``batch_events`` would give it
    (the movie side learned through the protocol: :func:`step_online_events`),
    run in stretches: :meth:`learn` ``(upto)`` advances it to the first
    ``upto`` events.  Why stretches: ``fit`` learns the training events before
    training and the validation events (the last ones by time) only after
    early stopping has scored them."""

    def __init__(self, model: RatingModel, ratings_df: pd.DataFrame, batch_events: int = 1024) -> None:
        df = stream_order(ratings_df)
        self.model, self.batch_events, self.pos = model, int(batch_events), 0
        users = df["user_id"].to_numpy(np.int64)
        uniq = np.unique(users)
        self.uidx = np.searchsorted(uniq, users)
        self.movie, self.rating, self.ts = (
            df[c].to_numpy(t) for c, t in (("movie_id", np.int64), ("rating", np.float32), ("ts", np.int64)))
        model.eval()
        self.states = model.init_state(len(uniq), model.device)

    def learn(self, upto: int) -> None:
        hi = min(int(upto), len(self.uidx))
        self.model.eval()
        for s in range(self.pos, hi, self.batch_events):
            e = min(hi, s + self.batch_events)
            step_online_events(self.model, self.states, self.uidx[s:e], self.movie[s:e], self.rating[s:e],
                               self.ts[s:e])
        self.pos = max(self.pos, hi)


def _subset_users(seqs: UserSequences, keep: np.ndarray) -> UserSequences:
    sel = np.nonzero(keep)[0]
    parts = [np.arange(seqs.offsets[i], seqs.offsets[i] + seqs.lengths[i]) for i in sel]
    ev = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    lengths = seqs.lengths[sel]
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(sel) else lengths
    return UserSequences(seqs.users[sel], offsets, lengths, seqs.movie[ev], seqs.rating[ev],
                         seqs.ts[ev], seqs.flag[ev], seqs.row[ev])


@torch.no_grad()
def _score(model: RatingModel, seqs: UserSequences, device: torch.device, batch_users: int = 128) -> EvalResult:
    """Predictions of the flagged events, in flat (user, time) order of ``seqs``."""
    model.eval()
    out = np.zeros(len(seqs.movie), dtype=np.float32)
    for b in iterate(seqs, batch_users, device, max_events=65536):
        pred = model.forward_sequence(b.movie, b.rating, b.ts, b.mask).float().cpu().numpy()
        m = b.mask.cpu().numpy()
        flat = (seqs.offsets[b.idx][:, None] + np.arange(m.shape[1])[None, :])[m]
        out[flat] = pred[m]
    p = out[seqs.flag]
    y = seqs.rating[seqs.flag]
    n = int(len(p))
    rmse = float(np.sqrt(np.mean((p - y) ** 2))) if n else math.nan
    mae = float(np.mean(np.abs(p - y))) if n else math.nan
    return EvalResult(rmse, mae, n, p)


def evaluate_rmse(
    model: RatingModel,
    ratings_df: pd.DataFrame,
    context_df: pd.DataFrame | None = None,
    *,
    device: str | torch.device | None = None,
    batch_users: int = 128,
) -> EvalResult:
    """RMSE/MAE of ``ratings_df``'s events, each predicted from the state built
    from all earlier events of its user (``context_df`` events included, not
    scored; at equal timestamps context comes first).  Weights stay frozen;
    ``predictions`` is aligned with the rows of ``ratings_df``."""
    dev = pick_device(device) if device is not None else model.device
    model.to(dev)
    if context_df is not None and len(context_df):
        both = pd.concat([context_df[["user_id", "movie_id", "rating", "ts"]],
                          ratings_df[["user_id", "movie_id", "rating", "ts"]]], ignore_index=True)
        flag = np.r_[np.zeros(len(context_df), bool), np.ones(len(ratings_df), bool)]
    else:
        both = ratings_df[["user_id", "movie_id", "rating", "ts"]].reset_index(drop=True)
        flag = np.ones(len(ratings_df), bool)
    model.ensure_capacity(int(both["movie_id"].max()) if len(both) else 0)
    model.to(dev)
    seqs = build_sequences(both, flag=flag)
    res = _score(model, seqs, dev, batch_users)
    # back to the input order of ratings_df
    rows = seqs.row[seqs.flag] - (len(both) - len(ratings_df))
    aligned = np.empty(len(ratings_df), dtype=np.float32)
    aligned[rows] = res.predictions
    return EvalResult(res.rmse, res.mae, res.n, aligned)


@torch.no_grad()
def replay_states(
    model: RatingModel, ratings_df: pd.DataFrame, *, batch_users: int = 128
) -> tuple[np.ndarray, State]:
    """(user ids, final states) after a fresh pass over each user's events."""
    seqs = build_sequences(ratings_df)
    dev = model.device
    state = model.init_state(seqs.n_users, dev)
    for b in iterate(seqs, batch_users, dev, max_events=65536):
        fin = model.final_state(b.movie, b.rating, b.ts, b.mask)
        idx = torch.from_numpy(b.idx).to(dev)
        for k in state:
            state[k][idx] = fin[k]
    return seqs.users, state


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


def cli(
    data: str = typer.Option("ml-100k", help="ml-100k, synthetic:<n>[:<seed>] or a path to MovieLens files"),
    model: str = typer.Option("lstm", help="lstm, cnn, mf or baseline"),
    out: Path = typer.Option(Path("runs/latest/model"), help="checkpoint path (a <path>.json sidecar is written too)"),
    epochs: int = typer.Option(20, min=1, help="maximum epochs (early stopping on the validation slice)"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    train_frac: float = typer.Option(0.8, min=0.05, max=1.0, help="first fraction of events by time to train on"),
    valid_frac: float = typer.Option(0.1, min=0.0, max=0.5, help="last fraction of the train part used for early stopping"),
    seed: Optional[int] = typer.Option(None, help="random seed (default: settings.trainer.seed)"),
    lr: Optional[float] = typer.Option(None, help="Adam learning rate (default per model)"),
    batch_users: int = typer.Option(64, min=1, help="users per batch"),
    hparams: str = typer.Option("{}", help='model hparams as JSON, e.g. \'{"hidden": 64}\''),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write metrics as JSON here"),
    progress: bool = typer.Option(True, help="show progress bars"),
) -> None:
    """Train a model on the first part of a data set by time and save a checkpoint."""
    from models.checkpoint import save_checkpoint
    from core.datasets import load_dataset, time_split

    if seed is None:
        from core.settings import get_settings

        seed = get_settings().trainer.seed
    try:
        hp = json.loads(hparams)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"--hparams is not JSON: {exc}") from None
    torch.manual_seed(seed)
    ds = load_dataset(data)
    train, test = time_split(ds.ratings, train_frac) if train_frac < 1.0 else (ds.ratings, ds.ratings.iloc[:0])
    m = make_model(model, ds.movies, ds.genre_vocab, int(ds.ratings["movie_id"].max()), **hp)
    typer.echo(f"training {model} on {data}: {len(train)} train / {len(test)} test events, device {pick_device(device)}")
    rep = fit(m, train, epochs=epochs, lr=lr, batch_users=batch_users, device=device,
              valid_frac=valid_frac, seed=seed, progress=progress)
    metrics: dict[str, Any] = {"best_valid_rmse": rep.best_valid_rmse, "train_rmse": rep.train_rmse[-1] if rep.train_rmse else None}
    if len(test):
        ev = evaluate_rmse(m, test, context_df=train)
        metrics.update(test_rmse=ev.rmse, test_mae=ev.mae, test_n=ev.n)
    meta = {
        "dataset": ds.name,
        "data": {"source": str(data), "train_events": len(train), "test_events": len(test),
                 "train_ts": [int(train["ts"].min()), int(train["ts"].max())] if len(train) else None,
                 "max_movie_id": int(ds.ratings["movie_id"].max())},
        "metrics": metrics,
        "train": {**rep.to_dict(), "seed": seed, "lr": lr, "batch_users": batch_users, "epochs": epochs},
    }
    sha = save_checkpoint(m, out, meta)
    typer.echo(f"{model}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
               + f" ({rep.seconds:.1f}s) -> {out} sha256 {sha[:12]}")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"model": model, "checkpoint": str(out), "sha256": sha, **meta},
                                        default=_json_default, indent=2))
