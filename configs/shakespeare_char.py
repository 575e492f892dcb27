"""nanoGPT's train_shakespeare_char: a 10.7M-parameter character GPT on tiny Shakespeare (a GPU job)."""

from jaxgpt.config import base_config


def get_config():
    c = base_config()
    c.out_dir = "out-shakespeare-char"
    c.eval_interval = 250  # evaluate often: this model overfits
    c.eval_iters = 200
    c.log_interval = 10
    c.always_save_checkpoint = False  # 'latest' only when val improves (and at the end)
    c.batch_size = 64
    c.max_iters = 5000
    c.learning_rate = 1e-3  # a small network can take a larger step
    c.lr_decay_iters = 5000  # usually equal to max_iters
    c.min_lr = 1e-4  # learning_rate / 10
    c.beta2 = 0.99  # a little larger: few tokens per step
    c.warmup_iters = 100
    c.steps_per_call = 50
    c.model.block_size = 256  # context of up to 256 previous characters
    c.model.n_layer = 6
    c.model.n_head = 6
    c.model.n_embd = 384
    c.model.dropout = 0.2
    c.model.bias = False
    return c
