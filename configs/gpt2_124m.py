"""GPT-2 124M on OpenWebText, nanoGPT's train_gpt2.py: ~0.5M tokens per optimizer step, 600k steps.

Prepare the data first (nanoGPT's data/openwebtext/prepare.py or `python -m jaxgpt.prepare`) and point
data.path at the directory holding train.bin / val.bin. The global batch is split over all devices
(mesh.data=-1): batch_size must be divisible by the device count (e.g. 16 x 30 on 8 chips keeps the
same tokens per step). batch_size x grad_accum_steps x block_size = 12 x 40 x 1024 = 491,520, as nanoGPT's
5 x 8 GPUs. Attention uses cuDNN's flash kernel on GPUs and XLA's elsewhere (model.attention_impl='auto',
chosen for the devices the program is compiled for); bfloat16 compute with float32 parameters and Adam moments.
"""

from jaxgpt.config import base_config


def get_config():
    c = base_config()
    c.out_dir = "out-gpt2-124m"
    c.eval_interval = 1000
    c.eval_iters = 200
    c.log_interval = 10
    c.batch_size = 12
    c.grad_accum_steps = 40  # 12 x 1024 x 40 = 491,520 tokens per optimizer step
    c.max_iters = 600000
    c.lr_decay_iters = 600000
    c.learning_rate = 6e-4
    c.min_lr = 6e-5
    c.warmup_iters = 2000
    c.weight_decay = 1e-1
    c.beta1 = 0.9
    c.beta2 = 0.95
    c.grad_clip = 1.0
    c.model.block_size = 1024
    c.model.vocab_size = 50304  # GPT-2's 50257 padded to a multiple of 64
    c.model.n_layer = 12
    c.model.n_head = 12
    c.model.n_embd = 768
    c.model.dropout = 0.0
    c.model.bias = False
    c.model.dtype = "bfloat16"
    c.data.path = "data/openwebtext"  # a nanoGPT data directory: train.bin, val.bin (uint16)
    c.data.on_device = False  # 9B tokens do not fit: np.memmap on the host, batches sent per step
    return c
