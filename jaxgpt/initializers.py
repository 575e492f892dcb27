"""nanoGPT's weight initialiser, N(0, std²), and a way to draw a whole model's weights in one random draw.

The models declare their initialisers where their parameters are made (`model.py`), as nanoGPT does. Called
plainly, `normal(std)` is Flax's `nnx.initializers.normal(std)`: one draw from its own key.

`build_drawing_once(construct, key)` builds a model with every `normal` served from one standard-normal draw
instead, in one compiled program. Why: XLA's CPU compiler spends a fixed time on each random draw in a program,
whatever its size, so one draw of all the values compiles much sooner than a draw per parameter (measured in
benchmarks/RESULTS.md). The values differ from the per-key ones, and are as deterministic: the same key and the
same model give the same weights, since a model makes its parameters in one fixed order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

M = TypeVar("M", bound=nnx.Module)

_served = threading.local()  # the draw that `normal` serves from, inside `_serving` (per thread)


class _Draw:
    """One standard-normal draw handed out in consecutive slices; `values=None` only counts what is asked."""

    def __init__(self, values: jax.Array | None = None):
        self.values = values
        self.taken = 0

    def take(self, shape: tuple[int, ...]) -> jax.Array | None:
        n = math.prod(shape)
        start, self.taken = self.taken, self.taken + n
        return None if self.values is None else self.values[start:self.taken].reshape(shape)


@contextlib.contextmanager
def _serving(draw: _Draw) -> Iterator[_Draw]:
    previous, _served.draw = getattr(_served, "draw", None), draw
    try:
        yield draw
    finally:
        _served.draw = previous


@dataclasses.dataclass(frozen=True)
class normal:  # lower case: called like a function, `normal(std)`, as Flax's initialisers are
    """N(0, std²): nanoGPT's init for weights and embeddings (`torch.nn.init.normal_(mean=0.0, std=std)`).

    A value, not a closure: two `normal(0.02)` compare equal. Some Flax versions (0.12.0) keep a layer's
    initialiser in its graphdef, which then is the same for every build of the same model.
    """

    std: float

    def __call__(self, key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        draw = getattr(_served, "draw", None)
        if draw is None:
            return nnx.initializers.normal(self.std)(key, shape, dtype)
        z = draw.take(tuple(shape))
        if z is None:  # only counting: the value's shape is all that is looked at
            return jnp.zeros(shape, dtype)
        return (self.std * z).astype(dtype)


def build_drawing_once(construct: Callable[[nnx.Rngs], M], key: jax.Array) -> M:
    """`construct(rngs)`, a model, with every `normal` initialiser's values taken from one draw, in one program.

    `construct` is run twice: once abstractly to count the values its `normal`s ask for, then compiled with
    one draw of that many. The keys `rngs` hands the initialisers go unused, and the compiler drops them.
    """
    counted = _Draw()
    with _serving(counted):
        nnx.eval_shape(lambda: construct(nnx.Rngs(0)))

    @nnx.jit
    def build(key: jax.Array) -> M:
        with _serving(_Draw(jax.random.normal(key, (counted.taken,), jnp.float32))) as draw:
            model = construct(nnx.Rngs(0))
        assert draw.taken == counted.taken, "the model asked for other values than when counted"  # noqa: S101
        return model

    return build(key)
