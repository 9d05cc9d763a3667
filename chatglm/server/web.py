"""The browser chat page: ``GET /`` for browsers, its static files, and Markdown rendering for the replies.

The page streams from the server's own ``POST /v1/chat/completions``, so it exercises the real API. Replies are
rendered here with markdown-it-py (raw HTML off, so model output cannot inject markup) and Pygments, which keeps the
page free of any script fetched or vendored from elsewhere: it works offline.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse
from markdown_it import MarkdownIt
from pydantic import BaseModel, Field
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound
from starlette.datastructures import Headers
from starlette.staticfiles import StaticFiles

from .chatglm_api import wants_html

STATIC = Path(__file__).with_name("static")
STATIC_PREFIX = "/web/static"
MAX_MARKDOWN_CHARS = 1_000_000  # far past any reply; keeps one request from tying up a worker

router = APIRouter(prefix="/web", tags=["web"])


class MarkdownRequest(BaseModel):
    text: str = Field(max_length=MAX_MARKDOWN_CHARS)


_CODE = HtmlFormatter(nowrap=True, noclasses=True)  # inline styles: the page needs no stylesheet per theme


def _highlight(code: str, lang: str, attrs: Any) -> str:
    """Pygments spans for a fenced block in a known language; '' lets markdown-it escape it as plain code."""
    try:
        lexer = get_lexer_by_name(lang)
    except ClassNotFound:
        return ""
    return highlight(code, lexer, _CODE)


_MARKDOWN = (MarkdownIt("commonmark", {"html": False, "linkify": False, "highlight": _highlight})
             .enable(["table", "strikethrough"]))


def render_markdown(text: str) -> str:
    """HTML for a reply: raw HTML in it is escaped and unsafe links (javascript:, data:) are left as text."""
    return _MARKDOWN.render(text)


@router.post("/markdown")
def markdown(body: MarkdownRequest) -> dict[str, str]:
    """{text} -> {html}; sync, so FastAPI renders in a worker thread, off the event loop."""
    return {"html": render_markdown(body.text)}


def page(request: Request) -> FileResponse:
    """The chat page itself (the hook chatglm_api's ``GET /`` calls when a browser asks)."""
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")


def is_public(scope: dict[str, Any]) -> bool:
    """The page and its static files hold no data, so they load without the API key; the API calls need it."""
    path = scope["path"]
    if path.startswith(STATIC_PREFIX + "/"):
        return True
    return path == "/" and scope["method"] == "GET" and wants_html(Headers(scope=scope))


def install(app: FastAPI) -> None:
    """Serve the page on ``GET /`` for browsers, its files under /web/static and the Markdown route."""
    app.state.web_page = page
    app.include_router(router)
    app.mount(STATIC_PREFIX, StaticFiles(directory=STATIC), name="web-static")
