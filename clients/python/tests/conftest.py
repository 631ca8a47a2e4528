from __future__ import annotations

from collections.abc import Iterator

import pytest

from procs import Edge, RedisServer


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    r = RedisServer()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def module_redis() -> Iterator[RedisServer]:
    r = RedisServer()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def edge(module_redis: RedisServer) -> Iterator[Edge]:
    e = Edge(module_redis.url)
    yield e
    e.stop()
