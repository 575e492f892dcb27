"""Opening a downloaded checkpoint or dataset never runs code from it (jaxgpt/safe_pickle.py).

Each crafted file here would create a sentinel file when unpickled with full power (the classic
`__reduce__` returning `os.system` or `open`); the first tests prove that, the rest that every jaxgpt
entry point refuses the file, names it and the refused global, and that the sentinel never appears.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxgpt
import sample
from jaxgpt import training
from jaxgpt.config import ConfigError
from jaxgpt.data import DataError, load_dataset
from jaxgpt.prepare import load_prepared, prepare
from jaxgpt.prepare import main as prepare_main
from jaxgpt.safe_pickle import UnsafePickleError, load_pickle, load_torch_checkpoint
from jaxgpt.tokenizer import CharTokenizer, HFTokenizer, load_tokenizer, tokenizer_from_meta
from tests.test_interop import NANO_ARGS, _jax_model, _nanogpt_ckpt, _params, _reference
from tests.test_tokenizer_bpe import train_bpe
from tests.test_train_cli import ROOT, TINY, _train
from tests.test_training import tiny_config, tiny_text


class _Payload:
    """Unpickles as `fn(*args)`: the pickle names `fn` and never this class."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(sentinel) -> dict[str, tuple[_Payload, str]]:
    """Ways a pickle can create `sentinel`, with the global each names ('posix.system', 'io.open')."""
    return {
        "os.system": (_Payload(os.system, (f"touch {shlex.quote(str(sentinel))}",)), f"{os.system.__module__}.system"),
        "open": (_Payload(open, (str(sentinel), "w")), f"{open.__module__}.{open.__qualname__}"),
    }


PAYLOADS = ["os.system", "open"]
CHARS = "abc \n"


def _dump(path, value, protocol: int = pickle.DEFAULT_PROTOCOL) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(value, protocol=protocol))


def _char_meta(itos: dict | None = None) -> dict:
    """nanoGPT's data/shakespeare_char/prepare.py meta.pkl contents for CHARS (another `itos` when given)."""
    stoi = {c: i for i, c in enumerate(CHARS)}
    return {"vocab_size": len(CHARS), "itos": itos or dict(enumerate(CHARS)), "stoi": stoi}


def _evil_meta(path, payload: _Payload, protocol: int = pickle.DEFAULT_PROTOCOL) -> None:
    """A nanoGPT char meta.pkl whose `itos` is the payload, deep inside the dict."""
    _dump(path, _char_meta({0: "a", 1: [payload]}), protocol)


def _evil_ckpt(path, payload: _Payload) -> None:
    """A nanoGPT ckpt.pt with every real key, the payload hidden in its `config`."""
    checkpoint = _nanogpt_ckpt(_reference(), compiled=False)
    checkpoint["config"]["dataset"] = payload
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)


def _data_dir(path) -> None:
    """train.bin / val.bin of a tiny char dataset (ids < len(CHARS)), as nanoGPT's prepare.py writes them."""
    path.mkdir(parents=True, exist_ok=True)
    ids = np.arange(400, dtype=np.uint16) % len(CHARS)
    ids.tofile(path / "train.bin")
    ids[:100].tofile(path / "val.bin")


def _one_line(message: str) -> str:
    assert "\n" not in message.strip(), message
    return message


# ---------------------------------------------------------------------------------- the files are real threats


@pytest.mark.parametrize("kind", PAYLOADS)
def test_the_crafted_files_do_run_code_with_full_unpickling(tmp_path, kind):
    sentinel = tmp_path / "SENTINEL"
    payload, _ = _payloads(sentinel)[kind]
    _evil_meta(tmp_path / "meta.pkl", payload)
    with open(tmp_path / "meta.pkl", "rb") as f:
        pickle.load(f)
    assert sentinel.exists()  # so the refusals below are refusals of a working attack
    sentinel.unlink()
    _evil_ckpt(tmp_path / "ckpt.pt", payload)
    torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert sentinel.exists()


