"""nanoGPT's CPU recipe for shakespeare_char (README "I only have a macbook"): a small model, 2000 steps."""

from jaxgpt.config import base_config


def get_config():
    c = base_config()
    c.out_dir = "out-shakespeare-char-cpu"
    c.eval_interval = 250
    c.eval_iters = 20
    c.log_interval = 1
    c.always_save_checkpoint = False
    c.batch_size = 12
    c.max_iters = 2000
    c.learning_rate = 1e-3
    c.lr_decay_iters = 2000
    c.min_lr = 1e-4
    c.beta2 = 0.99
    c.warmup_iters = 100
    c.steps_per_call = 125  # two compiled calls per evaluation interval
    c.sample_tokens = 200  # the end-of-run sample: about a second on a CPU (0 skips it)
    c.model.block_size = 64
    c.model.n_layer = 4
    c.model.n_head = 4
    c.model.n_embd = 128
    c.model.dropout = 0.0
    c.model.bias = False
    # The lecture's attention (an explicit masked softmax): on a CPU its step is faster than
    # jax.nn.dot_product_attention's (benchmarks/RESULTS.md), with the same numbers.
    c.model.attention_impl = "reference"
    # Two CPU devices, each training half of every batch on its own core: a shorter step than one device's on a
    # 2-core host (benchmarks/RESULTS.md). Results equal one device's to float32 rounding (the gradient's sum order).
    c.mesh.cpu_devices = 2
    return c
