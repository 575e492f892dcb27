"""The lecture's bigram.py: each character predicts the next from a 65 x 65 table."""

from jaxgpt.config import base_config


def get_config():
    c = base_config()
    c.out_dir = "out-bigram"
    c.batch_size = 32
    c.max_iters = 3000
    c.eval_interval = 300
    c.eval_iters = 200
    c.log_interval = 10
    c.learning_rate = 1e-2
    c.decay_lr = False
    c.warmup_iters = 0
    c.weight_decay = 0.01  # torch.optim.AdamW's default
    c.beta2 = 0.999
    c.grad_clip = 0.0
    c.steps_per_call = 100
    c.sample_tokens = 500
    c.model.name = "bigram"
    c.model.block_size = 8
    return c
