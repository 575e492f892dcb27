"""Sample text from a trained jaxgpt checkpoint, streaming it to the terminal as it is produced.

    python sample.py --out_dir=out-shakespeare-char-cpu --start="ROMEO:" --num_samples=3 \\
        --max_new_tokens=500 --temperature=0.8 --top_k=200 --seed=1337
    python sample.py --config configs/shakespeare_char_cpu.py --start="ROMEO:"   # that config's out_dir

`--start=FILE:prompt.txt` reads the prompt from a file; `--init_from=nanogpt:PATH` or `gpt2:PATH` samples a
nanoGPT checkpoint or a local GPT-2 folder instead of a jaxgpt run. Errors (a missing checkpoint, a prompt
character the tokenizer does not know, a bad number) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable, Sequence
from typing import TextIO


class UsageError(Exception):
    """A problem with the command line or its inputs, reported as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage too; one line is enough
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="Sample from a trained jaxgpt model.")
    p.add_argument("--out_dir", default=None, help="directory holding the checkpoint (as train.py wrote it); "
                   "default: --config's out_dir, else 'out'")
    p.add_argument("--config", default=None, help="the training config file (configs/*.py): sample its out_dir "
                   "(a config file is Python and runs as code: trust it as you would trust a script)")
    p.add_argument("--which", default=None, choices=("best", "latest"), help="which checkpoint to load "
                   "(default: best, else latest when the run has no usable best one)")
    p.add_argument("--init_from", default="", help="sample another model instead of --out_dir's: 'nanogpt:PATH' "
                   "(a nanoGPT out_dir or ckpt.pt) or 'gpt2:PATH' (a local Hugging Face GPT-2 folder)")
    p.add_argument("--start", default="\n", help='the prompt, or "FILE:path" to read it from a file')
    p.add_argument("--num_samples", type=int, default=10)
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy; < 1 sharper, > 1 more random")
    p.add_argument("--top_k", type=int, default=200, help="keep only the k most likely tokens (0: no limit)")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling: keep tokens up to this mass")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--chunk_size", type=int, default=8, help="tokens per streamed chunk")
    p.add_argument("--no_cache", action="store_true", help="use the lecture's loop, jaxgpt.sampling.generate (slow, "
                   "the reference: the same text, printed when done)")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parses and checks the arguments; raises UsageError with a one-line message."""
    args = build_parser().parse_args(argv)
    if args.num_samples < 1:
        raise UsageError(f"--num_samples must be >= 1, got {args.num_samples}")
    if args.top_k < 0:
        raise UsageError(f"--top_k must be >= 0 (0 means no limit), got {args.top_k}")
    from jaxgpt.sampling import check_settings  # imported here: `sample.py --help` stays fast

    try:
        check_settings(args.max_new_tokens, args.temperature, args.top_k or None, args.top_p)
    except ValueError as e:  # the message starts with the setting's name
        raise UsageError(f"--{e}") from None
    if args.chunk_size < 1:
        raise UsageError(f"--chunk_size must be >= 1, got {args.chunk_size}")
    return args


def resolve_out_dir(args: argparse.Namespace) -> str:
    """The run to sample: --out_dir when given, else the out_dir of --config's file, else 'out'."""
    if args.out_dir is not None:
        return args.out_dir
    if args.config is None:
        return "out"
    if not os.path.isfile(args.config):
        raise UsageError(f"config file {args.config!r} not found: pass one of configs/*.py")
    from jaxgpt.config import load_config_file  # imported here: `sample.py --help` stays fast

    try:
        return load_config_file(args.config).out_dir
    except Exception as e:  # noqa: BLE001 - the config file's own code failed; report it in one line
        raise UsageError(f"cannot load config file {args.config!r}: {type(e).__name__}: {e}") from None


def read_prompt(start: str) -> str:
    """The prompt text: `start` itself, or the contents of the file named after "FILE:"."""
    if start.startswith("FILE:"):
        path = start[len("FILE:") :]
        try:
            with open(path, encoding="utf-8") as f:
                start = f.read()
        except (OSError, ValueError) as e:  # ValueError: a NUL in the path, or a file that is not UTF-8
            raise UsageError(f"cannot read the prompt file {path!r}: {getattr(e, 'strerror', None) or e}") from None
    if not start:
        raise UsageError("the prompt is empty: give at least one character with --start")
    return start


