"""Sampling: the lecture's `jaxgpt.sampling.generate` equals PyTorch's generate, and the compiled key/value-cache
sampler `jaxgpt.decode` draws the lecture loop's tokens for the same key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxgpt
from jaxgpt import decode, sampling
from tests.reference import torch_gpt

pytestmark = pytest.mark.usefixtures("torch_highest")  # these tests compare with PyTorch

VOCAB, BLOCK = 13, 16


def sharp_model(**overrides) -> jaxgpt.GPT:
    """A small random GPT with weights large enough that its logits are far from uniform.

    With nanoGPT's 0.02 init, greedy decoding of a random model repeats one token; larger weights
    give varied text, so the equalities below test something.
    """
    config = jaxgpt.GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=2, n_embd=16, **overrides)
    model = jaxgpt.GPT(config, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    new = [
        jnp.ones_like(x) if x.ndim == 1 and "scale" in str(i) else 0.4 * jax.random.normal(k, x.shape)
        for i, (x, k) in enumerate(zip(leaves, keys))
    ]
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return model


PROMPT = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
LONG_PROMPT = np.array([[1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 8, 7, 6, 5, 4, 3, 2, 1]], np.int32)


def compiles(events: list[str]) -> int:
    """How many programs were compiled (each is lowered once; a persistent-cache hit is lowered too). The caches'
    zeros are made op by op, compiled once per shape: tests make them first (`model.init_cache`) to leave them out."""
    return events.count("/jax/core/compile/jaxpr_to_mlir_module_duration")


@pytest.mark.parametrize(
    "overrides",
    [
        dict(attention="fused", pos_encoding="learned"),
        dict(attention="heads", pos_encoding="learned"),
        dict(attention="fused", pos_encoding="sinusoidal", norm_position="post"),
        dict(attention="heads", pos_encoding="sinusoidal"),
        dict(attention="fused", scan_layers=True),
    ],
)
@pytest.mark.parametrize("n", [BLOCK + 7, BLOCK + 300])  # cached steps then the window; the window loop throughout
def test_greedy_fast_path_equals_the_lecture_loop_past_context(overrides, n):
    model = sharp_model(**overrides)
    fast = decode.generate(model, LONG_PROMPT, n, key=jax.random.key(0), temperature=0)
    lecture = sampling.generate(model, LONG_PROMPT, n, key=jax.random.key(0), temperature=0)
    assert fast.shape == (2, 9 + n)
    np.testing.assert_array_equal(fast[:, :9], LONG_PROMPT)
    np.testing.assert_array_equal(fast, lecture)


@pytest.mark.parametrize("n", [BLOCK - 3, BLOCK + 20, 2 * BLOCK + 5])  # cached only; cached then window; window only
@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.8, top_k=5), dict(temperature=1.3, top_p=0.7)])
def test_sampled_fast_path_equals_the_lecture_loop_for_the_same_key(n, kw):
    model = sharp_model()
    fast = decode.generate(model, PROMPT, n, key=jax.random.key(7), **kw)
    np.testing.assert_array_equal(fast, sampling.generate(model, PROMPT, n, key=jax.random.key(7), **kw))
    np.testing.assert_array_equal(fast, decode.generate(model, PROMPT, n, key=jax.random.key(7), **kw))
    assert (fast != decode.generate(model, PROMPT, n, key=jax.random.key(8), **kw)).any()


def test_a_sample_mostly_past_the_context_compiles_one_program(jax_compile_events):
    """Past twice the context (the CPU recipe's end-of-run sample), no prefill and no cached loop is compiled: the
    window loop runs from the first token, right-padded until the context fills."""
    model = sharp_model()
    prompt = np.array([[3], [1], [4], [1]], np.int32)  # 4 rows: shapes no other test compiles
    key = jax.random.key(4)
    with jax_compile_events() as events:
        got = decode.generate(model, prompt, 2 * BLOCK, key=key, top_k=6)
    assert compiles(events) == 1
    np.testing.assert_array_equal(got, sampling.generate(model, prompt, 2 * BLOCK, key=key, top_k=6))
    model.init_cache(4)
    with jax_compile_events() as events:  # at twice the context the cache serves again: cached loop, then window
        decode.generate(model, prompt, 2 * BLOCK - 1, key=key, top_k=6)
    assert compiles(events) == 2


def test_one_token_prompt_compiles_no_prefill(jax_compile_events):
    """A one-token prompt (the end-of-run sample's) is fed by the first decode step into an empty cache: the cached
    loop is the one program compiled; a longer prompt adds its prefill."""
    model = sharp_model()
    prompt = np.array([[3], [1], [4], [1], [5]], np.int32)  # 5 rows: shapes no other test compiles
    key = jax.random.key(4)
    model.init_cache(5)
    with jax_compile_events() as events:
        got = decode.generate(model, prompt, BLOCK - 4, key=key, top_k=6)
    assert compiles(events) == 1
    np.testing.assert_array_equal(got, sampling.generate(model, prompt, BLOCK - 4, key=key, top_k=6))
    with jax_compile_events() as events:  # the same buffer and settings: the cached loop is reused
        decode.generate(model, np.concatenate([prompt, prompt], axis=1), BLOCK - 5, key=key, top_k=6)
    assert compiles(events) == 1


@pytest.mark.parametrize("attention", ["fused", "heads"])
def test_decode_logits_equal_the_full_forward(attention):
    model = sharp_model(attention=attention)
    idx = jnp.asarray(jax.random.randint(jax.random.key(2), (2, BLOCK), 0, VOCAB), jnp.int32)
    full_BTV = model(idx)
    prompt = 5
    logits_BTV, cache = model.decode(idx[:, :prompt], model.init_cache(2), 0)
    np.testing.assert_allclose(logits_BTV, full_BTV[:, :prompt], atol=1e-5, rtol=1e-5)
    # Re-feeding the prompt's last token overwrites its slot with the same key and value.
    for pos in range(prompt - 1, BLOCK):
        logits_B1V, cache = model.decode(idx[:, pos : pos + 1], cache, jnp.int32(pos))
        np.testing.assert_allclose(logits_B1V[:, 0], full_BTV[:, pos], atol=1e-5, rtol=1e-5)


def test_bfloat16_decode_matches_the_full_forward():
    # A bf16 model decodes with a bf16 cache; its cached logits stay those of its own forward pass.
    config = jaxgpt.GPTConfig(vocab_size=37, block_size=16, n_layer=2, n_head=4, n_embd=32, dtype="bfloat16")
    model = jaxgpt.GPT(config, rngs=nnx.Rngs(0))
    idx = jnp.asarray(jax.random.randint(jax.random.key(2), (2, 16), 0, 37), jnp.int32)
    full_BTV = model(idx)
    cache = model.init_cache(2)
    assert cache[0].k_NSD.dtype == jnp.bfloat16
    _, cache = model.decode(idx[:, :5], cache, 0)
    for pos in range(4, 16):
        logits_B1V, cache = model.decode(idx[:, pos : pos + 1], cache, jnp.int32(pos))
        np.testing.assert_allclose(logits_B1V[:, 0], full_BTV[:, pos], atol=1e-2)  # bf16 rounding


def test_stream_yields_the_same_tokens_as_generate():
    model = sharp_model()
    n = BLOCK + 9  # crosses from the cached steps into the sliding window inside a chunk
    full = decode.generate(model, PROMPT, n, key=jax.random.key(3), temperature=0.9, top_k=5)
    chunks = list(
        decode.generate_stream(model, PROMPT, n, key=jax.random.key(3), temperature=0.9, top_k=5, chunk_size=7)
    )
    assert [c.shape[1] for c in chunks] == [7, 7, 7, 4]
    np.testing.assert_array_equal(np.concatenate([PROMPT, *chunks], axis=1), full)


def test_prepare_generate_compiles_everything_generate_then_runs(jax_compile_events):
    """Compiled ahead on other parameters of the same shapes (as train.py does during training), a sample
    past the context (prefill, cached steps, then the sliding window) compiles nothing, and is unchanged."""
    model = sharp_model()
    graphdef, params = nnx.split(model)
    zeros = nnx.merge(graphdef, jax.tree.map(jnp.zeros_like, params))
    prompt = np.array([[3, 1, 4, 1, 5]] * 3, np.int32)  # 3 rows: shapes no other test compiles
    expected = sampling.generate(model, prompt, BLOCK + 6, key=jax.random.key(2), top_k=4)
    model.init_cache(3)
    with jax_compile_events() as events:
        decode.prepare_generate(zeros, 5, BLOCK + 6, key=jax.random.key(0), batch_size=3, top_k=4)
    assert compiles(events) == 3
    with jax_compile_events() as events:
        got = decode.generate(model, prompt, BLOCK + 6, key=jax.random.key(2), top_k=4)
    assert events == []
    np.testing.assert_array_equal(got, expected)


def test_prompt_longer_than_block_size_and_batch_rows_are_independent():
    model = sharp_model(pos_encoding="sinusoidal")
    idx = np.asarray(jax.random.randint(jax.random.key(4), (3, BLOCK + 5), 0, VOCAB), np.int32)
    fast = decode.generate(model, idx, 12, key=jax.random.key(0), temperature=0)
    np.testing.assert_array_equal(fast, sampling.generate(model, idx, 12, key=jax.random.key(0), temperature=0))
    # Each row is continued on its own: reordering the batch reorders the output.
    flipped = decode.generate(model, idx[::-1], 12, key=jax.random.key(0), temperature=0)
    np.testing.assert_array_equal(flipped, fast[::-1])


def test_filter_logits_keeps_exactly_the_top_k_and_the_nucleus():
    probs = np.array([0.05, 0.4, 0.02, 0.3, 0.15, 0.08], np.float32)
    logits = jnp.log(jnp.asarray(probs))[None]
    kept_k = np.isfinite(np.asarray(sampling.filter_logits(logits, top_k=3)))[0]
    np.testing.assert_array_equal(kept_k, probs >= 0.15)
    # top_p=0.75: 0.4 + 0.3 = 0.7 < 0.75, so 0.15 joins; 0.85 >= 0.75 stops there.
    kept_p = np.isfinite(np.asarray(sampling.filter_logits(logits, top_p=0.75)))[0]
    np.testing.assert_array_equal(kept_p, probs >= 0.15)
    kept_p = np.isfinite(np.asarray(sampling.filter_logits(logits, top_p=0.7)))[0]
    np.testing.assert_array_equal(kept_p, probs >= 0.3)
    kept_top = np.isfinite(np.asarray(sampling.filter_logits(logits, top_p=0.01)))[0]
    np.testing.assert_array_equal(kept_top, probs == 0.4)  # the most likely token always stays


@pytest.mark.parametrize(
    "kw, allowed",
    [
        (dict(top_k=2, temperature=1.5), {1, 3}),  # top-k does not depend on the temperature
        (dict(top_p=0.6, temperature=1.0), {1, 3}),  # 0.4 < 0.6, 0.4 + 0.3 >= 0.6
        (dict(top_p=0.6, temperature=0.25), {1}),  # sharpened first: 0.4 alone is > 0.6 of the mass
    ],
)
def test_sampling_never_emits_a_filtered_token(kw, allowed):
    probs = np.array([0.05, 0.4, 0.02, 0.3, 0.15, 0.08], np.float32)
    logits_BV = jnp.tile(jnp.log(jnp.asarray(probs))[None], (4000, 1))
    drawn = np.asarray(sampling.sample_next(logits_BV, jax.random.key(0), **kw))
    assert set(drawn.tolist()) == allowed  # every allowed token appears, nothing else does


@pytest.mark.parametrize("n", [4, 40])  # within the bigram's block_size of 8; past it
def test_bigram_generate_respects_top_k_row_by_row_on_both_paths(n):
    model = jaxgpt.BigramLanguageModel(VOCAB, rngs=nnx.Rngs(0))
    out = sampling.generate(model, PROMPT, n, key=jax.random.key(5), top_k=2, temperature=2.0)
    np.testing.assert_array_equal(decode.generate(model, PROMPT, n, key=jax.random.key(5), top_k=2, temperature=2.0),
                                  out)
    table = np.asarray(model.token_embedding_table.embedding[...])
    top2 = np.argsort(table, axis=1)[:, -2:]
    for row in out:
        for prev, nxt in zip(row[2:-1], row[3:]):
            assert nxt in top2[prev]
    assert out.shape == (2, 3 + n)


@pytest.mark.parametrize("kw", [dict(top_k=3), dict(top_p=0.5)])
def test_cached_gpt_samples_only_allowed_tokens(kw):
    model = sharp_model()
    out = decode.generate(model, PROMPT, BLOCK - 3, key=jax.random.key(6), temperature=0.7, **kw)
    logits_BTV = np.asarray(model(jnp.asarray(out[:, :-1])))[:, 2:] / 0.7  # the logits each new token saw
    new_BT = out[:, 3:]
    chosen = np.take_along_axis(logits_BTV, new_BT[..., None], axis=-1)[..., 0]
    if "top_k" in kw:
        kth = np.sort(logits_BTV, axis=-1)[..., -kw["top_k"]]
        assert (chosen >= kth - 1e-4).all()
    else:
        probs = np.exp(logits_BTV - logits_BTV.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        p_chosen = np.take_along_axis(probs, new_BT[..., None], axis=-1)[..., 0]
        mass_above = np.where(probs > p_chosen[..., None], probs, 0).sum(-1)  # strictly more likely tokens
        assert (mass_above < kw["top_p"] + 1e-4).all()


@pytest.mark.parametrize("attention", ["fused", "heads"])
def test_reference_matches_pytorch_greedy_generate(attention):
    model = sharp_model(attention=attention, pos_encoding="learned")
    config = model.config
    torch_model = torch_gpt.GPT(
        torch_gpt.TorchGPTConfig(
            vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=2, n_embd=16, attention=attention
        )
    ).eval()
    state = {k: torch.from_numpy(np.array(v)) for k, v in jaxgpt.to_torch_state_dict(model).items()}
    missing, unexpected = torch_model.load_state_dict(state, strict=False)
    assert all(k.endswith("attn.bias") for k in missing) and not unexpected
    n = BLOCK + 20
    theirs = torch_gpt.generate(torch_model, torch.from_numpy(PROMPT).long(), n, top_k=1).numpy()  # top_k=1: greedy
    ours = sampling.generate(model, PROMPT, n, key=jax.random.key(0), temperature=0)
    np.testing.assert_array_equal(ours, theirs)
    assert config.block_size < ours.shape[1]


@pytest.mark.parametrize("generate", [sampling.generate, decode.generate])
def test_max_new_tokens_zero_returns_the_prompt(generate):
    np.testing.assert_array_equal(generate(sharp_model(), PROMPT, 0, key=jax.random.key(0)), PROMPT)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(idx=np.array([1, 2], np.int32)), "idx"),
        (dict(idx=np.array([[1, VOCAB]], np.int32)), "outside"),
    ],
)
@pytest.mark.parametrize("generate", [sampling.generate, decode.generate, decode.generate_stream])
def test_bad_arguments_raise_one_clear_error(kw, match, generate):
    args = dict(idx=PROMPT, max_new_tokens=4)
    args.update(kw)
    idx, n = args.pop("idx"), args.pop("max_new_tokens")
    with pytest.raises(ValueError, match=match):
        next(iter(generate(sharp_model(), idx, n, key=jax.random.key(0), **args)))
