"""The admin API: see and change the running fleet (behind --api-key; refused when the server has none).

    GET  /admin/workers                                   every worker: role, where it runs, draining or not
    POST /admin/workers {"action": "add", "role": "decode"}           one more worker of a role, once it is ready
    POST /admin/workers {"action": "remove", "worker_id": "decode-1"} drain it (nothing new is routed to it, what
                                                                      it holds finishes), then stop it
"""

from __future__ import annotations

from typing import Literal

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

ROLE_NAMES = {"prefill": "prefill", "decode": "decode", "aggregated": "both", "both": "both"}


class WorkersChange(msgspec.Struct, forbid_unknown_fields=True):
    action: Literal["add", "remove"]
    role: str | None = None  # add: prefill, decode or aggregated
    worker_id: str | None = None  # remove
    timeout: float = 600.0  # seconds to wait for the new worker to be ready, or for the drain


def add_admin_routes(app: FastAPI, launcher, api_key: str | None, error) -> None:
    """``error(status, message, type, param=None)`` builds the API's exception (the OpenAI error format)."""

    def check() -> None:
        if api_key is None:
            raise error(403, "the admin API is off: start the server with --api-key to use it", "permission_error")
        if launcher is None:
            raise error(503, "this server was started without a launcher", "server_error")

    def listing() -> dict:
        router = launcher.router
        workers = {}
        for wid, spec in launcher.specs.items():
            h = router.workers.get(wid)
            workers[wid] = {"role": spec.role, "where": launcher.where(wid), "node": launcher.node_of(wid),
                            "draining": wid in launcher.draining,
                            "ready": h is not None and not h.dead, "pid": None if h is None else h.ready.pid}
        return {"workers": workers, "counts": launcher.counts()}

    @app.get("/admin/workers")
    async def get_workers() -> JSONResponse:
        check()
        return JSONResponse(listing())

    @app.post("/admin/workers")
    async def change_workers(request: Request) -> JSONResponse:
        check()
        try:
            change = msgspec.json.decode(await request.body(), type=WorkersChange)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise error(400, f"body: {e}", "invalid_request_error") from None
        if change.timeout <= 0:
            raise error(400, "timeout must be positive", "invalid_request_error", "timeout")
        if change.action == "add":
            role = ROLE_NAMES.get(change.role or "")
            if role is None:
                raise error(400, "role must be prefill, decode or aggregated", "invalid_request_error", "role")
            try:
                wid = await launcher.add(role, timeout=change.timeout)
            except RuntimeError as e:
                raise error(500, f"the new worker did not start: {e}", "server_error") from None
            return JSONResponse({"added": wid, **listing()})
        if not change.worker_id:
            raise error(400, "remove needs worker_id", "invalid_request_error", "worker_id")
        if change.worker_id not in launcher.specs or change.worker_id in launcher.draining:
            raise error(404, f"no worker {change.worker_id!r} to remove", "invalid_request_error", "worker_id")
        try:
            await launcher.drain(change.worker_id, timeout=change.timeout)
        except ValueError as e:
            raise error(409, str(e), "invalid_request_error", "worker_id") from None
        return JSONResponse({"removed": change.worker_id, **listing()})
