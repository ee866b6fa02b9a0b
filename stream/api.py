"""The worker's HTTP API (served by Faust's web server).

Read endpoints (JSON):
  GET  /health
  GET  /api/v1/model                        serving model, version history
  GET  /api/v1/users/{user_id}/scores?movies=1,2,3
  GET  /api/v1/users/{user_id}/top?k=10        "top": [[movie_id, score], ...] and
                                            "titles": {"<movie_id>": title} of the known ones
  GET  /api/v1/users/{user_id}/profile
  GET  /metrics                             Prometheus exposition
Admin endpoints (need ``Authorization: Bearer <FBP_WORKER__ADMIN_TOKEN>``):
  POST /api/v1/admin/reload                 re-read the published model now
  POST /api/v1/admin/rollback  {"version": n?}
  POST /api/v1/admin/finetune               ask the trainer for a fine-tune now

Bad requests get a 4xx with ``{"error": ..., "detail": ...}``; a bug gets a
500 with no internals.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
from typing import Any, Awaitable, Callable

import orjson
import torch
from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from models import state as mstate
from models.base import RatingModel
from models.checkpoint import CheckpointError
from stream import metrics as m
from stream.routes import Routes
from stream.topk import top_k
from stream.runtime import runtime
from stream.titles import titles

log = logging.getLogger(__name__)
#: this module's pages (and timers), registered by ``stream.app.build_app``
routes = Routes()
MAX_ID = 2**53
MAX_MOVIES_PER_QUERY = 1000


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str = "") -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


def _token_ok(request: Request, secret: Any) -> bool:
    if secret is None:
        return True
    header = request.headers.get("Authorization", "")
    given = header[7:] if header.startswith("Bearer ") else ""
    return hmac.compare_digest(given.encode(), secret.get_secret_value().encode())


def require_read(request: Request) -> None:
    if not _token_ok(request, runtime.settings.worker.read_token):
        raise ApiError(401, "unauthorized", "send Authorization: Bearer <read token>")


def _require_admin(request: Request) -> None:
    token = runtime.settings.worker.admin_token
    if token is None:
        raise ApiError(403, "admin_disabled", "set FBP_WORKER__ADMIN_TOKEN to enable admin endpoints")
    if not _token_ok(request, token):
        raise ApiError(401, "unauthorized", "send Authorization: Bearer <admin token>")


def _int(value: str, name: str, lo: int = 0, hi: int = MAX_ID) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise ApiError(400, "bad_parameter", f"{name} must be an integer") from None
    if not lo <= v < hi:
        raise ApiError(400, "bad_parameter", f"{name} must be in [{lo}, {hi})")
    return v


def _json(view: View, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return view.bytes(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY),
                      content_type="application/json", status=status, headers=headers)


async def _guarded(view: View, fn: Callable[[], Awaitable[Any]], headers: dict[str, str] | None = None) -> Response:
    """``fn()``'s result as JSON; ApiError as its 4xx/5xx body; anything else a logged 500."""
    try:
        return _json(view, await fn(), headers=headers)
    except ApiError as e:
        return _json(view, {"error": e.error, "detail": e.detail}, e.status)
    except Exception:  # never leak internals; log them
        log.exception("API error")
        return _json(view, {"error": "internal"}, 500)


def json_endpoint(access: Callable[[Request], None], headers: dict[str, str] | None = None
                  ) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Response]]]:
    """A view method answering JSON: ``access(request)`` first (it raises
    ApiError 401/403), then the handler's result, through :func:`_guarded`.
    Every endpoint checks its token and shapes its errors the same way
    because none of them spells it out."""
    def wrap(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Response]]:
        @functools.wraps(handler)
        async def method(view: View, request: Request, **params: str) -> Response:
            async def run() -> Any:
                access(request)
                return await handler(view, request, **params)
            return await _guarded(view, run, headers=headers)
        return method
    return wrap


async def _user_state(user_id: int) -> tuple[Any, mstate.State, bool]:
    if not runtime.ready or runtime.store is None:
        raise ApiError(503, "not_ready", "the worker has not loaded its model yet")
    model = runtime.model
    stored = await runtime.store.get(user_id)
    device = model.device
    st, stale, foreign = model.unpack_states([stored.blob], device)
    if bool(stale.any()):
        st = model.rederive(st, stale)
    # a state the serving model cannot read is answered as a new user's (the
    # worker resets it on the user's next event)
    return model, st, stored.blob is not None and not bool(foreign.any())


@routes.page("/health")
class Health(View):
    async def get(self, request: Request) -> Response:
        model = runtime.model
        return _json(self, {
            "status": "ok" if runtime.ready else "starting",
            "model": model.name if model else None,
            "model_version": model.version if model else None,
            "device": str(model.device) if model else None,
        }, 200)


@routes.page("/metrics")
class Metrics(View):
    async def get(self, request: Request) -> Response:
        return self.bytes(generate_latest(m.REGISTRY), content_type=CONTENT_TYPE_LATEST.split(";")[0])


@routes.page("/api/v1/model")
class ModelInfo(View):
    @json_endpoint(require_read)
    async def get(self, request: Request) -> Any:
        model = runtime.model
        hist = await asyncio.to_thread(runtime.models.history) if runtime.models else []
        return {"model": model.name if model else None,
                "version": model.version if model else None,
                "refused": runtime.refused, "history": hist}


