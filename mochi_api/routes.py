"""The HTTP routes, added to the host's route table when the host loads the pack.

``POST /mochi/v1/generate`` (``?sync=true[&timeout=s]`` for the MP4 itself),
``GET /mochi/v1/jobs/{id}``, ``GET /mochi/v1/jobs/{id}/video``, and the hosted Mochi API's own
route ``POST /v1/mochi-1`` (always synchronous: 200 and the MP4); the host also serves them under
``/api/...``. Both generate routes run one implementation; they differ in their query and in the
status codes of some outcomes (:class:`Codes`: the hosted route answers only the codes the hosted
API documents). Every call needs the ``x-api-key`` header, once. Order of the checks: routes off
(404), key (401; 403 for the read-only key on a generate route), media type (415: a
``Content-Type`` other than ``application/json``), body size (413, read to its end, chunked or
not), body and query (400, every problem named), queue depth (429).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import folder_paths
from aiohttp import web

from . import jobs as states
from . import query as query_rules
from . import request as body_rules
from .jobs import Job, Jobs, RejectedError, video_path
from .settings import FULL, Settings, SettingsError, load

log = logging.getLogger(__name__)

PREFIX = "/mochi/v1"
HOSTED_ROUTE = "/v1/mochi-1"
MAX_BODY = 64 * 1024
POLL_SECONDS = 0.2
JSON_TYPE = "application/json"
UTF8 = ("utf-8", "utf8")
#: A route's query rule: ``(query pairs, the server's sync_timeout) -> (options, errors)``.
QueryCheck = Callable[[Iterable[tuple[str, str]], float],
                      tuple[query_rules.SyncOptions, dict[str, dict]]]


@dataclass(frozen=True)
class Codes:
    """The status a generate route answers for each outcome the two routes name differently."""

    too_large: int = 413  # the body is over MAX_BODY
    media_type: int = 415  # a Content-Type other than JSON
    rejected: int = 500  # the host refused the graph (e.g. a configured model file is missing)
    cancelled: int = 410  # the run was interrupted or removed from the host's queue
    no_video: int = 500  # the host reports success but the run's video is missing


#: ``/mochi/v1/generate``.
OWN = Codes()
#: ``/v1/mochi-1``: the hosted API documents 400, 401, 403, 404, 429, 500, 502 and 504 only.
#: Unreadable bodies are bad parameters (400); 502 means the host, which runs the job behind
#: this route, gave no video for it without a failure of the run itself (refused the graph,
#: cancelled the run, or lost its output); 500 stays a failed run, with its message.
HOSTED = Codes(too_large=400, media_type=400, rejected=502, cancelled=502, no_video=502)


def _error(code: int, message: str, **extra) -> web.Response:
    """A JSON error: ``{"error": message, ...extra}`` with the HTTP status ``code`` (an
    ``error`` in ``extra``, such as a job status's, gives way to ``message``)."""
    extra.pop("error", None)
    return web.json_response({"error": message, **extra}, status=code)


def _invalid(fields: dict[str, dict]) -> web.Response:
    return _error(400, "invalid request", fields=fields)


def _settings_path() -> Path:
    return Path(folder_paths.get_system_user_directory("mochi_api")) / "settings.json"


def _routes_off() -> bool:
    """Whether no API key is configured (settings that cannot be read are not "off")."""
    try:
        return load(_settings_path()) is None
    except SettingsError:
        return False


def _header_text(value: str) -> str:
    """A header value as valid text for an answer (bytes that are not UTF-8 replaced)."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")[:100]


def _media_type_error(request: web.Request, code: int) -> web.Response | None:
    """415 for a body declared as something else than JSON in UTF-8. A request without any
    ``Content-Type`` (``requests.post(data=bytes)``, ``urllib``) is read as JSON."""
    values = request.headers.getall("Content-Type", [])
    if not values:
        return None
    if len(values) == 1 and request.content_type == JSON_TYPE and (
            request.charset or "utf-8").lower() in UTF8:
        return None
    got = ", ".join(_header_text(v) for v in values)
    field = {"message": "the body must be sent as Content-Type: application/json (UTF-8)",
             "allowed": {"values": [JSON_TYPE]}, "got": got}
    return _error(code, "unsupported media type", fields={"Content-Type": field})


class BodyError(ValueError):
    """The body could not be read: malformed chunks, or the client went away mid-body."""


async def _read_body(request: web.Request) -> bytes | None:
    """The whole body, read until its end (any number of packets or chunks, with or without a
    Content-Length), or None as soon as it is longer than ``MAX_BODY``."""
    if (request.content_length or 0) > MAX_BODY:
        return None
    data = bytearray()
    while len(data) <= MAX_BODY:
        try:
            piece = await request.content.read(MAX_BODY + 1 - len(data))
        except (web.RequestPayloadError, ConnectionError) as err:
            raise BodyError(f"the body could not be read to its end ({err})") from err
        if not piece:
            return bytes(data)
        data += piece
    return None


class Api:
    """The handlers, sharing the host's server (queue, history) and the job registry."""

    def __init__(self, server) -> None:
        self.jobs = Jobs(server)

    def _authorise(self, request: web.Request, generate: bool = False) -> Settings | web.Response:
        """The settings, or the response that ends the call (404 off, 401, 403 the read-only key
        on a ``generate`` route, 500 bad settings)."""
        try:
            settings = load(_settings_path())
        except SettingsError as err:
            log.error("Mochi API settings: %s", err)
            return _error(500, "the server's Mochi API settings are invalid (see its log)")
        if settings is None:
            raise web.HTTPNotFound()
        keys = request.headers.getall("x-api-key", [])
        role = settings.key_role(keys[0]) if len(keys) == 1 else None
        if role is None:
            return _error(401, "missing or wrong x-api-key header (send it once)")
        if generate and role != FULL:
            return _error(403, "this key may only read jobs (GET /mochi/v1/jobs/...); "
                               "generating needs the API key")
        return settings

    async def generate(self, request: web.Request) -> web.StreamResponse:
        """``POST /mochi/v1/generate``: 202 and the job, or its MP4 with ``?sync=true``."""
        return await self._generate(request, query_rules.check_generate, OWN)

    async def hosted(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/mochi-1``, the hosted API's route: 200 and the MP4, synchronously."""
        return await self._generate(request, query_rules.check_hosted, HOSTED)

    async def _generate(self, request: web.Request, check_query: QueryCheck,
                        codes: Codes) -> web.StreamResponse:
        """Both generate routes: key, media type, body, query, then the job (see ``_queue``)."""
        settings = self._authorise(request, generate=True)
        if isinstance(settings, web.Response):
            return settings
        if (refused := _media_type_error(request, codes.media_type)) is not None:
            return refused
        try:
            raw = await _read_body(request)
        except BodyError as err:  # the client, if still there, gets a 400
            return _invalid({"body": {"message": str(err)}})
        if raw is None:
            message = f"the body is larger than {MAX_BODY} bytes"
            return _error(codes.too_large, message, fields={"body": {
                "message": message, "allowed": {"max_bytes": MAX_BODY}}})
        body, errors = body_rules.decode(raw)
        parsed, errors = (None, errors) if errors else body_rules.parse(body)
        options, query_errors = check_query(request.query.items(), settings.sync_timeout)
        if errors := {**errors, **query_errors}:
            return _invalid(errors)
        return await self._queue(parsed, settings, options, codes)

    async def _queue(self, parsed: body_rules.GenerateRequest, settings: Settings,
                     options: query_rules.SyncOptions, codes: Codes) -> web.StreamResponse:
        """429 over the queue limit, else the job on the host's queue (202, or its MP4)."""
        depth = self.jobs.depth()
        if depth >= settings.max_queue:
            return web.json_response(
                {"error": f"the queue holds {depth} tasks (limit {settings.max_queue})"},
                status=429, headers={"Retry-After": "10"})
        try:
            job = await self.jobs.submit(parsed, settings)
        except RejectedError as err:
            log.error("Mochi API: the host refused the graph: %s", err)
            return _error(codes.rejected, f"the server could not queue the run: {err}")
        log.info("Mochi API: job %s queued (%s)", job.id, job.describe())
        if options.sync:
            return await self._wait(job, options.timeout, codes)
        return web.json_response(self._status(job), status=202)

    async def unknown(self, request: web.Request) -> web.Response:
        """Any other path under ``/v1/mochi``: 404 naming the routes, as the hosted API answers
        (the host would answer a POST with 405, its static files taking every path), and 405
        for the hosted route with a method other than POST."""
        if _routes_off():
            raise web.HTTPNotFound()
        if request.path.endswith(HOSTED_ROUTE):
            raise web.HTTPMethodNotAllowed(request.method, ["POST"])
        return _error(404, "unknown route", routes=[f"POST {HOSTED_ROUTE}",
                                                    f"POST {PREFIX}/generate"])

    async def job(self, request: web.Request) -> web.Response:
        settings = self._authorise(request)
        if isinstance(settings, web.Response):
            return settings
        if errors := query_rules.check_none(request.query.items()):
            return _invalid(errors)
        return web.json_response(self._status(self._known(request)))

    async def video(self, request: web.Request) -> web.StreamResponse:
        settings = self._authorise(request)
        if isinstance(settings, web.Response):
            return settings
        if errors := query_rules.check_none(request.query.items()):
            return _invalid(errors)
        return self._video(self._known(request), OWN)

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

    def _video(self, job: Job, codes: Codes) -> web.StreamResponse:
        """The MP4 (200), the run's failure (500), 410 once cancelled, 409 while not done
        (the hosted route: 502 for a cancelled run or a missing video)."""
        status, message, outputs = self.jobs.state(job)
        if status == states.SUCCEEDED and (path := video_path(outputs)) is not None:
            headers = {"X-Job-Id": job.id, "X-Frames": str(job.request.frames),
                       "X-Fps": str(job.request.fps), "X-Seed": str(job.request.seed),
                       "Content-Type": "video/mp4"}
            return web.FileResponse(path, headers=headers)
        if status == states.SUCCEEDED:
            return _error(codes.no_video, "the run wrote no video", id=job.id)
        if status == states.FAILED:
            return _error(500, message or "the run failed", id=job.id)
        if status == states.CANCELLED:  # gone for good (410), unlike a job not done yet (409)
            return _error(codes.cancelled, f"the job was cancelled: {message}",
                          **self._status(job))
        return _error(409, f"the job is {status}", **self._status(job))

    async def _wait(self, job: Job, timeout: float, codes: Codes) -> web.StreamResponse:
        """The synchronous mode: the MP4 once the run is done, or 504 at the deadline (the job
        goes on; its ``status_url`` stays valid)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, _, _ = self.jobs.state(job)
            if status not in (states.QUEUED, states.RUNNING):
                return self._video(job, codes)
            await asyncio.sleep(POLL_SECONDS)
        return _error(504, f"the run did not finish within {timeout:g} s; it goes on",
                      **self._status(job))


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
    server.routes.post(HOSTED_ROUTE)(api.hosted)
    server.routes.route("*", "/v1/mochi{tail:.*}")(api.unknown)  # after the route it shadows
    log.info("Mochi API: routes under %s and %s added (off until an API key is configured)",
             PREFIX, HOSTED_ROUTE)
    return True
