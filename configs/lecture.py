"""The lecture's final gpt.py: ReLU, a list of attention heads, an untied head, constant lr 3e-4."""

from jaxgpt.config import base_config


def get_config():
    c = base_config()
    c.out_dir = "out-lecture"
    c.batch_size = 64
    c.max_iters = 5000
    c.eval_interval = 500
    c.eval_iters = 200
    c.log_interval = 10
    c.learning_rate = 3e-4
    c.decay_lr = False
    c.warmup_iters = 0
    c.weight_decay = 0.01  # torch.optim.AdamW's default, which the lecture uses
    c.beta1 = 0.9
    c.beta2 = 0.999
    c.grad_clip = 0.0  # the lecture does not clip
    c.steps_per_call = 50
    c.seed = 1337
    c.model.block_size = 256
    c.model.n_layer = 6
    c.model.n_head = 6
    c.model.n_embd = 384
    c.model.dropout = 0.2
    c.model.bias = True
    c.model.activation = "relu"
    c.model.attention = "heads"
    c.model.tie_embeddings = False
    return c
