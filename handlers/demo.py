"""Example handlers for the demo configs (configs/demo.yaml, configs/pipeline.yaml).

They are ordinary handlers: ``(payload, ctx)``, return on success, raise on failure. The demo's
latency, random failures, hangs and poison payloads are injected by the config's `simulate`
section (runner/middleware/simulate.py), not coded here, so the same faults can be rehearsed
against any handler.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from runner import TaskContext


def send_email(payload: dict[str, Any], ctx: TaskContext) -> str:
    """Pretend to send an email; returns the message id."""
    to = payload.get("to", f"user{payload.get('n', 0)}@example.com")
    message_id = hashlib.sha1(f"{ctx.task_id}:{to}".encode()).hexdigest()[:12]
    ctx.logger.debug("email to %s queued as %s", to, message_id)
    return message_id


def resize_image(payload: dict[str, Any], ctx: TaskContext) -> tuple[int, int]:
    """Pretend to resize an image; returns the new size."""
    width, height = int(payload.get("width", 1920)), int(payload.get("height", 1080))
    scale = min(1.0, 640 / max(width, 1))
    return round(width * scale), round(height * scale)


def generate_report(payload: dict[str, Any], ctx: TaskContext) -> int:
    """Pretend to build a report: a little CPU work that checks for cancellation."""
    rows = int(payload.get("rows", 2000))
    total = 0
    for i in range(rows):
        if ctx.cancelled.is_set():
            break
        total += i * i % 7
    return total


def render_thumbnail(payload: dict[str, Any], ctx: TaskContext) -> str:
    """Pretend to render a thumbnail: pure-Python CPU work (a process type's handler, so that
    several run on several cores at once); returns a digest of the result."""
    digest = hashlib.sha256(str(payload.get("n", 0)).encode())
    for _ in range(int(payload.get("rounds", 20_000))):
        digest = hashlib.sha256(digest.digest())
    return digest.hexdigest()[:16]


def fetch_order(payload: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    """Pretend to load an order: its id and its images, for the stages after it to fan out over
    (docs/pipelines.md)."""
    order = int(payload.get("order", payload.get("n", 1)))
    count = int(payload.get("images", 3))
    return {"order": order, "images": [{"order": order, "image": i} for i in range(count)]}


def contact_sheet(payload: list[Any], ctx: TaskContext) -> dict[str, Any]:
    """A pipeline's join (configs/pipeline.yaml): every resized image of one order, in order."""
    return {"images": len(payload), "pixels": sum(w * h for w, h in payload)}


def refund(payload: dict[str, Any], ctx: TaskContext) -> str:
    """A compensating step (``on_dead``): its payload is the dead task's record."""
    ctx.logger.info("compensating for %s (%s)", payload["task"]["id"], payload["reason"])
    return str(payload["task"]["id"])


async def fetch_page(payload: dict[str, Any], ctx: TaskContext) -> int:
    """Pretend to fetch a page with an async client (execution: async, configs/modes.yaml):
    awaits as I/O would, and returns the page's size."""
    await asyncio.sleep(0.01)
    return 1024 + int(payload.get("n", 0))
