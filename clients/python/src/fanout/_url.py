"""fanout's Redis URLs (the forms of crates/fanout-publisher/src/url.rs):

- ``redis://[user:pass@]host:port[/db]`` and ``rediss://…``: one server;
- ``redis-cluster://[user:pass@]h1:p1,h2:p2,…`` (also ``rediss-cluster://``): Redis
  Cluster, any reachable node is enough to discover the rest;
- ``redis-sentinel://[user:pass@]s1:p1,s2:p2,…/<service>[/db]`` (also
  ``rediss-sentinel://``): the primary the sentinels name for ``<service>``;
  ``?sentinelServiceName=<service>`` may be given instead of the path segment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, unquote

from ._errors import InvalidURLError

ACCEPTED: str = (
    "redis://, rediss://, redis-cluster://, rediss-cluster://, redis-sentinel://, "
    "rediss-sentinel://"
)


@dataclass(frozen=True)
class ParsedURL:
    kind: Literal["single", "cluster", "sentinel"]
    url: str
    tls: bool = False
    hosts: list[tuple[str, int]] = field(default_factory=list)
    username: str | None = None
    password: str | None = None
    service: str | None = None
    db: int = 0

    def where(self) -> str:
        """host:port list for error messages."""
        if self.kind == "single":
            rest = self.url.split("://", 1)[1].rsplit("@", 1)[-1]
            return rest.split("/", 1)[0].split("?", 1)[0] or "localhost:6379"
        hosts = ",".join(f"{h}:{p}" for h, p in self.hosts)
        if self.kind == "sentinel":
            return f"{hosts} (sentinel service {self.service})"
        return hosts


def _host_port(text: str, default_port: int, url: str) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise InvalidURLError(f"`{url}`: `{text}` is not host:port")
    if not port_text:
        return host, default_port
    try:
        port = int(port_text)
    except ValueError:
        raise InvalidURLError(f"`{url}`: `{text}` has a port that is not a number") from None
    if not 0 < port < 65536:
        raise InvalidURLError(f"`{url}`: port {port} is out of range")
    return host, port


def parse_url(url: str) -> ParsedURL:
    if not isinstance(url, str):
        raise InvalidURLError(f"a Redis URL must be a str, not {type(url).__name__}")
    url = url.strip()
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise InvalidURLError(f"`{url}` is not a URL: expected one of {ACCEPTED}")
    if scheme in ("redis", "rediss"):
        if not rest:
            raise InvalidURLError(f"`{scheme}://` needs a host:port")
        return ParsedURL(kind="single", url=url, tls=scheme == "rediss")
    if scheme in ("redis-cluster", "rediss-cluster"):
        sentinel = False
    elif scheme in ("redis-sentinel", "rediss-sentinel"):
        sentinel = True
    else:
        raise InvalidURLError(f"`{scheme}://` is not one of {ACCEPTED}")
    rest, _, query = rest.partition("?")
    authority, _, path = rest.partition("/")
    userinfo, at, hosts_text = authority.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
    default_port = 26379 if sentinel else 6379
    hosts = [_host_port(h.strip(), default_port, url) for h in hosts_text.split(",") if h.strip()]
    if not hosts:
        raise InvalidURLError(f"`{scheme}://` needs at least one host:port")
    params = dict(parse_qsl(query, keep_blank_values=True))
    if not sentinel:
        if path:
            raise InvalidURLError(f"`{scheme}://` takes no path (Redis Cluster has one database)")
        unknown = sorted(params)
        if unknown:
            raise InvalidURLError(f"`{scheme}://` takes no query parameter ({', '.join(unknown)})")
        return ParsedURL(
            kind="cluster",
            url=url,
            tls=scheme.startswith("rediss"),
            hosts=hosts,
            username=username,
            password=password,
        )
    service = params.pop("sentinelServiceName", None)
    db = 0
    segments = [s for s in path.split("/") if s]
    if segments:
        first = segments[0]
        if first.isdigit():
            db = int(first)
        else:
            service = first
            if len(segments) > 1:
                if not segments[1].isdigit():
                    raise InvalidURLError(f"`{url}`: the database `{segments[1]}` is not a number")
                db = int(segments[1])
    if not service:
        raise InvalidURLError(
            f"`{scheme}://` needs the service name: {scheme}://host:port,host:port/<service>"
        )
    if params:
        raise InvalidURLError(
            f"`{scheme}://` takes no query parameter but sentinelServiceName "
            f"({', '.join(sorted(params))})"
        )
    return ParsedURL(
        kind="sentinel",
        url=url,
        tls=scheme.startswith("rediss"),
        hosts=hosts,
        username=username,
        password=password,
        service=service,
        db=db,
    )
