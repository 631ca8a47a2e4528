"""What the Python publisher sends, read by a real fanout edge; tokens the edge accepts."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import jwt
import pytest
import websockets

from fanout import AsyncPublisher, Publisher, tokens
from procs import JWT_SECRET, Edge, RedisServer, WsClient
from test_unit import keypair


async def test_the_edge_delivers_what_python_publishes(
    edge: Edge, module_redis: RedisServer
) -> None:
    token = tokens.connection_token(JWT_SECRET, user="42", channels=["job_progress:71"])
    c = await WsClient.connect(edge, token)
    sub = await c.subscribe("user:42")
    assert sub["type"] == "subscribed", sub
    sub_job = await c.subscribe("job_progress:71")
    assert sub_job["type"] == "subscribed" and sub_job["offset"] == 0, sub_job
    with Publisher.from_url(module_redis.url) as p:
        sent = [
            p.publish("user:42", {"text": "hi", "n": n, "nested": [1, None, "é"]}, event="notice")
            for n in range(5)
        ]
        job = [p.job_progress(71, pct=50, message="half"), p.job_completed(71, result={"ok": 1})]
    got = await c.messages("user:42", 5)
    assert [(m["offset"], m["epoch"], m["event"], m["data"]) for m in got] == [
        (s.offset, s.epoch, "notice", {"text": "hi", "n": n, "nested": [1, None, "é"]})
        for n, s in enumerate(sent)
    ]
    assert all(abs(m["ts"] - time.time() * 1000) < 60_000 for m in got)
    got_job = await c.messages("job_progress:71", 2)
    assert [(m["offset"], m["epoch"], m["event"], m["data"]) for m in got_job] == [
        (
            job[0].offset,
            sub_job["epoch"],
            "progress",
            {"status": "running", "pct": 50.0, "message": "half"},
        ),
        (
            job[1].offset,
            sub_job["epoch"],
            "completed",
            {"status": "succeeded", "result": {"ok": 1}},
        ),
    ]
    end = await c.recv()
    assert end == {"type": "unsubscribed", "channel": "job_progress:71", "reason": "completed"}
    await c.close()


async def test_since_recovers_exactly_what_the_worker_published(
    edge: Edge, module_redis: RedisServer
) -> None:
    token = tokens.connection_token(JWT_SECRET, user="43")
    p = AsyncPublisher.from_url(module_redis.url)
    c = await WsClient.connect(edge, token)
    assert (await c.subscribe("user:43"))["type"] == "subscribed"
    for n in range(3):
        await p.publish("user:43", {"n": n})
    seen = await c.messages("user:43", 3)
    last = seen[-1]
    await c.close()
    # Away: the worker goes on.
    for n in range(3, 10):
        await p.publish("user:43", {"n": n}, event="later")
    c = await WsClient.connect(edge, token)
    sub = await c.subscribe("user:43", since={"offset": last["offset"], "epoch": last["epoch"]})
    assert (sub["type"], sub.get("recovered")) == ("subscribed", True), sub
    await p.publish("user:43", {"n": 10})
    got = await c.messages("user:43", 8)
    assert [m["data"]["n"] for m in got] == list(range(3, 11))
    assert [m["offset"] for m in got] == list(range(4, 12))
    assert {m["epoch"] for m in got} == {last["epoch"]}
    await c.close()
    await p.close()


async def test_subscription_tokens_are_accepted(edge: Edge, module_redis: RedisServer) -> None:
    c = await WsClient.connect(edge, tokens.connection_token(JWT_SECRET, user="44"))
    refused = await c.subscribe("job_progress:72")
    assert (refused["type"], refused["code"]) == ("error", "forbidden"), refused
    sub = await c.subscribe(
        "job_progress:72",
        token=tokens.subscription_token(JWT_SECRET, user="44", channel="job_progress:72"),
    )
    assert sub["type"] == "subscribed", sub
    other = await c.subscribe(
        "job_progress:73",
        token=tokens.subscription_token(JWT_SECRET, user="44", channel="job_progress:72"),
    )
    assert other["type"] == "error", other
    with Publisher.from_url(module_redis.url) as p:
        pos = p.job_progress(72, pct=1)
    (m,) = await c.messages("job_progress:72", 1)
    assert (m["offset"], m["data"]["pct"]) == (pos.offset, 1.0)
    await c.close()
    # A subscription token cannot open a connection.
    with pytest.raises(websockets.ConnectionClosed) as e:
        await WsClient.connect(
            edge, tokens.subscription_token(JWT_SECRET, user="44", channel="job_progress:72")
        )
    assert e.value.rcvd is not None and e.value.rcvd.code == 4001


async def test_an_expired_token_is_closed_with_4004(edge: Edge) -> None:
    real = time.time()
    with mock.patch("fanout.tokens.time.time", return_value=real - 7200):
        old = tokens.connection_token(JWT_SECRET, user="45", ttl=3600)
    assert jwt.decode(old, options={"verify_signature": False})["exp"] < real - 3000
    with pytest.raises(websockets.ConnectionClosed) as e:
        await WsClient.connect(edge, old)
    assert e.value.rcvd is not None and e.value.rcvd.code == 4004
    # A token signed with another secret: 4001.
    with pytest.raises(websockets.ConnectionClosed) as e:
        await WsClient.connect(edge, tokens.connection_token("x" * 32, user="45"))
    assert e.value.rcvd is not None and e.value.rcvd.code == 4001


@pytest.fixture(scope="module")
def jwks_edge(module_redis: RedisServer) -> Iterator[tuple[Edge, dict[str, bytes]]]:
    """An edge verifying RS256, ES256 and EdDSA keys from a JWKS (by kid), with a
    required audience and issuer."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key
    from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

    privates: dict[str, bytes] = {}
    keys: list[dict[str, Any]] = []
    for alg, impl in (("RS256", RSAAlgorithm), ("ES256", ECAlgorithm), ("EdDSA", OKPAlgorithm)):
        private, public = keypair(alg)
        privates[alg] = private
        jwk: dict[str, Any] = json.loads(impl.to_jwk(load_pem_public_key(public)))  # type: ignore[attr-defined]
        jwk.update(kid=f"k-{alg}", alg=alg)
        keys.append(jwk)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "jwks.json"
        path.write_text(json.dumps({"keys": keys}))
        e = Edge(
            module_redis.url,
            "--jwt-jwks",
            str(path),
            "--jwt-audience",
            "fanout-tests",
            "--jwt-issuer",
            "https://py.example",
            secret=None,
        )
        yield e, privates
        e.stop()


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
async def test_asymmetric_tokens_are_accepted_by_the_edge(
    jwks_edge: tuple[Edge, dict[str, bytes]], module_redis: RedisServer, alg: Any
) -> None:
    edge, privates = jwks_edge
    opts: dict[str, Any] = dict(
        algorithm=alg, kid=f"k-{alg}", audience="fanout-tests", issuer="https://py.example"
    )
    c = await WsClient.connect(edge, tokens.connection_token(privates[alg], user="46", **opts))
    ch = f"job_progress:{alg}"
    sub = await c.subscribe(
        ch, token=tokens.subscription_token(privates[alg], user="46", channel=ch, **opts)
    )
    assert sub["type"] == "subscribed", sub
    with Publisher.from_url(module_redis.url) as p:
        p.job_progress(alg, pct=3)
    (m,) = await c.messages(ch, 1)
    assert m["data"] == {"status": "running", "pct": 3.0}
    await c.close()
    # Without the configured audience: refused (4001).
    opts.pop("audience")
    with pytest.raises(websockets.ConnectionClosed) as e:
        await WsClient.connect(edge, tokens.connection_token(privates[alg], user="46", **opts))
    assert e.value.rcvd is not None and e.value.rcvd.code == 4001


async def test_a_pem_public_key_edge_accepts_es256(module_redis: RedisServer) -> None:
    private, public = keypair("ES256")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "pub.pem"
        path.write_bytes(public)
        edge = await asyncio.to_thread(
            Edge, module_redis.url, "--jwt-public-key", str(path), secret=None
        )
        try:
            c = await WsClient.connect(
                edge, tokens.connection_token(private, user="47", algorithm="ES256")
            )
            assert (await c.subscribe("user:47"))["type"] == "subscribed"
            await c.close()
        finally:
            edge.stop()