# ------------------------------------------------------------------------------------------------ meta.pkl


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("kind", PAYLOADS)
def test_load_pickle_refuses_any_global_in_every_protocol(tmp_path, kind, protocol):
    sentinel = tmp_path / "SENTINEL"
    payload, refused = _payloads(sentinel)[kind]
    _evil_meta(tmp_path / "meta.pkl", payload, protocol)
    with pytest.raises(UnsafePickleError) as e:
        load_pickle(tmp_path / "meta.pkl")
    assert (e.value.path, e.value.refused) == (tmp_path / "meta.pkl", refused)
    assert str(tmp_path / "meta.pkl") in _one_line(str(e.value)) and refused in str(e.value)
    assert isinstance(e.value, ValueError)  # what the CLIs already report as bad input
    assert not sentinel.exists()


def test_load_pickle_refuses_harmless_looking_classes_too(tmp_path):
    # A set (before protocol 4's set opcode) or a numpy dtype is inert, but naming a global is how the
    # attack works: none is admitted.
    for value, refused in [({1, 2}, "builtins.set"), (np.dtype("uint16"), "numpy.dtype")]:
        (tmp_path / "m.pkl").write_bytes(pickle.dumps(value, protocol=3))
        with pytest.raises(UnsafePickleError, match=refused.replace(".", r"\.")):
            load_pickle(tmp_path / "m.pkl")


_plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=4) | st.integers(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=60, deadline=None)
@given(value=_plain, protocol=st.integers(0, pickle.HIGHEST_PROTOCOL))
def test_load_pickle_reads_every_plain_value(tmp_path_factory, value, protocol):
    path = tmp_path_factory.mktemp("plain") / "meta.pkl"
    path.write_bytes(pickle.dumps(value, protocol=protocol))
    assert load_pickle(path) == value


