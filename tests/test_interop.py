"""nanoGPT ckpt.pt and Hugging Face GPT-2 folders in and out of jaxgpt (jaxgpt/convert.py's interop half)."""

import json
import os
import pickle

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub, whatever transformers is asked

import jax
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import jaxgpt
from jaxgpt import optim
from jaxgpt.convert import load_gpt2_pretrained, load_init_from, load_nanogpt_checkpoint, save_nanogpt_checkpoint
from jaxgpt.layout import variable_value
from tests.reference.torch_gpt import GPT as TorchGPT
from tests.reference.torch_gpt import TorchGPTConfig, configure_optimizers

pytestmark = pytest.mark.usefixtures("torch_highest")  # these tests compare with PyTorch

NANO_ARGS = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=True, vocab_size=65, dropout=0.0)


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Random biases and LayerNorm gains too, so a wrongly mapped one shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _reference(seed: int = 0, **overrides) -> TorchGPT:
    torch.manual_seed(seed)
    ref = TorchGPT(TorchGPTConfig(**{**NANO_ARGS, **overrides}))
    _perturb(ref, seed)
    return ref.eval()


def _jax_model(seed: int = 0, **overrides) -> jaxgpt.GPT:
    """A jaxgpt GPT with random weights, made quickly on the torch side (eager JAX init is slow on CPU)."""
    torch_overrides = {k: v for k, v in overrides.items() if "dtype" not in k}
    return jaxgpt.from_torch_state_dict(
        jaxgpt.GPTConfig(**{**NANO_ARGS, **overrides}), _reference(seed, **torch_overrides).state_dict()
    )


def _tokens(vocab: int, T: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(2, T))


@nnx.jit
def _logits(model: jaxgpt.GPT, idx_BT: jax.Array) -> jax.Array:
    """One compiled forward (eager op-by-op dispatch is the slow part of these tests on a busy CPU)."""
    return model(idx_BT)


def _params(model: nnx.Module) -> dict:
    return {path: np.asarray(variable_value(v)) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _nanogpt_ckpt(ref: TorchGPT, *, compiled: bool, dataset: str = "shakespeare_char") -> dict:
    """A checkpoint dict exactly as nanoGPT's train.py saves it."""
    state_dict = ref.state_dict()  # includes the reference's persistent attn.bias mask buffers
    if compiled:
        state_dict = {"_orig_mod." + k: v for k, v in state_dict.items()}
    optimizer = configure_optimizers(ref, 0.1, 1e-3, (0.9, 0.99))
    return {
        "model": state_dict,
        "optimizer": optimizer.state_dict(),
        "model_args": dict(NANO_ARGS),
        "iter_num": 250,
        "best_val_loss": torch.tensor(1.4697),  # nanoGPT keeps it as a 0-d tensor
        "config": {"dataset": dataset, "batch_size": 64, "learning_rate": 1e-3},
    }


# ---------------------------------------------------------------------------------------------- nanoGPT


@pytest.mark.parametrize("compiled", [False, True], ids=["plain", "orig_mod_prefix"])
def test_nanogpt_checkpoint_loads_with_same_logits(tmp_path, compiled):
    ref = _reference()
    out_dir = tmp_path / "out-shakespeare-char"
    out_dir.mkdir()
    torch.save(_nanogpt_ckpt(ref, compiled=compiled), out_dir / "ckpt.pt")

    model, tokenizer, info = jaxgpt.load_nanogpt_checkpoint(out_dir)

    idx = _tokens(NANO_ARGS["vocab_size"], NANO_ARGS["block_size"])
    with torch.no_grad():
        expected, _ = ref(torch.from_numpy(idx))
    np.testing.assert_allclose(np.asarray(_logits(model, idx)), expected.numpy(), rtol=1e-5, atol=1e-5)
    assert model.config == jaxgpt.GPTConfig(**NANO_ARGS)
    assert tokenizer is None  # no meta.pkl anywhere near
    assert info["iter_num"] == 250
    assert info["best_val_loss"] == pytest.approx(1.4697)
    assert info["config"]["dataset"] == "shakespeare_char"
    assert info["model_args"] == NANO_ARGS
    via_spec, _, _ = load_init_from(f"nanogpt:{out_dir}", dropout=0.1)
    assert via_spec.config == jaxgpt.GPTConfig(**{**NANO_ARGS, "dropout": 0.1})
    _bits_equal(model, via_spec)


def _write_nanogpt_meta(path, text: str) -> None:
    """nanoGPT's data/shakespeare_char/prepare.py meta.pkl: vocab_size, itos, stoi."""
    chars = sorted(set(text))
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(meta, f)


@pytest.mark.parametrize("where", ["next_to_ckpt", "dataset_folder"])
def test_nanogpt_meta_is_found_and_decodes(tmp_path, shakespeare_path, where):
    text = shakespeare_path.read_text()
    repo = tmp_path / "nanoGPT"
    out_dir = repo / "out-shakespeare-char"
    out_dir.mkdir(parents=True)
    torch.save(_nanogpt_ckpt(_reference(), compiled=False), out_dir / "ckpt.pt")
    meta = out_dir / "meta.pkl" if where == "next_to_ckpt" else repo / "data" / "shakespeare_char" / "meta.pkl"
    _write_nanogpt_meta(meta, text)

    _, tokenizer, info = load_nanogpt_checkpoint(out_dir / "ckpt.pt")

    assert info["meta_path"] == meta
    assert tokenizer.vocab_size == 65
    with open(meta, "rb") as f:
        stoi = pickle.load(f)["stoi"]
    sample = text[:500]
    np.testing.assert_array_equal(tokenizer.encode(sample), [stoi[c] for c in sample])
    assert tokenizer.decode(tokenizer.encode(sample)) == sample


def _bits_equal(a: nnx.Module, b: nnx.Module) -> None:
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for path in pa:
        assert pa[path].dtype == pb[path].dtype, path
        np.testing.assert_array_equal(pa[path].view(np.uint8), pb[path].view(np.uint8), err_msg=str(path))


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"bias": False, "param_dtype": "bfloat16", "dtype": "bfloat16"},
        {"activation": "relu", "tie_embeddings": False, "norm_position": "post", "attention": "heads"},
    ],
    ids=["nanogpt", "nobias_bf16", "lecture_variant"],
)
def test_round_trip_through_ckpt_is_bitwise(tmp_path, overrides):
    config = jaxgpt.GPTConfig(**{**NANO_ARGS, **overrides})
    model = _jax_model(seed=4, **overrides)
    is_nanogpt = "activation" not in overrides
    path = save_nanogpt_checkpoint(
        model, tmp_path / "run", iter_num=42, best_val_loss=1.25, allow_non_nanogpt=not is_nanogpt
    )
    assert path == tmp_path / "run" / "ckpt.pt"

    loaded, _, info = load_nanogpt_checkpoint(path)

    assert loaded.config == config
    _bits_equal(model, loaded)
    assert (info["iter_num"], info["best_val_loss"]) == (42, 1.25)


