"""Train a GPT with jaxgpt: `python train.py --config configs/shakespeare_char.py [--config.key=value ...]`.

A thin command line over `jaxgpt.training.train`: the config file and its overrides are parsed by
ml_collections' config flags; every bad key, value, dataset or out_dir ends in one `error:` line and
exit status 2.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).", lock_config=True)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _config_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _parse(argv: list[str]) -> list[str]:
    """absl's flag parsing, with its tracebacks turned into one line naming the bad key or value."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(str(e).removeprefix("flag "))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        from jaxgpt import config as config_lib

        path = _config_path(argv)
        try:
            base = config_lib.load_config_file(path) if path else None
        except Exception:  # noqa: BLE001 - the config file itself is broken; report that
            _fail(f"cannot load config file {path!r}: {e}")
        for arg in argv[1:]:
            if base is not None and arg.startswith("--config."):
                message = config_lib.unknown_key(base, arg[len("--config."):].split("=", 1)[0])
                if message:
                    _fail(message)
        _fail(f"bad config override: {e}")
    return []  # not reached


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)  # Orbax reports every file it writes at INFO
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}: pass options as --config.key=value")
    from jaxgpt import training
    from jaxgpt.config import ConfigError
    from jaxgpt.data import DataError
    from jaxgpt.sharding import maybe_initialize_distributed

    try:  # one of several processes (a TPU pod slice, SLURM, ...): join them before any device is used
        maybe_initialize_distributed()
    except (ValueError, RuntimeError) as e:
        _fail(f"cannot join the other processes of this run: {e}")

    config = _CONFIG.value
    if config is None:
        _fail("no config: pass --config configs/<name>.py")
    if not hasattr(config, "to_dict"):  # ml_collections' placeholder for a file it could not load
        _fail(f"cannot load config file {_config_path(sys.argv)!r}")
    try:
        training.train(config)
    except (ConfigError, DataError, training.TrainingError, FileNotFoundError) as e:
        _fail(str(e))


if __name__ == "__main__":
    app.run(main, flags_parser=_parse)