def encode_prompt(tokenizer, text: str):
    """Token ids of the prompt; unknown characters are listed in one UsageError."""
    unknown = tokenizer.unknown_chars(text) if hasattr(tokenizer, "unknown_chars") else []
    if unknown:
        listed = " ".join(repr(c) for c in unknown)
        raise UsageError(f"the prompt has characters the tokenizer does not know: {listed}")
    try:
        return tokenizer.encode(text)
    except ValueError as e:
        raise UsageError(f"cannot encode the prompt: {e}") from None


def _default_load_model(out_dir: str, which: str):
    from jaxgpt.checkpoint import CheckpointError, load_model  # imported here: `sample.py --help` stays fast

    try:
        return load_model(out_dir, which=which)
    except CheckpointError as e:  # incomplete or corrupt on disk: one line, like the other bad inputs
        raise UsageError(str(e)) from None


def _load_run(load_model: Callable, out_dir: str, which: str | None, err: TextIO):
    """(model, tokenizer) of the run's `which` checkpoint; without --which its best one, else its latest (with a
    note saying why)."""
    failed: list[str] = []
    missing_only = True  # no checkpoint at all (rather than an unusable one): say how to make one
    for kind in [which] if which else ["best", "latest"]:
        try:
            model, tokenizer, _ = load_model(out_dir, kind)
        except (FileNotFoundError, UsageError) as e:
            failed.append(str(e))
            missing_only &= isinstance(e, FileNotFoundError)
            continue
        if failed:
            print(f"sample.py: note: {failed[0]}; sampled the latest checkpoint instead", file=err)
        return model, tokenizer
    raise UsageError("; ".join(failed) + (": train first, or pass another --out_dir" if missing_only else ""))


def _load_init_from(spec: str):
    """(model, tokenizer) of a nanoGPT checkpoint or a local GPT-2 folder; UsageError when it cannot be read."""
    from jaxgpt.convert import InitFromError, load_init_from

    try:
        model, tokenizer, _ = load_init_from(spec)
    except InitFromError as e:
        raise UsageError(f"--init_from={e.spec!r}: {e.reason}") from None
    return model, tokenizer


def main(
    argv: Sequence[str] | None = None,
    *,
    load_model: Callable | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Runs the CLI; returns the exit status. `load_model(out_dir, which) -> (model, tokenizer, info)`."""
    out = out or sys.stdout
    err = err or sys.stderr
    load_model = load_model or _default_load_model
    try:
        args = parse_args(argv)
        prompt = read_prompt(args.start)
        if args.init_from:
            model, tokenizer = _load_init_from(args.init_from)
        else:
            out_dir = resolve_out_dir(args)
            if not os.path.exists(out_dir):
                raise UsageError(f"no checkpoint at {out_dir!r}: train first or pass --out_dir")
            model, tokenizer = _load_run(load_model, out_dir, args.which, err)
        if tokenizer is None:
            raise UsageError("the checkpoint has no tokenizer (no meta.pkl or tokenizer.json found beside it)")
        ids = encode_prompt(tokenizer, prompt)
    except UsageError as e:
        print(f"sample.py: error: {e}", file=err)
        return 2

    import jax
    import numpy as np

    from jaxgpt import decode, sampling

    if args.temperature == 0 and args.num_samples > 1:
        print(f"sample.py: note: --temperature=0 is greedy, so the {args.num_samples} samples are the same; use a "
              "temperature > 0 for different ones", file=err)
    idx = np.asarray(ids, np.int32)[None, :]
    keys = jax.random.split(jax.random.key(args.seed), args.num_samples)
    for k in range(args.num_samples):
        out.write(prompt)
        out.flush()
        settings = dict(key=keys[k], temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p)
        if args.no_cache:
            chunks = [sampling.generate(model, idx, args.max_new_tokens, **settings)[:, idx.shape[1] :]]
        else:
            chunks = decode.generate_stream(model, idx, args.max_new_tokens, chunk_size=args.chunk_size, **settings)
        for chunk in chunks:
            out.write(tokenizer.decode(chunk[0]))
            out.flush()
        out.write("\n---------------\n")
        out.flush()
    return 0


if __name__ == "__main__":
    status = main()
    gc.freeze()  # spares the exit its last garbage collections over every object JAX made (~0.5 s)
    sys.exit(status)