def test_load_pickle_garbage_is_one_line_value_error(tmp_path):
    good = pickle.dumps({"vocab_size": 3, "itos": {0: "a", 1: "b", 2: "c"}})
    for name, data in [("text", b"not a pickle"), ("truncated", good[: len(good) // 2]), ("empty", b"")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match="is not a readable pickle") as e:
            load_pickle(tmp_path / name)
        assert not isinstance(e.value, UnsafePickleError) and str(tmp_path / name) in _one_line(str(e.value))


@pytest.mark.parametrize("kind", PAYLOADS)
def test_tokenizer_and_dataset_loaders_refuse_a_crafted_meta(tmp_path, kind):
    sentinel = tmp_path / "SENTINEL"
    payload, refused = _payloads(sentinel)[kind]
    data = tmp_path / "data"
    _data_dir(data)
    _evil_meta(data / "meta.pkl", payload)
    for load in (load_tokenizer, tokenizer_from_meta):
        with pytest.raises(UnsafePickleError, match=refused):
            load(data / "meta.pkl")
    with pytest.raises(UnsafePickleError, match=refused):
        load_prepared(data)
    with pytest.raises(DataError) as e:  # train.py's path to a data folder
        load_dataset(data)
    assert str(data / "meta.pkl") in _one_line(str(e.value)) and refused in str(e.value)
    assert not sentinel.exists()


def test_jaxgpt_and_nanogpt_meta_files_still_load(tmp_path, shakespeare_path):
    text = shakespeare_path.read_text(encoding="utf-8")[:20_000]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    meta = prepare(corpus, tmp_path / "char", "char", progress=False)
    assert load_pickle(tmp_path / "char" / "meta.pkl") == meta
    assert load_tokenizer(tmp_path / "char" / "meta.pkl") == CharTokenizer.from_text(text)
    assert load_prepared(tmp_path / "char").tokenizer == CharTokenizer.from_text(text)

    bpe_path = tmp_path / "tokenizer.json"
    train_bpe(text).save(str(bpe_path))
    meta = prepare(corpus, tmp_path / "bpe", bpe_path, progress=False)  # the whole tokenizer JSON in meta.pkl
    assert load_pickle(tmp_path / "bpe" / "meta.pkl") == meta
    bpe = load_tokenizer(tmp_path / "bpe" / "meta.pkl")
    assert isinstance(bpe, HFTokenizer)
    np.testing.assert_array_equal(bpe.encode(text[:300]), HFTokenizer.from_file(bpe_path).encode(text[:300]))

    _dump(tmp_path / "nano" / "meta.pkl", _char_meta())
    assert load_tokenizer(tmp_path / "nano" / "meta.pkl") == CharTokenizer(list(CHARS))


def test_prepare_cli_refuses_a_crafted_tokenizer_meta(tmp_path, capsys):
    sentinel = tmp_path / "SENTINEL"
    payload, refused = _payloads(sentinel)["os.system"]
    _evil_meta(tmp_path / "evil" / "meta.pkl", payload)
    (tmp_path / "corpus.txt").write_text("abc abc\n" * 50, encoding="utf-8")
    argv = ["--input", str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "out"),
            "--tokenizer", str(tmp_path / "evil" / "meta.pkl"), "--no_progress"]
    assert prepare_main(argv) == 2
    err = capsys.readouterr().err
    assert _one_line(err).startswith("error: ") and refused in err and str(tmp_path / "evil" / "meta.pkl") in err
    assert not sentinel.exists() and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------- ckpt.pt


@pytest.mark.parametrize("kind", PAYLOADS)
def test_nanogpt_checkpoint_with_a_payload_is_refused(tmp_path, kind):
    sentinel = tmp_path / "SENTINEL"
    payload, refused = _payloads(sentinel)[kind]
    _evil_ckpt(tmp_path / "run" / "ckpt.pt", payload)
    with pytest.raises(UnsafePickleError) as e:
        load_torch_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert e.value.refused == refused
    for spec in (tmp_path / "run", tmp_path / "run" / "ckpt.pt"):
        with pytest.raises(UnsafePickleError) as e:
            jaxgpt.load_nanogpt_checkpoint(spec)
        assert str(tmp_path / "run" / "ckpt.pt") in _one_line(str(e.value)) and refused in str(e.value)
    assert not sentinel.exists()


@pytest.mark.parametrize("kind", PAYLOADS)
def test_nanogpt_checkpoint_with_a_crafted_meta_is_refused(tmp_path, kind):
    sentinel = tmp_path / "SENTINEL"
    payload, refused = _payloads(sentinel)[kind]
    _evil_meta(tmp_path / "run" / "meta.pkl", payload)
    torch.save(_nanogpt_ckpt(_reference(), compiled=False), tmp_path / "run" / "ckpt.pt")
    with pytest.raises(UnsafePickleError, match=refused):
        jaxgpt.load_nanogpt_checkpoint(tmp_path / "run")
    assert not sentinel.exists()


def test_a_garbled_checkpoint_is_unreadable_not_unsafe(tmp_path):
    # weights_only's refusal text spans lines and speaks of globals even for plain garbage: one line, no "refused".
    for name, data in [("text", b"not a pickle"), ("empty", b"")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "ckpt.pt").write_bytes(data)
        with pytest.raises(ValueError, match="not a readable PyTorch checkpoint") as e:
            jaxgpt.load_nanogpt_checkpoint(tmp_path / name)
        assert not isinstance(e.value, UnsafePickleError) and "refused" not in _one_line(str(e.value))


def test_train_init_from_refuses_a_crafted_checkpoint(tmp_path, shakespeare_path):
    sentinel = tmp_path / "SENTINEL"
    _evil_ckpt(tmp_path / "run" / "ckpt.pt", _payloads(sentinel)["os.system"][0])
    text = tiny_text(tmp_path, shakespeare_path)
    with pytest.raises(ConfigError, match="refused to unpickle") as e:
        training.train(tiny_config(text, tmp_path / "out", init_from=f"nanogpt:{tmp_path / 'run'}"))
    _one_line(str(e.value))
    assert not sentinel.exists() and not (tmp_path / "out" / "checkpoints").exists()


def test_real_nanogpt_checkpoints_still_load(tmp_path):
    # nanoGPT's train.py layout: tensors, a torch AdamW state, a 0-d tensor best_val_loss, plain dicts.
    ref = _reference()
    torch.save(_nanogpt_ckpt(ref, compiled=True), tmp_path / "ckpt.pt")
    model, _, info = jaxgpt.load_nanogpt_checkpoint(tmp_path / "ckpt.pt")
    want = jaxgpt.from_torch_state_dict(jaxgpt.GPTConfig(**NANO_ARGS), ref.state_dict())
    got, expected = _params(model), _params(want)
    assert got.keys() == expected.keys() and all(np.array_equal(got[k], expected[k]) for k in expected)
    assert info["config"]["dataset"] == "shakespeare_char" and info["optimizer"]["param_groups"]

    # ...and what jaxgpt writes, including the extra jaxgpt_config of a variant nanoGPT cannot express.
    bf16 = _jax_model(seed=2, dtype="bfloat16")
    path = jaxgpt.save_nanogpt_checkpoint(bf16, tmp_path / "jax", config={"dataset": "x", "lr": 1e-3},
                                          allow_non_nanogpt=True)
    assert set(torch.load(path, weights_only=True)) >= {"model", "model_args", "config", "jaxgpt_config"}
    model, _, info = jaxgpt.load_nanogpt_checkpoint(path)
    assert model.config == bf16.config and info["config"] == {"dataset": "x", "lr": 1e-3}


# ------------------------------------------------------------------------------------- the command lines


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")


def test_sample_main_refuses_crafted_files_in_process(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    payload, refused = _payloads(sentinel)["open"]
    _evil_ckpt(tmp_path / "run" / "ckpt.pt", payload)
    err = io.StringIO()
    assert sample.main([f"--init_from=nanogpt:{tmp_path / 'run'}", "--start=a"], out=io.StringIO(), err=err) == 2
    assert _one_line(err.getvalue()).startswith("sample.py: error: ") and refused in err.getvalue()
    assert not sentinel.exists()


@pytest.mark.slow
@pytest.mark.parametrize("which", ["ckpt.pt", "meta.pkl"])
def test_sample_cli_refuses_crafted_files(tmp_path, which):
    sentinel = tmp_path / "SENTINEL"
    payload, refused = _payloads(sentinel)["os.system"]
    run = tmp_path / "run"
    if which == "ckpt.pt":
        _evil_ckpt(run / "ckpt.pt", payload)
        _dump(run / "meta.pkl", _char_meta())
    else:
        _evil_meta(run / "meta.pkl", payload)
        torch.save(_nanogpt_ckpt(_reference(), compiled=False), run / "ckpt.pt")
    cmd = [sys.executable, str(ROOT / "sample.py"), f"--init_from=nanogpt:{run}", "--start=a", "--num_samples=1",
           "--max_new_tokens=2"]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    line = _one_line(r.stderr.strip())
    assert line.startswith("sample.py: error: ") and str(run / which) in line and refused in line
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not sentinel.exists()


@pytest.mark.slow
def test_train_cli_refuses_a_crafted_dataset_meta(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    payload, refused = _payloads(sentinel)["os.system"]
    data = tmp_path / "data"
    _data_dir(data)
    _evil_meta(data / "meta.pkl", payload)
    out = tmp_path / "out"
    r = _train(_env(), *TINY, f"--config.data.path={data}", f"--config.out_dir={out}", "--config.max_iters=2",
               "--config.compile_cache=False", timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and str(data / "meta.pkl") in line and refused in line, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not sentinel.exists() and not (out / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dtype O", "vocab_size 10**9", "id past the vocabulary"])
def test_train_cli_refuses_a_hostile_data_folder_in_one_line(tmp_path, kind):
    """A meta.pkl of plain values that once crashed the interpreter (dtype 'O' handed to np.memmap) or allocated
    without bound (vocab_size 10**9), and a train.bin with an id the model has no embedding for."""
    data = tmp_path / "data"
    _data_dir(data)
    meta = _char_meta()
    message = {"dtype O": "dtype 'O' is not one of", "vocab_size 10**9": "vocab_size 1000000000 is not an int",
               "id past the vocabulary": "train.bin holds 1 token id(s) outside the vocabulary [0, 5)"}[kind]
    if kind == "dtype O":
        meta["dtype"] = "O"
    elif kind == "vocab_size 10**9":
        meta["vocab_size"] = 10**9
    else:
        ids = np.fromfile(data / "train.bin", np.uint16)
        ids[200] = 7
        ids.tofile(data / "train.bin")
    _dump(data / "meta.pkl", meta)
    out = tmp_path / "out"
    r = _train(_env(), *TINY, f"--config.data.path={data}", f"--config.out_dir={out}", "--config.max_iters=2",
               "--config.compile_cache=False", timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    line = _one_line(r.stderr.strip())
    assert line.startswith("error: ") and message in line and "python -m jaxgpt.prepare" in line, line
    assert not out.exists()  # no lock, nothing written


# ------------------------------------------------------------------------------- a local GPT-2 folder

GPT2_CONFIG = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 8, "vocab_size": 5, "n_positions": 16}


def _gpt2_folder(path, weights: str, content) -> None:
    """A Hugging Face GPT-2 folder: config.json (GPT2_CONFIG unless `content` replaces it) and one weights file."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(content if weights == "config.json" else json.dumps(GPT2_CONFIG))
    if isinstance(content, bytes):
        (path / weights).write_bytes(content)
    elif weights != "config.json":
        torch.save(content, path / weights)


@pytest.mark.parametrize("kind", PAYLOADS)
def test_gpt2_loader_refuses_a_crafted_pytorch_model_bin(tmp_path, kind):
    sentinel = tmp_path / "SENTINEL"
    payload, refused = _payloads(sentinel)[kind]
    _gpt2_folder(tmp_path / "gpt2", "pytorch_model.bin", {"wte.weight": torch.zeros(5, 8), "x": payload})
    with pytest.raises(UnsafePickleError, match=refused) as e:
        jaxgpt.load_gpt2_pretrained(tmp_path / "gpt2")
    assert _one_line(str(e.value)) and "weights_only=False" not in str(e.value)
    assert not sentinel.exists()


@pytest.mark.parametrize("weights, content, message", [
    ("pytorch_model.bin", b"not a pickle at all", "cannot read the GPT-2 weights"),
    ("pytorch_model.bin", [1, 2], "holds a list, not a state dict"),
    ("model.safetensors", b"\xff" * 64, "cannot read the GPT-2 weights"),
    ("config.json", "[1, 2]", "holds a JSON list"),
    ("config.json", "{", "is not a JSON file"),
])
def test_gpt2_loader_says_in_one_line_what_is_wrong_with_a_folder(tmp_path, weights, content, message):
    _gpt2_folder(tmp_path / "gpt2", weights, content)
    with pytest.raises(ValueError, match=message) as e:
        jaxgpt.load_gpt2_pretrained(tmp_path / "gpt2")
    assert _one_line(str(e.value))


@pytest.mark.slow
@pytest.mark.parametrize("script", ["sample.py", "train.py"])
def test_cli_refuses_a_crafted_gpt2_folder_in_one_line(tmp_path, script, shakespeare_path):
    sentinel = tmp_path / "SENTINEL"
    payload, refused = _payloads(sentinel)["os.system"]
    folder = tmp_path / "gpt2"
    _gpt2_folder(folder, "pytorch_model.bin", {"wte.weight": torch.zeros(5, 8), "x": payload})
    if script == "sample.py":
        cmd = [sys.executable, str(ROOT / "sample.py"), f"--init_from=gpt2:{folder}", "--start=a"]
        r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    else:
        r = _train(_env(), *TINY, f"--config.data.path={tiny_text(tmp_path, shakespeare_path)}",
                   f"--config.out_dir={tmp_path / 'out'}", f"--config.init_from=gpt2:{folder}", timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    line = _one_line(r.stderr.strip())
    assert "error: " in line and refused in line and "weights_only=False" not in line and "Traceback" not in line
    assert not sentinel.exists() and not (tmp_path / "out").exists()


_meta_values = _plain | st.sampled_from(["O", "uint16", "float64", "V8", "(1000000000,)u2", "char", "hf"]) \
    | st.integers(-(10**12), 10**12) | st.dictionaries(st.integers(-2, 6), st.text(max_size=2), max_size=6)


@settings(max_examples=150, deadline=None)
@given(meta=st.dictionaries(st.sampled_from(["dtype", "vocab_size", "itos", "stoi", "tokenizer", "other"]),
                            _meta_values, max_size=5)
       | st.builds(lambda t: {"tokenizer": t}, st.dictionaries(st.sampled_from(["type", "chars", "json", "name"]),
                                                               _meta_values, max_size=3)))
def test_any_plain_meta_either_loads_or_is_one_data_error(tmp_path_factory, meta):
    """Whatever plain values a meta.pkl holds: the folder loads, or one DataError line says what is wrong; never
    another exception, a crash or an allocation its values ask for."""
    folder = tmp_path_factory.mktemp("meta")
    _data_dir(folder)
    _dump(folder / "meta.pkl", meta)
    try:
        ds = load_dataset(folder)
    except DataError as e:
        assert "\n" not in str(e) and str(folder) in str(e)
    else:
        assert ds.vocab_size >= 5  # the folder's ids (< 5) are all in its vocabulary
