"""The query API never answers a malformed request with a 5xx.

A real worker (own namespace, admin token set, some users known) gets
hypothesis-generated requests: odd user ids and query strings (non-numbers,
huge numbers, negative, unicode, empty, repeated), every method on every
route, random bodies and Authorization headers on the admin endpoints, and
unknown paths.  Every answer must be < 500 -- and JSON with an ``error``
field whenever it is a 4xx from our own views.
"""

from __future__ import annotations

import urllib.parse
from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.integration

PORT = 6177
ADMIN = "fuzz-admin-token"

_weird = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.text(max_size=30),
    st.sampled_from(["", " ", "0", "-0", "1e3", "0x10", "1.5", "NaN", "inf", "-inf", "9" * 400, "١٢", "1_000",
                     "%00", "..", "../..", "1;DROP", "{}", "[]", "null", "true"]),
)
_segment = _weird.map(lambda s: urllib.parse.quote(s, safe="") or "%20")
_movies = st.lists(_weird, max_size=8).map(",".join) | st.sampled_from(
    [",".join(["1"] * 1001), ",,,", "1,,2", "1," * 5000, "-1", str(2**31), str(2**31 - 1)])
_method = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
_printable = st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=40)  # what a header can carry
_auth = st.one_of(st.none(), st.just(f"Bearer {ADMIN}"), _printable.map(lambda t: "Bearer " + t),
                  st.sampled_from(["Bearer", "Basic abc", "bearer " + ADMIN, ADMIN, "Bearer  " + ADMIN]))
_body = st.one_of(
    st.none(), st.binary(max_size=300),
    st.sampled_from([b"{}", b"[]", b"null", b'{"version": null}', b'{"version": "1"}', b'{"version": 1.5}',
                     b'{"version": -1}', b'{"version": 99999999999999999999}', b'{"version": true}',
                     b'{"version": 1}', b"{", b"\xff\xfe"]),
    st.dictionaries(st.text(max_size=8), st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8) | st.none(), max_size=3)
    .map(lambda d: __import__("orjson").dumps(d)),
)


@st.composite
def requests(draw, users: list[int]):
    known = st.sampled_from([str(u) for u in users])
    uid = draw(known | _segment)
    kind = draw(st.sampled_from(["scores", "top", "profile", "model", "admin", "other", "static"]))
    params: dict[str, str] = {}
    if kind == "scores":
        path = f"/api/v1/users/{uid}/scores"
        if draw(st.booleans()):
            params["movies"] = draw(_movies)
    elif kind == "top":
        path = f"/api/v1/users/{uid}/top"
        if draw(st.booleans()):
            params["k"] = draw(_weird)
    elif kind == "profile":
        path = f"/api/v1/users/{uid}/profile"
    elif kind == "model":
        path = "/api/v1/model"
    elif kind == "admin":
        path = "/api/v1/admin/" + draw(st.sampled_from(["reload", "rollback", "finetune"]) | _segment)
    elif kind == "static":
        path = draw(st.sampled_from(["/health", "/metrics", "/live", "/api/v1/live"]))
    else:
        path = "/" + "/".join(draw(st.lists(_segment, min_size=1, max_size=4)))
    if draw(st.booleans()):
        params[draw(st.text(min_size=1, max_size=6))] = draw(_weird)
    method = draw(st.sampled_from(["POST"]) if kind == "admin" and draw(st.booleans()) else _method)
    return method, path, params, draw(_auth), draw(_body)


@pytest.mark.timeout(600)
def test_malformed_requests_never_5xx(stack, ckpt, tmp_path):
    from stack import procs
    from stack.procs import Namespace
    from stream.replay import replay
    from tests.streamkit import read_topic
    from core.datasets import load_dataset

    ns = Namespace.fresh(2, stack)
    ns.create()
    env = ns.env(256, PORT)
    env.update({"FBP_WORKER__CHECKPOINT": str(ckpt), "FBP_WORKER__ADMIN_TOKEN": ADMIN})
    worker = procs.start_worker(PORT, tmp_path, env)
    statuses: Counter[int] = Counter()
    bad: list[tuple] = []
    try:
        df = load_dataset("ml-100k").ratings.iloc[:500]
        replay(ns.scoped(), df, progress=False)
        read_topic(stack, ns.predictions, until=len(df), timeout=120)
        users = sorted(int(u) for u in df["user_id"].unique())[:20]
        client = httpx.Client(base_url=worker.url, timeout=30)

        @settings(max_examples=1500, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(requests(users))
        def check(req) -> None:
            method, path, params, auth, body = req
            headers = {"Authorization": auth} if auth is not None else {}
            try:
                r = client.request(method, path, params=params, headers=headers, content=body)
            except (httpx.InvalidURL, httpx.LocalProtocolError):
                return  # the client refuses to send it (e.g. a trailing space in a header)
            statuses[r.status_code] += 1
            if r.status_code >= 500:
                bad.append((method, path, params, auth, body[:80] if body else body, r.status_code, r.text[:200]))
            assert r.status_code < 500, bad[-1]
            ours = len(str(r.request.url)) < 8000  # longer request lines are refused by aiohttp itself
            if ours and r.status_code in (400, 401, 403, 409) and method in ("GET", "POST") and path.startswith("/api/v1/"):
                assert "error" in r.json(), (path, r.status_code, r.text[:200])

        check()
        assert worker.alive(), worker.tail()
        assert httpx.get(worker.url + "/health").status_code == 200
    finally:
        worker.stop()
        ns.drop()
    print(f"\napi fuzz: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}, 5xx {len(bad)}")
    assert not bad
