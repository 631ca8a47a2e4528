"""Validation, encoding, URLs and tokens: no server needed."""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

import fanout
from fanout import _core, tokens
from fanout._url import parse_url

SECRET = "0123456789abcdef0123456789abcdef"


def test_url_forms() -> None:
    p = parse_url("redis://127.0.0.1:7000/2")
    assert (p.kind, p.where()) == ("single", "127.0.0.1:7000")
    c = parse_url("redis-cluster://u:p%40ss@a:7000, b:7001,c:7002")
    assert c.kind == "cluster" and c.hosts == [("a", 7000), ("b", 7001), ("c", 7002)]
    assert (c.username, c.password, c.tls) == ("u", "p@ss", False)
    assert parse_url("rediss-cluster://a:1").tls
    s = parse_url("redis-sentinel://s1:26380,s2/mymaster/3")
    assert (s.kind, s.service, s.db, s.hosts) == (
        "sentinel",
        "mymaster",
        3,
        [("s1", 26380), ("s2", 26379)],
    )
    q = parse_url("redis-sentinel://s1:26380?sentinelServiceName=m")
    assert q.service == "m"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "http://x:1",
            "`http://` is not one of redis://, rediss://, redis-cluster://, "
            "rediss-cluster://, redis-sentinel://, rediss-sentinel://",
        ),
        ("localhost:6379", "is not a URL: expected one of redis://"),
        ("redis-sentinel://s1:26379", "needs the service name"),
        ("redis-cluster://", "needs at least one host:port"),
        ("redis-cluster://a:1/3", "takes no path (Redis Cluster has one database)"),
        ("redis-cluster://a:x", "has a port that is not a number"),
    ],
)
def test_bad_urls_name_the_accepted_forms(url: str, message: str) -> None:
    with pytest.raises(fanout.InvalidURLError) as e:
        fanout.Publisher.from_url(url)
    assert message in str(e.value)
    assert isinstance(e.value, ValueError) and isinstance(e.value, fanout.FanoutError)
    with pytest.raises(fanout.InvalidURLError):
        fanout.AsyncPublisher.from_url(url)


@pytest.mark.parametrize(
    ("channel", "message"),
    [
        ("", "invalid channel: channel name is empty"),
        ("nocolon", "invalid channel 'nocolon': must be `namespace:rest`"),
        (":x", "must be `namespace:rest`"),
        ("user:", "must be `namespace:rest`"),
        ("user:{42}", "invalid channel 'user:{42}': character '{' is outside [A-Za-z0-9_.:@=+/|-]"),
        ("user:4 2", "character ' ' is outside"),
        ("user:*", "character '*' is outside"),
        ("user:" + "a" * 255, "invalid channel: channel name is longer than 255 bytes"),
    ],
)
def test_bad_channels_are_refused_before_anything_is_sent(channel: str, message: str) -> None:
    # Port 1: nothing listens; validation must fail first, at once.
    p = fanout.Publisher.from_url("redis://127.0.0.1:1")
    started = time.monotonic()
    with pytest.raises(fanout.InvalidChannelError) as e:
        p.publish(channel, {"a": 1})
    assert str(e.value) == message or message in str(e.value)
    assert time.monotonic() - started < 0.5


def test_bad_idempotency_keys() -> None:
    p = fanout.Publisher.from_url("redis://127.0.0.1:1")
    for key in ["", "a b", "x" * 129, "é", "tab\t"]:
        with pytest.raises(fanout.InvalidIdempotencyKeyError) as e:
            p.publish("user:1", 1, idempotency_key=key)
        assert "1 to 128 printable ASCII characters, no spaces" in str(e.value)
    assert fanout.valid_idempotency_key("x" * 128)
    k = fanout.new_idempotency_key()
    assert len(k) == 32 and int(k, 16) >= 0 and k != fanout.new_idempotency_key()


@pytest.mark.parametrize("data", [{1, 2}, object(), {"x": float("nan")}, b"bytes"])
def test_data_that_is_not_json_is_a_type_error(data: Any) -> None:
    p = fanout.Publisher.from_url("redis://127.0.0.1:1")
    with pytest.raises(fanout.DataNotSerializableError) as e:
        p.publish("user:1", data)
    assert isinstance(e.value, TypeError)
    assert str(e.value).startswith("data does not serialize to JSON: ")


