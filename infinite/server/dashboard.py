"""GET /status (JSON) and GET /dashboard (the live cluster page that polls it).

The status is read straight from the engine on every call, so the page shows
the cluster as it is now: each instance's pool (local / lent / free blocks,
and what its requests borrowed elsewhere), batch size, step time, and the
debt ledger (debtor -> creditor, blocks) that the page draws as arrows.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from infinite.server.state import ServerState, app_state

STATIC_DIR = Path(__file__).parent / "static"


def status_snapshot(st: ServerState) -> dict[str, Any]:
    """What the dashboard draws; also what tests poll to see that no block leaked."""
    engine = st.engine
    snap: dict[str, Any] = {
        "model": st.model_name,
        "ready": engine is not None and not st.stopping,
        "time": time.time(),
        "in_flight": st.in_flight,
        "instances": [],
        "debts": [],
    }
    if engine is not None:
        view = engine.cluster_status()
        snap["instances"] = list(view.get("instances", []))
        snap["debts"] = list(view.get("debts", []))
        snap["health"] = engine.health()
        for key in ("recovery", "cost_model", "placement"):  # a cluster's: recomputations, its gManager
            if key in view:
                snap[key] = view[key]
        snap["max_model_len"] = engine.max_model_len
        snap["capacity_tokens"] = engine.capacity_tokens
    return snap


async def handle_status(request: web.Request) -> web.Response:
    snap = status_snapshot(app_state(request.app))
    return web.Response(body=msgspec.json.encode(snap), content_type="application/json")


async def handle_dashboard(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "dashboard.html", headers={"Cache-Control": "no-cache"})
