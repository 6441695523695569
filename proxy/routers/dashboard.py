"""GET /dashboard: the self-contained hit-rate page (it polls /v1/cache/stats itself)."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()


@router.get("/dashboard", include_in_schema=False)
async def dashboard() -> HTMLResponse:
    page = files("proxy").joinpath("static/dashboard.html").read_text(encoding="utf-8")
    return HTMLResponse(page, headers={"Cache-Control": "no-cache"})