def test_non_nanogpt_architecture_needs_opt_in(tmp_path):
    model = _jax_model(activation="relu")
    with pytest.raises(ValueError, match="nanoGPT's model cannot express .*activation"):
        save_nanogpt_checkpoint(model, tmp_path / "ckpt.pt")
    assert not (tmp_path / "ckpt.pt").exists()


def test_saved_ckpt_loads_the_way_nanogpt_sample_and_resume_do(tmp_path):
    """nanoGPT's sample.py: GPTConfig(**model_args), strip _orig_mod., strict load; train.py resume also
    loads `optimizer` into its configure_optimizers AdamW."""
    model = _jax_model(seed=5)
    params = nnx.state(model, nnx.Param)
    tx = optim.adamw(1e-3, weight_decay=0.1)
    opt_state = tx.init(params)
    rng = np.random.default_rng(1)
    grads = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)

    @jax.jit
    def step(params, opt_state):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for _ in range(3):
        params, opt_state = step(params, opt_state)
    nnx.update(model, params)
    path = save_nanogpt_checkpoint(model, tmp_path / "ckpt.pt", config={"dataset": "x"}, optimizer=opt_state)

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert set(checkpoint) >= {"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"}
    assert set(checkpoint["model_args"]) == set(NANO_ARGS)
    assert not any(k.endswith(".attn.bias") for k in checkpoint["model"])  # flash-attention nanoGPT has none
    assert checkpoint["model"]["lm_head.weight"].data_ptr() == checkpoint["model"]["transformer.wte.weight"].data_ptr()

    ref = TorchGPT(TorchGPTConfig(**checkpoint["model_args"]))
    result = ref.load_state_dict(checkpoint["model"], strict=False)
    assert result.unexpected_keys == []
    assert all(k.endswith(".attn.bias") for k in result.missing_keys)  # the reference's own mask buffers
    idx = _tokens(NANO_ARGS["vocab_size"], NANO_ARGS["block_size"])
    with torch.no_grad():
        logits, _ = ref.eval()(torch.from_numpy(idx))
    np.testing.assert_allclose(logits.numpy(), np.asarray(_logits(model, idx)), rtol=1e-5, atol=1e-5)

    torch_opt = configure_optimizers(ref, 0.1, 1e-3, (0.9, 0.95))
    torch_opt.load_state_dict(checkpoint["optimizer"])
    adam = jaxgpt.convert.nanogpt.adam_state(opt_state)
    c_fc = ref.transformer.h[1].mlp.c_fc.weight
    np.testing.assert_array_equal(
        torch_opt.state[c_fc]["exp_avg"].numpy(), np.asarray(variable_value(adam.mu["h"][1]["mlp"]["c_fc"]["kernel"])).T
    )
    np.testing.assert_array_equal(
        torch_opt.state[ref.transformer.ln_f.bias]["exp_avg_sq"].numpy(),
        np.asarray(variable_value(adam.nu["ln_f"]["bias"])),
    )
    assert float(torch_opt.state[c_fc]["step"]) == 3


