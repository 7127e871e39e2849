"""The playground: a one-page UI at `/` where a person drops or pastes an image, asks about it and watches the
answer stream (through /v1/chat/completions, with the model's settings beside it).

The page is plain HTML and JavaScript shipped in the package (static/playground.html): no build step and
nothing loaded from a CDN, so it works on an offline machine. `vlmserve serve --no-playground` leaves it out
(then `/` is a 404 like any unknown URL). It is not part of the OpenAPI schema.

Does not know: the API it calls (its requests are the ones any client sends).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from starlette.responses import HTMLResponse

PAGE = Path(__file__).parent / "static" / "playground.html"

router = APIRouter()


@cache
def _page() -> str:
    return PAGE.read_text(encoding="utf-8")


@router.get("/", include_in_schema=False)
async def playground() -> HTMLResponse:
    # no-store: an upgraded server serves its own page, not a cached older one.
    return HTMLResponse(_page(), headers={"Cache-Control": "no-store"})
