"""The example's backend, as the seeds' FastAPI apps have one.

It serves the React page (the client SDK's demo, built in ``clients/typescript/demo``),
mints the browser's token (``GET /token``), and starts jobs (``POST /jobs`` with a CSV
body): the job goes onto a Redis list that ``worker.py`` takes it from. It never talks
to the edge: the worker publishes progress straight into Redis with the ``fanout``
package, and the edge fans it out to the page.

Settings (environment):
    FANOUT_JWT_SECRET   the edge's HS256 secret
    FANOUT_REDIS_URL    the Redis the edge uses (also holds the job queue)
    FANOUT_WS_URL       the edge's WebSocket URL as the browser reaches it
    FANOUT_DEMO_DIST    the built page (default: clients/typescript/demo/dist)
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import jobs
import redis
from fanout import Publisher, tokens
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

ROOT = Path(__file__).resolve().parents[2]
SECRET = os.environ["FANOUT_JWT_SECRET"]
REDIS_URL = os.environ.get("FANOUT_REDIS_URL", "redis://127.0.0.1:6379")
WS_URL = os.environ.get("FANOUT_WS_URL", "ws://127.0.0.1:8080/ws")
DIST = Path(os.environ.get("FANOUT_DEMO_DIST", ROOT / "clients/typescript/demo/dist"))
MAX_CSV_BYTES = 1 << 20

app = FastAPI(title="fanout example: job progress")
queue = redis.Redis.from_url(REDIS_URL)
publisher = Publisher.from_url(REDIS_URL)


@app.get("/token", response_class=PlainTextResponse)
def token(user: str) -> str:
    """The browser's connection token: its own `user:` channel and job progress.

    Ten minutes: the SDK asks for a new one before it expires. A real app would
    authenticate the user first, and could hand out a subscription token per job
    instead of the `job_progress:*` claim.
    """
    return tokens.connection_token(SECRET, user=user, channels=["job_progress:*"], ttl=600)


@app.post("/jobs")
async def start_job(request: Request, user: str) -> JSONResponse:
    """Queues a job over the posted CSV (one step per row after the header)."""
    too_large = HTTPException(413, f"a CSV is at most {MAX_CSV_BYTES} bytes")
    if int(request.headers.get("content-length") or 0) > MAX_CSV_BYTES:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_CSV_BYTES:
            raise too_large
    job_id = secrets.token_hex(8)
    rows = jobs.rows_of(body.decode("utf-8", errors="replace"))
    jobs.enqueue(queue, {"id": job_id, "user": user, "rows": rows})
    return JSONResponse({"id": job_id, "rows": len(rows)})


@app.post("/notify", status_code=204)
def notify(user: str) -> Response:
    """A notification on the user's own channel, published from the backend."""
    publisher.user_event(user, "notice", {"text": "your export is ready"})
    return Response(status_code=204)


@app.get("/", response_class=HTMLResponse)
@app.get("/index.html", response_class=HTMLResponse)
def page() -> str:
    # The page connects to the edge's WebSocket endpoint.
    html = (DIST / "index.html").read_text()
    return html.replace(
        "<head>", f"<head><script>window.FANOUT_URL={json.dumps(WS_URL)}</script>", 1
    )


@app.get("/app.js")
def bundle() -> Response:
    return Response((DIST / "app.js").read_bytes(), media_type="text/javascript")
