"""Batching for the server: requests wait in a queue, are grouped into batches and run, one batch
at a time, in one worker thread (off the event loop); a generation batch is one left-padded
`generate` in which each row stops on its own terms and streams its own text.

Usage: batcher = Batcher(max_batch_size=16, wait_s=0.005); asyncio.create_task(batcher.run())
       await batcher.queue.put(job); result = await job.outcome()
"""
from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ftnb.inference import left_pad
from ftnb.serve.models import Served, ServedClassifier
from ftnb.tasks import sft


class ModelError(RuntimeError):
    """The model failed on the batch a request was in (the message says how)."""


@dataclass(eq=False)
class Job:
    """One request waiting for the model; the worker thread sends it events: ("delta", text) while
    streaming, then ("done", result) or ("error", message)."""
    served: Served
    payload: Any  # GenerationRequest or the records to classify
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    def key(self) -> tuple:
        if isinstance(self.served, ServedClassifier):
            return ("classify", self.served.name)
        return ("generate", id(self.served.engine), json.dumps(self.payload.decoding, sort_keys=True))

    def emit(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    async def outcome(self) -> dict:
        while True:
            kind, value = await self.events.get()
            if kind == "error":
                raise ModelError(value)
            if kind == "done":
                return value


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    stops: list[str]
    decoding: dict  # generate's settings, the same for every row of a batch
    stream: bool


class Batcher:
    """Collects waiting jobs into batches and runs them, one batch at a time, in one worker thread."""

    def __init__(self, max_batch_size: int, wait_s: float):
        self.max_batch_size, self.wait_s = max_batch_size, wait_s
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="ftnb-model")
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0}

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect(loop)
            groups: dict[tuple, list[Job]] = {}
            for job in jobs:
                groups.setdefault(job.key(), []).append(job)
            for group in groups.values():
                self.stats["requests"] += len(group)
                self.stats["batches"] += 1
                self.stats["largest_batch"] = max(self.stats["largest_batch"], len(group))
                await loop.run_in_executor(self.worker, run_batch, group)

    async def _collect(self, loop) -> list[Job]:
        jobs = [await self.queue.get()]
        deadline = loop.time() + self.wait_s
        while len(jobs) < self.max_batch_size:
            try:
                jobs.append(self.queue.get_nowait() if self.queue.qsize()
                            else await asyncio.wait_for(self.queue.get(), deadline - loop.time()))
            except TimeoutError:
                break
        return jobs


def run_batch(jobs: list[Job]) -> None:
    """Run one batch (all jobs share a key); any error fails these jobs only, with its message."""
    try:
        if isinstance(jobs[0].served, ServedClassifier):
            _classify(jobs)
        else:
            _generate(jobs)
    except Exception as error:  # noqa: BLE001 - reported to the batch's requests as a 500
        for job in jobs:
            job.emit("error", f"the model failed on this batch of {len(jobs)} request(s): "
                              f"{type(error).__name__}: {error}")


def _classify(jobs: list[Job]) -> None:
    probabilities = jobs[0].served.classifier.predict_proba([r for job in jobs for r in job.payload])
    start = 0
    for job in jobs:
        job.emit("done", probabilities[start:start + len(job.payload)])
        start += len(job.payload)


@torch.no_grad()
def _generate(jobs: list[Job]) -> None:
    """One left-padded generate for the whole batch; `_RowProgress` ends each row on its own terms."""
    engine, requests = jobs[0].served.engine, [job.payload for job in jobs]
    ids, mask = left_pad([r.prompt_ids for r in requests], engine.tokenizer.pad_token_id)
    width = ids.shape[1]
    progress = _RowProgress(jobs, engine.tokenizer)
    kwargs = sft.decoding_kwargs(engine.tokenizer, width, **requests[0].decoding,
                                 max_new_tokens=max(r.max_tokens for r in requests))
    kwargs["stopping_criteria"] = StoppingCriteriaList([progress])
    if engine.mixes_adapters:
        kwargs["adapter_names"] = [job.served.adapter for job in jobs]
    device = engine.model.device
    engine.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
    for row, (job, request) in enumerate(zip(jobs, requests)):
        job.emit("done", {"text": progress.text[row], "finish_reason": progress.finish[row] or "length",
                          "prompt_tokens": len(request.prompt_ids), "completion_tokens": len(progress.tokens[row])})


class _RowProgress(StoppingCriteria):
    """Called by generate after every step: reads each row's new token, ends the row at an
    end-of-turn token, a stop string or its own max_tokens, and streams the new text."""

    def __init__(self, jobs: list[Job], tokenizer):
        self.jobs, self.tokenizer, self.ends = jobs, tokenizer, sft.end_of_turn_ids(tokenizer)
        self.tokens: list[list[int]] = [[] for _ in jobs]
        self.text, self.sent = [""] * len(jobs), [0] * len(jobs)
        self.finish: list[str | None] = [None] * len(jobs)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        for row, job in enumerate(self.jobs):
            if self.finish[row] is None:
                self._advance(row, job, int(input_ids[row, -1]))
        return torch.tensor([f is not None for f in self.finish], device=input_ids.device)

    def _advance(self, row: int, job: Job, token: int) -> None:
        request = job.payload
        self.tokens[row].append(token)
        if token in self.ends:
            self.finish[row] = "stop"
        else:
            text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in request.stops) if i >= 0), default=None)
            if cut is not None:
                text, self.finish[row] = text[:cut], "stop"
            elif len(self.tokens[row]) >= request.max_tokens:
                self.finish[row] = "length"
            self.text[row] = text
        if job.cancelled:  # the client went away
            self.finish[row] = "cancelled"
        elif request.stream:
            ready = len(self.text[row]) if self.finish[row] else _safe_length(self.text[row], request.stops)
            if ready > self.sent[row]:
                job.emit("delta", self.text[row][self.sent[row]:ready])
                self.sent[row] = ready


def _safe_length(text: str, stops: list[str]) -> int:
    """How much of a growing text can be sent: not a half-decoded character (U+FFFD at the end),
    nor an ending that could still become a stop string (it would have to be taken back)."""
    end = len(text.rstrip("\ufffd"))
    held = max((k for s in stops for k in range(1, len(s)) if text[:end].endswith(s[:k])), default=0)
    return end - held
