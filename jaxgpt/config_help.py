"""One line of help for every config key, and `train.py --help`'s list of them with their defaults.

`KEY_HELP` holds a line for each key of `jaxgpt.config.base_config()` (a test keeps the two in step); `describe`
lists a config's keys as `--config.KEY=DEFAULT  what it does`, the defaults being the given config's.
"""

from __future__ import annotations

import ml_collections

KEY_HELP: dict[str, str] = {
    # I/O
    "out_dir": "folder for checkpoints, metrics.jsonl and loss.png",
    "eval_interval": "evaluate (and checkpoint) every this many steps",
    "log_interval": "record the training loss in metrics.jsonl every this many steps",
    "eval_iters": "batches per split averaged by each evaluation",
    "eval_only": "evaluate once and exit",
    "always_save_checkpoint": "also save 'latest' at evaluations where the val loss did not improve",
    "resume": "continue the run in out_dir from its newest whole checkpoint (nanoGPT's init_from='resume')",
    "init_from": "'' from scratch, 'nanogpt:PATH' (a nanoGPT out_dir or ckpt.pt) or 'gpt2:PATH' (a local HF folder)",
    "overwrite": "allow starting afresh in an out_dir that already holds a run",
    "take_over_lock": "take over out_dir's lock even if another host holds it (only when that run is dead)",
    "seed": "seed of the initial weights, the batches and dropout",
    "progress": "show the progress bar",
    "plot": "redraw out_dir/loss.png at each evaluation",
    "sample_tokens": "tokens of generated text printed at the end (0: none)",
    "compile_cache": "keep compiled programs in $JAXGPT_CACHE/xla, so reruns and resumes start faster",
    # optimisation
    "batch_size": "sequences per micro-step, over all devices",
    "grad_accum_steps": "micro-steps accumulated per optimizer step (nanoGPT's gradient_accumulation_steps)",
    "max_iters": "optimizer steps to train for",
    "learning_rate": "AdamW's peak learning rate",
    "weight_decay": "AdamW's weight decay (matrices only)",
    "beta1": "AdamW's beta1",
    "beta2": "AdamW's beta2",
    "grad_clip": "clip the gradient's global norm to this (0: no clipping)",
    "decay_lr": "warm up, then cosine-decay the learning rate to min_lr",
    "warmup_iters": "steps of linear warm-up",
    "lr_decay_iters": "step at which the cosine decay reaches min_lr",
    "min_lr": "the learning rate after lr_decay_iters",
    "optimizer": "'adamw' (nanoGPT's) or 'muon' (Muon for the blocks' weight matrices, AdamW for the rest)",
    "muon_learning_rate": "Muon's peak learning rate, on learning_rate's warm-up and decay (min_lr scaled alike)",
    "muon_momentum": "Muon's momentum (beta)",
    "muon_nesterov": "Muon's Nesterov momentum",
    "muon_ns_steps": "Newton-Schulz iterations that orthogonalise each Muon update",
    "muon_weight_decay": "Muon's decoupled weight decay, times its learning rate",
    "steps_per_call": "optimizer steps per compiled call; more removes per-step dispatch cost",
    "skip_nonfinite": "a step with a NaN/inf loss or gradient: False stops the run, True skips its update",
    "matmul_precision": "float32 matmul precision: '' JAX's default, 'highest' full float32 everywhere",
    # model
    "model.name": "'gpt' or 'bigram' (the lecture's first model)",
    "model.block_size": "context length in tokens",
    "model.vocab_size": "embedding rows; None: the dataset's vocabulary size",
    "model.n_layer": "transformer blocks",
    "model.n_head": "attention heads per block",
    "model.n_embd": "embedding width (a multiple of n_head)",
    "model.dropout": "dropout rate while training, in [0, 1)",
    "model.bias": "biases in the Linear and LayerNorm layers",
    "model.activation": "'gelu', 'gelu_tanh', 'relu' or 'relu2' (relu(x)**2)",
    "model.tie_embeddings": "the output layer shares the token embedding's matrix",
    "model.pos_encoding": "'learned' (a table), 'sinusoidal' or 'rotary' (RoPE: queries and keys rotated)",
    "model.attention": "'fused' (nanoGPT's one c_attn) or 'heads' (the lecture's list of heads)",
    "model.norm_position": "'pre' (GPT-2) or 'post' (the Transformer paper)",
    "model.ln_eps": "the epsilon of every LayerNorm or RMSNorm (qk_norm's too)",
    "model.norm": "'layernorm' (nanoGPT) or 'rmsnorm' (x / rms(x), no weights) for every norm of the stream",
    "model.qk_norm": "RMSNorm (no weights) on each head's queries and keys before the scores",
    "model.zero_init_proj": "the attention's and MLP's output projections start at zero",
    "model.logit_softcap": "> 0: logits = cap * tanh(logits / cap); 0: off",
    "model.dtype": "computation dtype ('bfloat16' for mixed precision)",
    "model.param_dtype": "parameter dtype",
    "model.attention_impl": "'xla', 'cudnn' (flash attention on GPU) or 'reference'",
    "model.remat": "recompute activations in the backward pass (less memory, more compute)",
    "model.scan_layers": "one compiled block scanned over the layers (compile time flat in depth)",
    # data
    "data.path": "a text file or a nanoGPT data folder; '' is tiny Shakespeare ($JAXGPT_SHAKESPEARE or downloaded)",
    "data.train_fraction": "leading share of a text file used for training, the rest validates",
    "data.on_device": "keep the tokens on the accelerator and draw batches inside the compiled step",
    # devices
    "mesh.data": "data-parallel size; -1: all devices left after fsdp",
    "mesh.fsdp": "devices that split parameters and optimizer state (FSDP); 1: none",
    "mesh.cpu_devices": "> 0: run JAX's CPU backend as this many devices; 0: JAX's default",
}


def leaf_keys(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, object]:
    """Every leaf of `config` as {'model.n_layer': 12, ...}, in the config's order."""
    out: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(leaf_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def describe(config: ml_collections.ConfigDict) -> str:
    """`config`'s keys, one a line: `--config.KEY=DEFAULT  what it does` (sorted, the model's and data's last)."""
    keys = leaf_keys(config)
    lines = []
    for key in sorted(keys, key=lambda k: (k.count("."), k)):
        value = keys[key]
        shown = f"'{value}'" if isinstance(value, str) else str(value)
        lines.append(f"  --config.{key}={shown}".ljust(42) + f"  {KEY_HELP.get(key, '')}".rstrip())
    return "\n".join(lines)