def test_nanogpt_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="is not 'nanogpt:PATH', 'gpt2:PATH' or 'hf:PATH'"):
        load_init_from("resume")
    with pytest.raises(FileNotFoundError, match="no nanoGPT checkpoint at .*out_dir"):
        load_nanogpt_checkpoint(tmp_path / "nowhere")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "ckpt.pt").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_nanogpt_checkpoint(tmp_path / "garbage")
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"not a nanoGPT checkpoint: it has no \['model_args'\]"):
        load_nanogpt_checkpoint(tmp_path / "other.pt")
    ckpt = _nanogpt_ckpt(_reference(), compiled=False)
    ckpt["model_args"]["n_embd"] = 64
    torch.save(ckpt, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="has shape .* but the model expects"):
        load_nanogpt_checkpoint(tmp_path / "wrong.pt")
    model = _jax_model()
    path = save_nanogpt_checkpoint(model, tmp_path / "run")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_nanogpt_checkpoint(_jax_model(seed=1), path)
    assert path.read_bytes() == before


# ---------------------------------------------------------------------------------------------- GPT-2


def _hf_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=64))
    _perturb(hf, seed)
    return hf.eval()


def _hf_logits(hf, idx: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.from_numpy(idx)).logits.numpy()


def test_gpt2_safetensors_folder_loads_with_same_logits(tmp_path):
    hf = _hf_gpt2()
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()

    model = jaxgpt.load_gpt2_pretrained(tmp_path)

    assert model.config.activation == "gelu_tanh" and model.config.tie_embeddings and model.config.bias
    assert (model.config.block_size, model.config.vocab_size) == (64, 97)
    idx = _tokens(97, 64)
    np.testing.assert_allclose(np.asarray(_logits(model, idx)), _hf_logits(hf, idx), rtol=1e-4, atol=1e-4)

    via_spec, tokenizer, info = load_init_from(f"gpt2:{tmp_path}")
    assert tokenizer is None and info["iter_num"] == 0  # save_pretrained writes no tokenizer.json
    _bits_equal(model, via_spec)

    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _bits_equal(model, jaxgpt.load_gpt2_pretrained(tmp_path / "sharded"))

    cropped = jaxgpt.load_gpt2_pretrained(tmp_path, block_size=16)  # nanoGPT's crop_block_size
    assert variable_value(cropped.wpe.embedding).shape == (16, 32)
    np.testing.assert_allclose(
        np.asarray(_logits(cropped, idx[:, :16])), _hf_logits(hf, idx[:, :16]), rtol=1e-4, atol=1e-4
    )


def test_gpt2_old_style_pytorch_model_bin(tmp_path):
    """The hub's original gpt2 files: no `transformer.` prefix, attn.bias / masked_bias buffers."""
    hf = _hf_gpt2(seed=1)
    hf.config.to_json_file(tmp_path / "config.json")
    old = {}
    for name, value in hf.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied; the old files hold wte only
        old[name.removeprefix("transformer.")] = value.clone()
    for i in range(2):
        old[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
        old[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(old, tmp_path / "pytorch_model.bin")

    model = load_gpt2_pretrained(tmp_path)

    idx = _tokens(97, 33)
    np.testing.assert_allclose(np.asarray(_logits(model, idx)), _hf_logits(hf, idx), rtol=1e-4, atol=1e-4)


def test_not_a_gpt2_folder_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        jaxgpt.load_gpt2_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        jaxgpt.load_gpt2_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    with pytest.raises(ValueError, match="model_type='llama'"):
        jaxgpt.load_gpt2_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(ValueError, match=r"lacks GPT-2 fields \['n_head', 'n_embd', 'vocab_size', 'n_positions'\]"):
        jaxgpt.load_gpt2_pretrained(tmp_path)
    _hf_gpt2().config.to_json_file(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="none of the GPT-2 weight files .*model.safetensors"):
        jaxgpt.load_gpt2_pretrained(tmp_path)
