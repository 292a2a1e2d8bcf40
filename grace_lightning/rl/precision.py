"""fp32 arithmetic for rewards, advantages and loss reductions under any autocast.

Upcasting the inputs is not enough: under ``torch.autocast`` (``trainer.precision=bf16-mixed``)
``matmul``/``einsum``/``bmm`` cast their operands back down to bf16. Group-centred advantages
live in small within-group differences (within-group cosines of 0.98 are common), which bf16's
8-bit mantissa rounds away. `full_precision` turns autocast off for the decorated function's
body on every device type; the function still upcasts its own inputs with `f32`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from torch import Tensor

F = TypeVar("F", bound=Callable)

_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu")


@contextlib.contextmanager
def autocast_off() -> Iterator[None]:
    """Disable autocast on every device type where it is currently on (no-op otherwise)."""
    with contextlib.ExitStack() as stack:
        for device in _DEVICE_TYPES:
            if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device_type=device, enabled=False))
        yield


def full_precision(fn: F) -> F:
    """Decorator: run ``fn`` with autocast off (see `autocast_off`). ``fn.__wrapped__`` is the
    undecorated function (tests use it to show what autocast would have done)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with autocast_off():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def f32(x: Tensor) -> Tensor:
    """Floating tensors to at least float32 (float64 stays); bool/int to float32."""
    if x.is_floating_point():
        return x.to(torch.promote_types(x.dtype, torch.float32))
    return x.to(torch.float32)
