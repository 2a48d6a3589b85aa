"""An example handler whose payload is a pydantic model.

Annotating the first parameter with a ``BaseModel`` subclass is all it takes: ``dq-run publish``
refuses payloads that do not match (naming the field), the worker validates again before the
handler runs (a bad payload goes to the dead-letter queue with reason ``invalid payload``), and
the handler receives an ``Order`` instance.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from runner import TaskContext


class Order(BaseModel):
    """What a ``ship_order`` task carries."""

    sku: str = Field(min_length=1)
    quantity: int = Field(gt=0)
    express: bool = False


def ship_order(order: Order, ctx: TaskContext) -> str:
    """Pretend to ship an order; returns a tracking number."""
    speed = "express" if order.express else "standard"
    ctx.logger.debug("shipping %d x %s (%s)", order.quantity, order.sku, speed)
    return f"{ctx.task_id[:8]}-{order.sku}-{order.quantity}"