def test_body_is_the_rust_envelope_body() -> None:
    body = _core.encode_body("progress", _core.encode_data({"pct": 40.0, "t": "é"}), 7)
    assert body == '{"fanout":1,"ts":7,"event":"progress","data":{"pct":40.0,"t":"é"}}'
    assert _core.encode_body(None, "null", 1) == '{"fanout":1,"ts":1,"data":null}'
    assert _core.encode_body("", "1", 1) == '{"fanout":1,"ts":1,"data":1}'


def test_job_helpers_data_shapes() -> None:
    assert _core.progress_data(40, "rows", {}) == {
        "status": "running",
        "pct": 40.0,
        "message": "rows",
    }
    assert json.dumps(_core.progress_data(40, None, {})) == '{"status": "running", "pct": 40.0}'
    assert _core.completion_data("cancelled", None) == {"status": "cancelled", "result": None}
    with pytest.raises(ValueError, match="job status must be one of"):
        _core.completion_data("done", None)


def test_finished_ttl_only_for_terminal_job_messages() -> None:
    s = _core.Settings(sharded=True)
    done = s.prepare("job_progress:1", {"status": "failed", "result": 1}, "completed", None)
    running = s.prepare("job_progress:1", {"status": "running"}, "progress", None)
    assert done.args[6] == 3600 and running.args[6] == 0
    assert done.args[2:4] == [100, 86400] and done.args[5] == "1"
    assert done.keys == [
        "fanout:{job_progress:1}:meta",
        "fanout:{job_progress:1}:history",
        "fanout:{job_progress:1}:dedup",
    ]
    other = s.prepare("user:1", {"status": "failed"}, None, "k1")
    assert other.args[2:4] == [100, 3600] and other.args[6] == 0
    assert other.args[7:] == ["k1", 300, 10000]


def test_transient_errors() -> None:
    import redis.exceptions as rx

    assert _core.is_transient(rx.ConnectionError("Error 111 connecting"))
    assert _core.is_transient(rx.TimeoutError())
    assert _core.is_transient(rx.ResponseError("TRYAGAIN Multiple keys request"))
    assert _core.is_transient(rx.ResponseError("LOADING Redis is loading"))
    assert _core.is_transient(rx.ResponseError("MASTERDOWN Link with MASTER is down"))
    assert _core.is_transient(rx.ResponseError("BUSY Redis is busy running a script"))
    assert _core.is_transient(rx.ReadOnlyError("READONLY You can't write"))
    assert not _core.is_transient(rx.ResponseError("ERR Error running script"))
    assert not _core.is_transient(rx.AuthenticationError("NOAUTH"))


def _raised_from(outer: BaseException, inner: BaseException) -> BaseException:
    """``outer`` raised while handling ``inner``, as redis-py wraps errors."""
    try:
        try:
            raise inner
        except BaseException:
            raise outer  # noqa: B904 - the implicit __context__ is the point
    except BaseException as e:
        return e


