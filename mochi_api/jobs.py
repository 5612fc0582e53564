"""API jobs on the host's own prompt queue: the bundled text-to-video graph with a request's
values, its state from the host's queue and history, and the MP4 it wrote."""

from __future__ import annotations

import copy
import json
import os
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import execution
import folder_paths

from .request import GenerateRequest
from .settings import Settings
from .workflow import ui_to_api

WORKFLOW = Path(__file__).resolve().parents[1] / "workflows" / "mochi1_text_to_video.json"
MAX_JOBS = 1000  # the API remembers this many jobs (the host keeps 10,000 history entries)
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "queued", "running", "succeeded", "failed", "cancelled")


class RejectedError(RuntimeError):
    """The host refused the graph (e.g. a configured model file is missing)."""


@dataclass(frozen=True)
class Job:
    id: str
    request: GenerateRequest
    width: int
    height: int

    def describe(self) -> dict:
        r = self.request
        return {"id": self.id, "frames": r.frames, "requested_frames": r.requested_frames,
                "fps": r.fps, "width": self.width, "height": self.height, "steps": r.steps,
                "guidance_scale": r.guidance_scale, "seed": r.seed}


@lru_cache(maxsize=1)
def _base_prompt() -> dict:
    """The bundled workflow as an API prompt, converted with our own nodes' definitions."""
    from ..nodes import NODES

    infos = {cls.GET_SCHEMA().node_id: cls.GET_NODE_INFO_V1() for cls in NODES}
    return ui_to_api(json.loads(WORKFLOW.read_text(encoding="utf-8")), infos)


def build_prompt(job: Job, settings: Settings) -> dict:
    """The text-to-video graph with the request's values, the server's size and model files."""
    r = job.request
    values = {
        "Mochi1DiTLoader": {"dit_name": settings.dit},
        "Mochi1VAELoader": {"vae_name": settings.vae},
        "Mochi1TextEncoderLoader": {"t5_name": settings.t5},
        "Mochi1TextEncode": {"positive": r.prompt, "negative": r.negative_prompt},
        "Mochi1Sampler": {"width": job.width, "height": job.height, "frames": r.frames,
                          "steps": r.steps, "cfg": r.guidance_scale, "seed": r.seed},
        "Mochi1SaveVideo": {"fps": float(r.fps), "format": "mp4 (H.264)",
                            "filename_prefix": f"mochi_api/{job.id}"},
    }
    prompt = copy.deepcopy(_base_prompt())
    for node in prompt.values():
        changes = values.pop(node["class_type"], {})
        node["inputs"].update({k: v for k, v in changes.items() if v is not None})
    if values:
        raise RuntimeError(f"the bundled workflow lacks the nodes {sorted(values)}")
    return prompt


class Jobs:
    """The jobs made through the API (others' prompts are not visible through it)."""

    def __init__(self, server) -> None:
        self.server = server
        self.jobs: OrderedDict[str, Job] = OrderedDict()

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def depth(self) -> int:
        """Tasks in the host's queue, running or pending, from any client."""
        return self.server.prompt_queue.get_tasks_remaining()

    async def submit(self, request: GenerateRequest, settings: Settings) -> Job:
        """Validate the graph as ``POST /prompt`` does and put it on the host's queue."""
        job = Job(uuid.uuid4().hex, request, settings.width, settings.height)
        prompt = build_prompt(job, settings)
        prompt = self.server.trigger_on_prompt({"prompt": prompt})["prompt"]
        valid, error, outputs, node_errors = await execution.validate_prompt(job.id, prompt, None)
        if not valid:
            messages = [e.get("details") or e["message"]
                        for n in node_errors.values() for e in n["errors"]]
            fallback = (error or {}).get("message", "invalid graph")
            raise RejectedError("; ".join(messages) or fallback)
        number = self.server.number
        self.server.number += 1
        extra = {"client_id": "mochi_api", "create_time": int(time.time() * 1000)}
        self.server.prompt_queue.put((number, job.id, prompt, extra, outputs, {}))
        self.jobs[job.id] = job
        while len(self.jobs) > MAX_JOBS:
            self.jobs.popitem(last=False)
        return job

    def state(self, job: Job) -> tuple[str, str | None, dict]:
        """``(status, error message, history outputs)`` of a job.

        The queue is read before the history: the host moves a prompt from running to the
        history under one lock, so a job missing from both, read in this order, really left
        them (read the other way round, a job finishing in between would look removed).
        """
        queue = self.server.prompt_queue
        running, pending = queue.get_current_queue_volatile()
        if any(item[1] == job.id for item in running):
            return RUNNING, None, {}
        if any(item[1] == job.id for item in pending):
            return QUEUED, None, {}
        entry = queue.get_history(prompt_id=job.id).get(job.id)
        if entry is None:
            return CANCELLED, "the job was removed from the host's queue or history", {}
        return _finished(entry)


def _finished(entry: dict) -> tuple[str, str | None, dict]:
    """The state of a job in the host's history: succeeded, cancelled (interrupted) or failed."""
    status = entry.get("status") or {}
    if status.get("status_str") == "success":
        return SUCCEEDED, None, entry.get("outputs", {})
    messages = status.get("messages", [])
    if any(kind == "execution_interrupted" for kind, _ in messages):
        return CANCELLED, "the run was interrupted", {}
    return FAILED, _failure(messages), {}


def _failure(messages: list) -> str:
    """The host's message for a failed run: the exception."""
    for kind, data in messages:
        if kind == "execution_error":
            return (f"{data.get('node_type')}: {data.get('exception_type')}: "
                    f"{data.get('exception_message', '').strip()}")
    return "the run failed"


def video_path(outputs: dict) -> Path | None:
    """The MP4 our save node wrote, inside the host's output folder."""
    root = os.path.realpath(folder_paths.get_output_directory())
    for ui in outputs.values():
        for video in ui.get("mochi_video", []):
            path = os.path.realpath(os.path.join(root, video["subfolder"], video["filename"]))
            if os.path.commonpath([root, path]) == root and os.path.isfile(path):
                return Path(path)
    return None
