"""Checkpoints with Orbax: the 'latest' and the 'best' (lowest val loss) states of a training run.

A run's `out_dir/checkpoints/{latest,best}/<step>/` each hold four items: `params` (the model's NNX
state), `opt_state` (Optax), `train` (step and the base PRNG key) and `meta` (JSON: the training config,
the tokenizer, best_val_loss, step). `load_model` rebuilds the model from `meta` and restores only its
parameters, which is all that sampling needs.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxgpt import config as config_lib
from jaxgpt.tokenizer import Tokenizer, tokenizer_from_dict

WHICH = ("latest", "best")


def checkpoint_dir(out_dir: str | os.PathLike, which: str) -> pathlib.Path:
    """Where the `which` ('latest' | 'best') checkpoints of a run live."""
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    return pathlib.Path(out_dir).absolute() / "checkpoints" / which


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """Two Orbax `CheckpointManager`s (latest, best), each keeping one step. Saves are synchronous.

    Synchronous saving keeps a checkpoint complete on disk before the next (donating) train step
    reuses the buffers it came from, and before an interrupted run exits.
    """

    def __init__(self, out_dir: str | os.PathLike, *, read_only: bool = False):
        self.out_dir = pathlib.Path(out_dir).absolute()
        options = dict(max_to_keep=1, enable_async_checkpointing=False, read_only=read_only, create=not read_only)
        self.managers = {
            which: ocp.CheckpointManager(checkpoint_dir(out_dir, which), options=ocp.CheckpointManagerOptions(
                **options))
            for which in WHICH
            if not read_only or checkpoint_dir(out_dir, which).is_dir()
        }

    def latest_step(self, which: str = "latest") -> int | None:
        """The step of the `which` checkpoint, or None when there is none."""
        manager = self.managers.get(which)
        return None if manager is None else manager.latest_step()

    def save(self, which: str, step: int, *, params, opt_state, key: jax.Array, meta: dict[str, Any]) -> None:
        """Writes one checkpoint at `step` (a step already saved is left as it is)."""
        manager = self.managers[which]
        if manager.latest_step() == step:
            return
        manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                train=ocp.args.StandardSave({"step": step, "key": key}),
                meta=ocp.args.JsonSave(dict(meta, step=step)),
            ),
        )
        manager.wait_until_finished()

    def restore(self, which: str, *, params, opt_state, key: jax.Array) -> dict[str, Any]:
        """Restores everything into the structure of the given templates (arrays or shape structs).

        Arrays come back with the templates' shardings, so a checkpoint saved on one mesh restores onto
        another (e.g. 8-device FSDP -> 1 device); give shape structs a `sharding`.
        """
        step = self.latest_step(which)
        if step is None:
            raise FileNotFoundError(f"no {which} checkpoint in {checkpoint_dir(self.out_dir, which)}")
        return self.managers[which].restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(params)),
                opt_state=ocp.args.StandardRestore(_abstract(opt_state)),
                train=ocp.args.StandardRestore(_abstract({"step": 0, "key": key})),
                meta=ocp.args.JsonRestore(),
            ),
        )

    def restore_meta(self, which: str) -> dict[str, Any]:
        step = self.latest_step(which)
        if step is None:
            raise FileNotFoundError(f"no {which} checkpoint in {checkpoint_dir(self.out_dir, which)}")
        return self.managers[which].restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def close(self) -> None:
        for manager in self.managers.values():
            manager.close()


def load_model(out_dir: str | os.PathLike, which: str = "best") -> tuple[nnx.Module, Tokenizer | None, dict]:
    """The trained model of a run, its tokenizer and a summary.

    Returns (model, tokenizer, info): the NNX `GPT` or `BigramLanguageModel` with the `which` checkpoint's
    parameters, the run's tokenizer (None for a nanoGPT dataset without meta.pkl), and a dict with
    'step', 'best_val_loss', 'config' (the training config as a plain dict), 'which' and 'path'.
    Raises FileNotFoundError naming the directory when there is no such checkpoint.
    """
    ckpt_dir = checkpoint_dir(out_dir, which)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"no {which} checkpoint in {ckpt_dir}")
    ckptr = Checkpointer(out_dir, read_only=True)
    try:
        step = ckptr.latest_step(which)
        if step is None:
            raise FileNotFoundError(f"no {which} checkpoint in {ckpt_dir}")
        meta = ckptr.restore_meta(which)
        config = config_lib.from_dict(meta["config"])
        model = nnx.eval_shape(
            lambda: config_lib.build_model(config, meta["vocab_size"], nnx.Rngs(0))
        )
        graphdef, abstract_params = nnx.split(model)
        # Onto one device, whatever mesh the run was trained on (Orbax would otherwise use the saved shardings).
        one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one_device),
                                       abstract_params)
        restored = ckptr.managers[which].restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
        )
    finally:
        ckptr.close()
    model = nnx.merge(graphdef, restored["params"])
    tokenizer = tokenizer_from_dict(meta["tokenizer"]) if meta.get("tokenizer") else None
    info = {
        "step": int(meta["step"]),
        "best_val_loss": meta.get("best_val_loss"),
        "config": meta["config"],
        "which": which,
        "path": str(ckpt_dir / str(step)),
    }
    return model, tokenizer, info
