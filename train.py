"""Train a GPT with jaxgpt: `python train.py --config configs/shakespeare_char.py [--config.key=value ...]`.

A thin command line over `jaxgpt.training.train`: the config file and its overrides are parsed by
ml_collections' config flags; every bad key, value, dataset or out_dir ends in one `error:` line and
exit status 2. nanoGPT's habits work too: `python train.py configs/x.py --max_iters=300` (a positional config
file, `--key=value` for a config key); nanoGPT options with no jaxgpt counterpart are refused with the jaxgpt way
of doing the same thing. A config file is Python and runs as code: trust it as you would trust a script.
"""

from __future__ import annotations

import difflib
import gc
import os
import re
import signal
import sys

from jaxgpt.run_dir import Interrupt, Interrupted, TrainingError  # the standard library only: quick to import

# Ctrl-C / SIGTERM from the very start: a signal is recorded, never raised as a KeyboardInterrupt that the imports
# below (JAX's among them) or a garbage-collection callback could swallow or turn into a long traceback;
# training.train stops on it.
INTERRUPT = Interrupt(log=print, stopping="stopping before training starts; nothing is saved")
if __name__ == "__main__":
    INTERRUPT.__enter__()  # left in __main__ below, once app.run is done

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).", lock_config=True)


_CONFIG_FILE: str | None = None  # the config file named on the command line, once parsed


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# nanoGPT's top-level keys that jaxgpt keeps under `model.`, and the ones it renamed.
NANOGPT_MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias", "dtype", "vocab_size")
NANOGPT_RENAMED = {"gradient_accumulation_steps": "grad_accum_steps"}
# nanoGPT options with no jaxgpt counterpart: what to do instead.
_METRICS = "jaxgpt has no wandb logging: metrics go to out_dir/metrics.jsonl and out_dir/loss.png"
NANOGPT_REFUSED = {
    "device": "JAX picks the device itself: set JAX_PLATFORMS=cpu (or cuda, tpu) in the environment instead",
    "compile": "jaxgpt always compiles with XLA (jax.jit): there is nothing to set, drop the option",
    "backend": "several processes join through jax.distributed by themselves (docs/scaling.md): drop the option",
    "wandb_log": _METRICS,
    "wandb_project": _METRICS,
    "wandb_run_name": _METRICS,
    "dataset": "jaxgpt reads a path, not a dataset name: use --config.data.path=data/<dataset> (a text file or "
    "a nanoGPT data directory)",
}
_NANOGPT_INIT_FROM = {
    "resume": "jaxgpt continues a run with --config.resume=True",
    "scratch": "jaxgpt starts from scratch by default, drop the option",
}


CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def _close_files(path: str) -> str:
    """' (did you mean ...?)' naming the closest .py file beside a config path that does not exist, else the closest
    of jaxgpt's configs/ (nanoGPT's `config/train_shakespeare_char.py` -> `configs/shakespeare_char.py`), or ''."""
    name = os.path.basename(path)
    for folder, wanted in ((os.path.dirname(path) or ".", name), (CONFIGS, name.removeprefix("train_"))):
        try:
            names = sorted(n for n in os.listdir(folder) if n.endswith(".py"))
        except OSError:
            continue
        close = difflib.get_close_matches(wanted, names, n=1)
        if close:
            found = os.path.join(folder, close[0])
            return f" (did you mean {os.path.relpath(found) if folder == CONFIGS else found!r}?)"
    return ""