def test_permanent_errors_are_not_transient_even_when_wrapped() -> None:
    import errno
    import ssl

    import redis.exceptions as rx

    # Kept transient: connection refused/reset/lost, timeouts, cluster transitions.
    assert _core.is_transient(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
    assert _core.is_transient(ConnectionResetError(errno.ECONNRESET, "reset"))
    assert _core.is_transient(OSError(errno.EHOSTUNREACH, "No route to host"))
    assert _core.is_transient(TimeoutError())
    assert _core.is_transient(rx.ConnectionError("Connection lost"))
    assert _core.is_transient(rx.ConnectionError("Connection closed by server."))
    assert _core.is_transient(rx.ClusterDownError("The cluster is down"))
    assert _core.is_transient(rx.MovedError("3999 127.0.0.1:6381"))
    assert _core.is_transient(rx.AskError("3999 127.0.0.1:6381"))
    assert _core.is_transient(rx.TryAgainError())
    assert _core.is_transient(rx.BusyLoadingError("Redis is loading the dataset in memory"))
    assert _core.is_transient(rx.SlotNotCoveredError("slot 5 is not covered"))
    assert _core.is_transient(
        _raised_from(
            rx.RedisClusterException("Redis Cluster cannot be connected: Error 111"),
            rx.ConnectionError("Error 111 connecting to 127.0.0.1:7000. Connection refused."),
        )
    )
    assert _core.is_transient(
        _raised_from(rx.ConnectionError("Error 8 connecting"), ssl.SSLEOFError(8, "EOF"))
    )
    # A node answering CLUSTER SLOTS with LOADING: redis-py calls it "not enabled" too.
    loading = _raised_from(
        rx.RedisClusterException("Cluster mode is not enabled on this node"),
        rx.BusyLoadingError("Redis is loading the dataset in memory"),
    )
    assert _core.is_transient(
        _raised_from(rx.RedisClusterException("cannot be connected"), loading)
    )

    # Permanent, as redis-py reports them.
    not_cluster = _raised_from(
        rx.RedisClusterException(
            "Redis Cluster cannot be connected. Please provide at least one reachable node: "
            "Cluster mode is not enabled on this node"
        ),
        _raised_from(
            rx.RedisClusterException("Cluster mode is not enabled on this node"),
            rx.ResponseError("This instance has cluster support disabled"),
        ),
    )
    assert not _core.is_transient(not_cluster)
    assert "redis:// for a single server" in _core.describe_failure(not_cluster)
    bad_password = _raised_from(
        rx.RedisClusterException("Redis Cluster cannot be connected: invalid password"),
        rx.AuthenticationError("invalid username-password pair or user is disabled."),
    )
    assert not _core.is_transient(bad_password)
    assert "AuthenticationError" in _core.describe_failure(bad_password)
    assert not _core.is_transient(rx.AuthenticationError("Authentication required."))
    assert not _core.is_transient(rx.AuthorizationError("no permission"))
    assert not _core.is_transient(rx.NoPermissionError("this user has no permissions"))
    assert not _core.is_transient(rx.ResponseError("WRONGPASS invalid username-password pair"))
    assert not _core.is_transient(
        _raised_from(
            rx.ConnectionError("Error 1 connecting to 127.0.0.1:7000. certificate verify failed."),
            ssl.SSLCertVerificationError(1, "certificate verify failed"),
        )
    )
    assert not _core.is_transient(
        _raised_from(rx.ConnectionError("Error 1 connecting"), ssl.SSLError(1, "wrong version"))
    )
    missing_ca = _raised_from(
        rx.ConnectionError("Error 2 connecting to 127.0.0.1:7000. No such file or directory."),
        FileNotFoundError(errno.ENOENT, "No such file or directory"),
    )
    assert not _core.is_transient(missing_ca)
    assert not _core.is_transient(PermissionError(errno.EACCES, "Permission denied"))
    assert not _core.is_transient(rx.RedisClusterException("No way to dispatch this command"))
    assert not _core.is_transient(ValueError("bad option"))


def test_caller_options_override_the_url_single() -> None:
    import redis

    p = fanout.Publisher.from_url(
        "redis://u:from-url@127.0.0.1:1/3?socket_timeout=5", password="mine", ssl=True
    )
    pool = p.client().connection_pool
    kw = pool.connection_kwargs
    assert (kw["username"], kw["password"], kw["db"], kw["port"]) == ("u", "mine", 3, 1)
    assert kw["socket_timeout"] == 5.0  # the URL's, over the attempt timeout
    assert kw["socket_connect_timeout"] == 2.0  # the attempt timeout
    assert pool.connection_class is redis.SSLConnection  # ssl=True is applied, not ignored
    p.close()
    q = fanout.Publisher.from_url("rediss://127.0.0.1:1", ssl=False, socket_timeout=0.5)
    pool = q.client().connection_pool
    assert pool.connection_class is redis.Connection
    assert pool.connection_kwargs["socket_timeout"] == 0.5
    q.close()


async def test_caller_options_override_the_url_cluster() -> None:
    # The asyncio cluster client connects on first use only, so it can be inspected;
    # the sync one against a real cluster is in test_cluster.py.
    p = fanout.AsyncPublisher.from_url(
        "rediss-cluster://u:from-url@127.0.0.1:1,127.0.0.1:2",
        password="mine",
        ssl=False,
        socket_timeout=0.5,
    )
    kw = p.client().nodes_manager.connection_kwargs
    assert (kw["username"], kw["password"], kw["socket_timeout"]) == ("u", "mine", 0.5)
    assert kw["connection_class"].__name__ == "Connection"
    await p.close()


def test_caller_options_override_the_url_sentinel() -> None:
    p = fanout.Publisher.from_url(
        "rediss-sentinel://u:from-url@127.0.0.1:1/mymaster/2",
        password="mine",
        socket_timeout=0.5,
        ssl_cert_reqs="none",
    )
    client = p.client()
    kw = client.connection_pool.connection_kwargs
    assert (kw["username"], kw["password"], kw["db"], kw["socket_timeout"]) == (
        "u",
        "mine",
        2,
        0.5,
    )
    assert client.connection_pool.connection_class.__name__ == "SentinelManagedSSLConnection"
    # The sentinels: the URL's credentials, the same timeouts and TLS settings.
    sentinels = client.connection_pool.sentinel_manager.sentinels
    skw = sentinels[0].connection_pool.connection_kwargs
    assert (skw["username"], skw["password"], skw["socket_timeout"]) == ("u", "from-url", 0.5)
    assert skw["ssl_cert_reqs"] == "none"
    assert sentinels[0].connection_pool.connection_class.__name__ == "SSLConnection"
    p.close()
    # Without credentials in the URL the sentinels get none; sentinel_kwargs= wins.
    q = fanout.Publisher.from_url(
        "redis-sentinel://127.0.0.1:1/mymaster",
        password="mine",
        sentinel_kwargs={"password": "sentinel-pw"},
    )
    client = q.client()
    assert client.connection_pool.connection_kwargs["password"] == "mine"
    skw = client.connection_pool.sentinel_manager.sentinels[0].connection_pool.connection_kwargs
    assert skw["password"] == "sentinel-pw" and skw["socket_timeout"] == 2.0
    q.close()
    r = fanout.Publisher.from_url("redis-sentinel://127.0.0.1:1/mymaster", password="mine")
    skw = r.client().connection_pool.sentinel_manager.sentinels[0].connection_pool
    assert skw.connection_kwargs.get("password") is None
    r.close()


# ----- tokens -----


def test_hs256_tokens_have_the_edge_claims() -> None:
    t = tokens.connection_token(SECRET, user="42", channels=["job_progress:7"], ttl=3600)
    c = jwt.decode(t, SECRET, algorithms=["HS256"])
    assert c["sub"] == "42" and c["channels"] == ["job_progress:7"]
    assert abs(c["exp"] - (time.time() + 3600)) < 5
    assert "aud" not in c and "iss" not in c and "channel" not in c
    s = tokens.subscription_token(SECRET, user=42, channel="job_progress:7", ttl=600)
    c = jwt.decode(s, SECRET, algorithms=["HS256"])
    assert (c["sub"], c["channel"]) == ("42", "job_progress:7")
    assert abs(c["exp"] - (time.time() + 600)) < 5
    a = tokens.connection_token(SECRET, user="1", audience="fanout", issuer="me", kid="k")
    c = jwt.decode(a, SECRET, algorithms=["HS256"], audience="fanout", issuer="me")
    assert jwt.get_unverified_header(a)["kid"] == "k"
    assert "channels" not in jwt.decode(
        tokens.connection_token(SECRET, user="1"), SECRET, ["HS256"]
    )


def test_short_secrets_and_bad_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="the fanout edge requires at least 16") as e:
        tokens.connection_token("short", user="1")
    assert isinstance(e.value, fanout.TokenError)
    with pytest.raises(ValueError, match="RS256 needs a PEM private key"):
        tokens.connection_token(SECRET, user="1", algorithm="RS256")
    with pytest.raises(ValueError, match="is not one the edge verifies"):
        tokens.connection_token(SECRET, user="1", algorithm="HS512")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="extra claims may not set exp"):
        tokens.connection_token(SECRET, user="1", extra={"exp": 1})
    with pytest.raises(ValueError, match="user"):
        tokens.connection_token(SECRET, user="")


def keypair(algorithm: str) -> tuple[bytes, bytes]:
    key: Any
    if algorithm == "RS256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif algorithm == "ES256":
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


@pytest.mark.parametrize("algorithm", ["RS256", "ES256", "EdDSA"])
def test_asymmetric_tokens_verify_with_the_public_key(algorithm: Any) -> None:
    private, public = keypair(algorithm)
    t = tokens.connection_token(private, user="7", channels=["chat:*"], algorithm=algorithm)
    assert jwt.get_unverified_header(t)["alg"] == algorithm
    c = jwt.decode(t, public, algorithms=[algorithm])
    assert (c["sub"], c["channels"]) == ("7", ["chat:*"])
    s = tokens.subscription_token(
        private.decode(), user="7", channel="job_progress:9", algorithm=algorithm, audience="a"
    )
    c = jwt.decode(s, public, algorithms=[algorithm], audience="a")
    assert (c["sub"], c["channel"], c["aud"]) == ("7", "job_progress:9", "a")
