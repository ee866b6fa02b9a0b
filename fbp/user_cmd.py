"""``fbp user forget USER_ID...``: erase users from Redis.

What goes: each user's state hash (the state, its watermarks and, in
exactly-once mode, its last outputs) -- uncounted from its bucket -- and the
user's events in the trainer's buffer (recent window and reservoir).  Nothing
else in Redis is keyed by a user: the online movie side and published models
hold sums learned over everyone's events, the DLQ ledger holds DLQ positions.
What stays is in Kafka (ratings, predictions, DLQ topics), deleted by
retention or compaction (README, "Erasure").

Works on a single Redis and on a Redis Cluster alike (the repositories group
their keys by hash slot).  Logged with the ids (the record that the erasure
was done) and counted in Redis, which every worker exports as
``fbp_users_forgotten``.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Optional

import orjson
import typer

from core.settings import ConfigError, Settings, load_settings

app = typer.Typer(no_args_is_help=True, help="Per-user operations (erasure)")
log = logging.getLogger("fbp.user")


@app.callback()
def main() -> None:
    """Per-user operations (erasure)."""


def forget_users(settings: Settings, user_ids: list[int]) -> dict[str, int]:
    """Erase ``user_ids``; returns what was removed."""
    from core.redis_conn import async_redis, sync_redis
    from core.repos.buffer import EventBuffer
    from core.repos.erasure import ErasureLog
    from core.repos.states import StateStore

    async def states() -> int:
        client = async_redis(settings.redis)
        try:
            return await StateStore.from_settings(client, settings.redis).forget(user_ids)
        finally:
            await client.aclose()

    users = sorted(set(user_ids))
    removed = asyncio.run(states())
    client = sync_redis(settings.redis)
    try:
        recent, reservoir = EventBuffer.forget_in(client, settings.redis.key_prefix, users)
        total = ErasureLog(client, settings.redis.key_prefix).record(len(users))
    finally:
        client.close()
    out = {"users": len(users), "states_removed": removed, "buffer_recent_removed": recent,
           "buffer_reservoir_removed": reservoir, "forgotten_total": total}
    log.warning("forgot %d user(s) %s: %d state(s), %d recent and %d reservoir buffer event(s) removed",
                len(users), users, removed, recent, reservoir)
    return out


@app.command("forget")
def forget(
    user_ids: list[int] = typer.Argument(..., help="Users to erase."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the counts here as JSON."),
) -> None:
    """Delete every trace of USER_IDS from Redis: state, watermarks, trainer buffer events."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings()
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    out = forget_users(settings, user_ids)
    typer.echo(" ".join(f"{k}={v}" for k, v in out.items()))
    if json_path is not None:
        json_path.write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2))
