"""The HTTP routes, added to the host's route table when the host loads the pack.

``POST /mochi/v1/generate`` (``?sync=true[&timeout=s]`` for the MP4 itself),
``GET /mochi/v1/jobs/{id}``, ``GET /mochi/v1/jobs/{id}/video``; the host also serves them under
``/api/...``. Every call needs the ``x-api-key`` header. Order of the checks: routes off (404),
key (401), body size (413), body (400), queue depth (429).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import folder_paths
from aiohttp import web

from . import request as body_rules
from .jobs import FAILED, QUEUED, RUNNING, SUCCEEDED, Job, Jobs, RejectedError, video_path
from .settings import Settings, SettingsError, load

log = logging.getLogger(__name__)

PREFIX = "/mochi/v1"
MAX_BODY = 64 * 1024
POLL_SECONDS = 0.2
TRUE = {"1", "true", "yes"}


def _error(code: int, message: str, **extra) -> web.Response:
    """A JSON error: ``{"error": message, ...extra}`` with the HTTP status ``code``."""
    return web.json_response({"error": message, **extra}, status=code)


def _settings_path() -> Path:
    return Path(folder_paths.get_system_user_directory("mochi_api")) / "settings.json"


class Api:
    """The handlers, sharing the host's server (queue, history) and the job registry."""

    def __init__(self, server) -> None:
        self.jobs = Jobs(server)

    def _authorise(self, request: web.Request) -> Settings | web.Response:
        """The settings, or the response that ends the call (404 off, 401, 500 bad settings)."""
        try:
            settings = load(_settings_path())
        except SettingsError as err:
            log.error("Mochi API settings: %s", err)
            return _error(500, "the server's Mochi API settings are invalid (see its log)")
        if settings is None:
            raise web.HTTPNotFound()
        if not settings.key_matches(request.headers.get("x-api-key")):
            return _error(401, "missing or wrong x-api-key header")
        return settings

    async def generate(self, request: web.Request) -> web.StreamResponse:
        settings = self._authorise(request)
        if isinstance(settings, web.Response):
            return settings
        if (request.content_length or 0) > MAX_BODY:
            return _error(413, f"the body is larger than {MAX_BODY} bytes")
        raw = await request.content.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            return _error(413, f"the body is larger than {MAX_BODY} bytes")
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
            errors = {"body": {"message": "the body is not valid JSON"}}
        else:
            parsed, errors = body_rules.parse(body)
        sync, timeout, query_errors = _sync_options(request, settings)
        errors = {**errors, **query_errors}
        if errors:
            return _error(400, "invalid request", fields=errors)
        depth = self.jobs.depth()
        if depth >= settings.max_queue:
            return web.json_response(
                {"error": f"the queue holds {depth} tasks (limit {settings.max_queue})"},
                status=429, headers={"Retry-After": "10"})
        try:
            job = await self.jobs.submit(parsed, settings)
        except RejectedError as err:
            log.error("Mochi API: the host refused the graph: %s", err)
            return _error(500, f"the server could not queue the run: {err}")
        log.info("Mochi API: job %s queued (%s)", job.id, job.describe())
        if sync:
            return await self._wait(job, timeout)
        return web.json_response(self._status(job), status=202)

    async def job(self, request: web.Request) -> web.Response:
        settings = self._authorise(request)
        if isinstance(settings, web.Response):
            return settings
        job = self._known(request)
        return web.json_response(self._status(job))

    async def video(self, request: web.Request) -> web.StreamResponse:
        settings = self._authorise(request)
        if isinstance(settings, web.Response):
            return settings
        return self._video(self._known(request))

    def _known(self, request: web.Request) -> Job:
        job = self.jobs.get(request.match_info["job_id"])
        if job is None:
            raise web.HTTPNotFound(text=json.dumps({"error": "unknown job"}),
                                   content_type="application/json")
        return job

    def _status(self, job: Job) -> dict:
        status, message, _ = self.jobs.state(job)
        url = f"{PREFIX}/jobs/{job.id}"
        out = {**job.describe(), "status": status, "status_url": url, "video_url": f"{url}/video"}
        if message:
            out["error"] = message
        return out

    def _video(self, job: Job) -> web.StreamResponse:
        """The MP4 (200), the run's failure (500), or 409 while it is not done."""
        status, message, outputs = self.jobs.state(job)
        if status == SUCCEEDED and (path := video_path(outputs)) is not None:
            headers = {"X-Job-Id": job.id, "X-Frames": str(job.request.frames),
                       "X-Fps": str(job.request.fps), "X-Seed": str(job.request.seed),
                       "Content-Type": "video/mp4"}
            return web.FileResponse(path, headers=headers)
        if status in (SUCCEEDED, FAILED):
            return _error(500, message or "the run wrote no video", id=job.id)
        return _error(409, f"the job is {status}", **self._status(job))

    async def _wait(self, job: Job, timeout: float) -> web.StreamResponse:
        """The synchronous mode: the MP4 once the run is done, or 504 at the deadline (the job
        goes on; its ``status_url`` stays valid)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, _, _ = self.jobs.state(job)
            if status not in (QUEUED, RUNNING):
                return self._video(job)
            await asyncio.sleep(POLL_SECONDS)
        return _error(504, f"the run did not finish within {timeout:g} s; it goes on",
                      **self._status(job))


def _sync_options(request: web.Request, settings: Settings) -> tuple[bool, float, dict]:
    """``?sync=true`` and its deadline ``timeout`` (seconds, at most the server's)."""
    sync = request.query.get("sync", "").lower() in TRUE
    raw = request.query.get("timeout")
    if raw is None:
        return sync, settings.sync_timeout, {}
    try:
        timeout = float(raw)
    except ValueError:
        timeout = -1.0
    if not 1 <= timeout <= settings.sync_timeout:
        allowed = {"type": "number", "min": 1, "max": settings.sync_timeout}
        return sync, 0.0, {"timeout": {"message": "timeout (query) must be seconds from 1 to "
                                                  f"{settings.sync_timeout:g}",
                                       "allowed": allowed, "got": raw}}
    return sync, timeout, {}


def register() -> bool:
    """Add the routes to the running host's route table (before its app starts)."""
    try:
        from server import PromptServer
    except ImportError:
        return False
    server = getattr(PromptServer, "instance", None)
    if server is None:
        log.info("Mochi API: no ComfyUI server in this process; routes not added")
        return False
    api = Api(server)
    server.routes.post(f"{PREFIX}/generate")(api.generate)
    server.routes.get(f"{PREFIX}/jobs/{{job_id}}")(api.job)
    server.routes.get(f"{PREFIX}/jobs/{{job_id}}/video")(api.video)
    log.info("Mochi API: routes under %s added (off until an API key is configured)", PREFIX)
    return True