def translate_argv(argv: list[str], known_flags: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """nanoGPT's command-line forms rewritten as jaxgpt's; raises ValueError (one line) for what cannot be.

    A positional `configs/x.py` becomes `--config=configs/x.py`; `--max_iters=300` (any `--key=value` whose key
    is not one of `known_flags`, absl's own flags) becomes `--config.max_iters=300`, nanoGPT's model keys go
    under `model.` (`--n_layer=4` -> `--config.model.n_layer=4`); `--init_from=resume` and options jaxgpt has no
    use for (`--device`, `--compile`, `--wandb_log`, ...) raise with the jaxgpt equivalent. An unknown key is
    left for the config's own check, which names it.
    """
    out, positional = [argv[0]], []
    waiting: str | None = None  # an option given without `=`, whose value may be the next argument
    for arg in argv[1:]:
        if waiting is not None and not arg.startswith("-") and (waiting in ("config", "flagfile")
                                                                or not arg.endswith(".py")):
            out.append(arg)  # `--config FILE`, `--config.max_iters 300`
            waiting = None
            continue
        waiting = None
        if not arg.startswith("-") or arg == "-":
            positional.append(arg)
            continue
        name, eq, value = arg.lstrip("-").partition("=")
        if name in NANOGPT_REFUSED:
            raise ValueError(f"--{name} is a nanoGPT option: {NANOGPT_REFUSED[name]}")
        if name == "init_from" and (value in _NANOGPT_INIT_FROM or value.startswith("gpt2") and ":" not in value):
            hint = _NANOGPT_INIT_FROM.get(value, "jaxgpt does not download GPT-2; use --config.init_from=gpt2:PATH "
                                                 "with a local Hugging Face GPT-2 folder")
            raise ValueError(f"--init_from={value} is nanoGPT's: {hint}")
        if not eq or "." in name or name in known_flags or name == "config":
            out.append(arg)
            waiting = None if eq else name
            continue
        if name in NANOGPT_MODEL_KEYS:
            name = f"model.{name}"
        out.append(f"--config.{NANOGPT_RENAMED.get(name, name)}={value}")
    if positional:
        if len(positional) > 1 or not positional[0].endswith(".py"):
            raise ValueError(f"unexpected arguments {positional}: pass one config file (configs/<name>.py) and "
                             "options as --config.key=value")
        if _config_path(out) is not None:
            raise ValueError(f"two config files, {positional[0]!r} and --config {_config_path(out)!r}: pass one")
        out.insert(1, f"--config={positional[0]}")
    return out


def _config_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _fail_unknown_key(argv: list[str], e: Exception) -> None:
    """Exits naming the override whose key the config lacks (with the closest key), else the parse error."""
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


HELP_FLAGS = ("-h", "-help", "--help", "--helpshort", "--helpfull")


def _print_help(argv: list[str]) -> None:
    """This docstring and every config key with its default (the named config file's, else base_config's)."""
    from jaxgpt import config as config_lib
    from jaxgpt.config_help import describe

    path = _config_path(argv) or next((a for a in argv[1:] if a.endswith(".py")), None)
    config, source = config_lib.base_config(), "jaxgpt/config.py base_config()"
    if path is not None:
        try:
            config, source = config_lib.load_config_file(path), path
        except Exception:  # noqa: BLE001 - a broken config file: the keys still are base_config's
            pass
    print(f"{__doc__.strip()}\n\nusage: python train.py --config configs/<name>.py [--config.KEY=VALUE ...]\n\n"
          f"config keys (defaults from {source}):\n{describe(config)}")


_KINDS = {bool: "True or False", int: "a whole number", float: "a number", str: "a string"}
_BAD_VALUE = re.compile(r"^flag --config\.([\w.]+)=(.*?): ")


def _fail_bad_value(argv: list[str], e: Exception) -> None:
    """Exits saying what kind of value the key takes (not Python's 'invalid literal for int()'), when it can tell."""
    from jaxgpt import config as config_lib

    found = _BAD_VALUE.match(str(e))
    if found:
        key, value = found.groups()
        *parents, leaf = key.split(".")
        try:
            node = config_lib.load_config_file(_config_path(argv)) if _config_path(argv) else config_lib.base_config()
            for part in parents:
                node = node[part]
            kind, default = _KINDS.get(node.get_type(leaf)), node[leaf]
        except Exception:  # noqa: BLE001 - no config to ask: absl's own words below
            kind = None
        if kind is not None:
            _fail(f"--config.{key}={value}: {key} takes {kind} (this config has {default!r}), not {value!r}")
    _fail(str(e).removeprefix("flag "))


def _parse(argv: list[str]) -> list[str]:
    """absl's flag parsing, with its tracebacks turned into one line naming the bad key or value."""
    if any(arg in HELP_FLAGS for arg in argv[1:]):
        _print_help(argv)
        sys.exit(0)
    try:
        argv = translate_argv(argv, set(flags.FLAGS))
    except ValueError as e:
        _fail(str(e))
    sys.argv[:] = argv  # ml_collections finds its overrides in sys.argv itself
    global _CONFIG_FILE
    _CONFIG_FILE = path = _config_path(argv)
    if path is not None and not os.path.isfile(path):  # before ml_collections turns it into a traceback
        _fail(f"config file {path!r} not found{_close_files(path)}: pass one of configs/*.py")
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        if "Unknown command line flag 'config." in str(e):  # a top-level key that does not exist
            _fail_unknown_key(argv, e)
        _fail_bad_value(argv, e)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        _fail_unknown_key(argv, e)
    except Exception as e:  # noqa: BLE001 - raised by the config file's own code (a SyntaxError, ...)
        _fail(f"cannot load config file {path!r}: {type(e).__name__}: {e}")
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

    try:
        config = _CONFIG.value
    except OSError as e:  # ml_collections keeps a file it could not read as an error raised here
        _fail(f"cannot load config file {_CONFIG_FILE!r}: {str(e).splitlines()[-1].strip()}")
    if config is None:
        _fail("no config: pass --config configs/<name>.py")
    if not hasattr(config, "to_dict"):  # ml_collections' placeholder for a file it could not load
        _fail(f"cannot load config file {_CONFIG_FILE!r}")
    try:
        training.train(config, interrupt=INTERRUPT)
    except Interrupted as e:  # Ctrl-C before the first step: said in one line, not an error
        print(str(e), file=sys.stderr)
        sys.exit(130)
    except (ConfigError, DataError, TrainingError, FileNotFoundError) as e:
        _fail(str(e))
    # Nothing is left to collect: without this the interpreter's last garbage collections walk every object
    # JAX made, a wait between the last line and the prompt.
    gc.freeze()


def _quit_now(signum, frame) -> None:
    os._exit(128 + signum)  # the run has ended: a Ctrl-C during the interpreter's teardown just ends it


if __name__ == "__main__":
    try:
        app.run(main, flags_parser=_parse)
    finally:
        INTERRUPT.__exit__(None, None, None)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _quit_now)