@routes.page("/api/v1/users/{user_id}/scores")
class Scores(View):
    @json_endpoint(require_read)
    async def get(self, request: Request, user_id: str) -> Any:
        uid = _int(user_id, "user_id")
        raw = request.query.get("movies", "")
        parts = [p for p in raw.split(",") if p.strip()]
        if not parts:
            raise ApiError(400, "bad_parameter", "movies=1,2,3 is required")
        if len(parts) > MAX_MOVIES_PER_QUERY:
            raise ApiError(400, "bad_parameter", f"at most {MAX_MOVIES_PER_QUERY} movies")
        movies = [_int(p.strip(), "movie id", 0, 2**31) for p in parts]
        model, st, known = await _user_state(uid)
        ids = torch.tensor(movies, dtype=torch.int64, device=model.device)
        with torch.inference_mode():
            sc = model.score(st, ids)[0].cpu().tolist()  # unknown movies score as cold start
        return {"user_id": uid, "known_user": known, "model_version": model.version,
                "scores": {str(a): round(b, 4) for a, b in zip(movies, sc)}}


@routes.page("/api/v1/users/{user_id}/top")
class Top(View):
    @json_endpoint(require_read)
    async def get(self, request: Request, user_id: str) -> Any:
        uid = _int(user_id, "user_id")
        k = _int(request.query.get("k", "10"), "k", 1, 1001)
        model, st, known = await _user_state(uid)
        with torch.inference_mode():
            ids, scores = top_k(model, st, k)
        names = await titles(ids[0])
        return {"user_id": uid, "known_user": known, "model_version": model.version,
                "top": [[a, b] for a, b in zip(ids[0], scores[0])],
                "titles": {str(i): t for i, t in names.items()}}


@routes.page("/api/v1/users/{user_id}/profile")
class Profile(View):
    @json_endpoint(require_read)
    async def get(self, request: Request, user_id: str) -> Any:
        uid = _int(user_id, "user_id")
        model, st, known = await _user_state(uid)
        count, mean_t = model.rating_stats(st)
        n, mean = int(count[0].item()), float(mean_t[0].item())
        return {"user_id": uid, "known_user": known, "ratings": n,
                "mean_rating": round(mean, 4) if n else None,
                "favourite_genres": _favourite_genres(model, st),
                "recent_movies": _recent(model, st), "model_version": model.version}


@routes.page("/api/v1/admin/reload")
class Reload(View):
    @json_endpoint(_require_admin)
    async def post(self, request: Request) -> Any:
        await runtime.check_model(self.app)
        cur = await asyncio.to_thread(runtime.models.current) if runtime.models else None
        return {"current_published": cur.version if cur else None,
                "serving": runtime.model.version if runtime.model else None}


@routes.page("/api/v1/admin/rollback")
class Rollback(View):
    @json_endpoint(_require_admin)
    async def post(self, request: Request) -> Any:
        body = await _body(request)
        version = body.get("version")
        if version is not None and not isinstance(version, int):
            raise ApiError(400, "bad_parameter", "version must be an integer")
        if runtime.models is None:
            raise ApiError(503, "not_ready", "worker not ready")
        try:
            pub = await asyncio.to_thread(runtime.models.rollback, version)
        except CheckpointError as exc:
            raise ApiError(409, "rollback_refused", str(exc)) from None
        await runtime.check_model(self.app)
        return {"current": pub.version}


@routes.page("/api/v1/admin/finetune")
class Finetune(View):
    @json_endpoint(_require_admin)
    async def post(self, request: Request) -> Any:
        if runtime.models is None:
            raise ApiError(503, "not_ready", "worker not ready")
        await asyncio.to_thread(_request_finetune)
        return {"requested": True}


def _request_finetune() -> None:
    from core.redis_conn import sync_redis
    from core.repos.trainer import TrainerStore

    client = sync_redis(runtime.settings.redis)
    try:
        TrainerStore(client, runtime.settings.redis.key_prefix).request_finetune()
    finally:
        client.close()


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "bad_json", "request body is not JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_json", "request body must be a JSON object")
    return body


def _recent(model: RatingModel, st: mstate.State) -> list[int]:
    """The user's recent movies, newest first."""
    movie, _, _, real = model.recent_events(st)
    return [int(x) for x in reversed(movie[0][real[0]].tolist())]


def _favourite_genres(model: RatingModel, st: mstate.State, top: int = 3) -> list[str]:
    """Genres of the movies the user rated above their own mean, within the window."""
    vocab = model.genre_names()
    movie, rating, _, real = model.recent_events(st)
    keep = real[0]
    if not vocab or not bool(keep.any()):
        return []
    _, mean = model.rating_stats(st)
    weight = (rating[0][keep] - float(mean[0])).clamp(min=0) + 1e-3
    g = model.movie_genres(movie[0][keep])
    totals = (g * weight.unsqueeze(1)).sum(0)
    order = torch.argsort(totals, descending=True)[:top]
    return [vocab[i] for i in order.tolist() if totals[i] > 0]
