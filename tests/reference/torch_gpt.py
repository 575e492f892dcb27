"""PyTorch reference GPT for numerical-equivalence tests.

A self-contained, readable PyTorch implementation of the GPT from Karpathy's
"Let's build GPT" lecture (``gpt.py``) and nanoGPT's ``model.py``. Parameter
names follow nanoGPT exactly so that ``state_dict()`` keys match a nanoGPT
checkpoint; the JAX implementation in :mod:`jaxgpt` is tested against it.

Besides nanoGPT's configuration this reference supports a few switches used
by the lecture and the original Transformer paper: the per-head attention
form (``attention='heads'``), post-LayerNorm blocks, sinusoidal position
encodings, untied embeddings and the ReLU / tanh-GELU activations.

Public names: :class:`TorchGPTConfig`, :class:`LayerNorm`,
:class:`CausalSelfAttention`, :class:`Head`, :class:`MultiHeadAttention`,
:class:`MLP`, :class:`Block`, :class:`GPT`, :func:`sinusoidal_positions`,
:func:`configure_optimizers`, :func:`get_lr`, :func:`train_steps` and
:func:`generate`.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

_ACTIVATIONS = ("gelu", "gelu_tanh", "relu")
_POS_ENCODINGS = ("learned", "sinusoidal")
_ATTENTIONS = ("fused", "heads")
_NORM_POSITIONS = ("pre", "post")


@dataclass
class TorchGPTConfig:
    """Hyper-parameters of the reference GPT (nanoGPT's ``GPTConfig`` plus extras)."""

    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    activation: str = "gelu"  # 'gelu' (exact erf) | 'gelu_tanh' | 'relu'
    tie_embeddings: bool = True
    pos_encoding: str = "learned"  # 'learned' | 'sinusoidal'
    attention: str = "fused"  # 'fused' | 'heads'
    norm_position: str = "pre"  # 'pre' | 'post'
    ln_eps: float = 1e-5


def sinusoidal_positions(T: int, C: int) -> torch.Tensor:
    """Return the (T, C) fixed sinusoidal position encoding of "Attention Is All You Need".

    ``PE[pos, 2i] = sin(pos / 10000^(2i/C))`` and ``PE[pos, 2i+1] = cos(pos / 10000^(2i/C))``,
    computed in float64 and returned as float32.
    """
    pos = torch.arange(T, dtype=torch.float64).unsqueeze(1)  # (T, 1)
    two_i = torch.arange(0, C, 2, dtype=torch.float64)  # (ceil(C/2),)
    angles = pos / torch.pow(torch.tensor(10000.0, dtype=torch.float64), two_i / C)  # (T, ceil(C/2))
    pe = torch.zeros(T, C, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angles)
    pe[:, 1::2] = torch.cos(angles[:, : C // 2])
    return pe.to(torch.float32)


class LayerNorm(nn.Module):
    """nanoGPT's LayerNorm: a ``weight`` and an optional ``bias`` (None when ``bias=False``)."""

    def __init__(self, ndim: int, bias: bool, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.eps = eps

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalise over the last dimension."""
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, self.eps)


class CausalSelfAttention(nn.Module):
    """nanoGPT's fused multi-head causal self-attention, written out explicitly."""

    def __init__(self, config: TorchGPTConfig) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # key, query, value projections for all heads, in one batch
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        # output projection
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # causal mask under nanoGPT's (old) name; persistent, as in old checkpoints
        mask = torch.tril(torch.ones(config.block_size, config.block_size))
        self.register_buffer("bias", mask.view(1, 1, config.block_size, config.block_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, T, C) to (B, T, C)."""
        B, T, C = x.size()
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) * hs**-0.5  # (B, nh, T, T)
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all heads side by side
        return self.resid_dropout(self.c_proj(y))


class Head(nn.Module):
    """One head of causal self-attention, as in the lecture."""

    def __init__(self, config: TorchGPTConfig, head_size: int) -> None:
        super().__init__()
        self.key = nn.Linear(config.n_embd, head_size, bias=config.bias)
        self.query = nn.Linear(config.n_embd, head_size, bias=config.bias)
        self.value = nn.Linear(config.n_embd, head_size, bias=config.bias)
        self.register_buffer("tril", torch.tril(torch.ones(config.block_size, config.block_size)), persistent=False)
        self.dropout = nn.Dropout(config.dropout)
        self.head_size = head_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, T, C) to (B, T, head_size)."""
        _, T, _ = x.shape
        k = self.key(x)  # (B, T, hs)
        q = self.query(x)  # (B, T, hs)
        wei = (q @ k.transpose(-2, -1)) * self.head_size**-0.5  # (B, T, T)
        wei = wei.masked_fill(self.tril[:T, :T] == 0, float("-inf"))
        wei = F.softmax(wei, dim=-1)
        wei = self.dropout(wei)
        v = self.value(x)  # (B, T, hs)
        return wei @ v


class MultiHeadAttention(nn.Module):
    """The lecture's multi-head attention: independent heads, concatenated, then projected."""

    def __init__(self, config: TorchGPTConfig) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0
        head_size = config.n_embd // config.n_head
        self.heads = nn.ModuleList([Head(config, head_size) for _ in range(config.n_head)])
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, T, C) to (B, T, C)."""
        out = torch.cat([h(x) for h in self.heads], dim=-1)
        return self.resid_dropout(self.c_proj(out))


def _make_activation(name: str) -> nn.Module:
    """Return the activation module for ``TorchGPTConfig.activation``."""
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"unknown activation {name!r}; expected one of {_ACTIVATIONS}")


class MLP(nn.Module):
    """Position-wise feed-forward network: c_fc, activation, c_proj, dropout."""

    def __init__(self, config: TorchGPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.act = _make_activation(config.activation)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, T, C) to (B, T, C)."""
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Transformer block: communication (attention) followed by computation (MLP)."""

    def __init__(self, config: TorchGPTConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias, eps=config.ln_eps)
        self.attn: nn.Module
        if config.attention == "fused":
            self.attn = CausalSelfAttention(config)
        else:
            self.attn = MultiHeadAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias, eps=config.ln_eps)
        self.mlp = MLP(config)
        self.post_norm = config.norm_position == "post"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-LN: ``x + f(ln(x))``; post-LN: ``ln(x + f(x))``."""
        if self.post_norm:
            x = self.ln_1(x + self.attn(x))
            x = self.ln_2(x + self.mlp(x))
        else:
            x = x + self.attn(self.ln_1(x))
            x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """nanoGPT's GPT language model with the lecture / paper variants as switches."""

    def __init__(self, config: TorchGPTConfig) -> None:
        super().__init__()
        assert config.vocab_size is not None
        assert config.block_size is not None
        if config.activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {config.activation!r}; expected one of {_ACTIVATIONS}")
        if config.pos_encoding not in _POS_ENCODINGS:
            raise ValueError(f"unknown pos_encoding {config.pos_encoding!r}; expected one of {_POS_ENCODINGS}")
        if config.attention not in _ATTENTIONS:
            raise ValueError(f"unknown attention {config.attention!r}; expected one of {_ATTENTIONS}")
        if config.norm_position not in _NORM_POSITIONS:
            raise ValueError(f"unknown norm_position {config.norm_position!r}; expected one of {_NORM_POSITIONS}")
        self.config = config

        modules: dict[str, nn.Module] = {"wte": nn.Embedding(config.vocab_size, config.n_embd)}
        if config.pos_encoding == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules["drop"] = nn.Dropout(config.dropout)
        modules["h"] = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        modules["ln_f"] = LayerNorm(config.n_embd, bias=config.bias, eps=config.ln_eps)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # weight tying (https://paperswithcode.com/method/weight-tying), as in nanoGPT
            self.transformer.wte.weight = self.lm_head.weight

        # init all weights, then the scaled init of the residual projections (GPT-2 paper)
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        """nanoGPT's init: Linear and Embedding weights N(0, 0.02), Linear biases zero."""
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters (tied weights counted once), minus position embeddings if asked."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return logits (B, T, vocab) for every position and the mean cross-entropy loss (or None)."""
        device = idx.device
        _, t = idx.size()
        assert t <= self.config.block_size, (
            f"Cannot forward sequence of length {t}, block size is only {self.config.block_size}"
        )
        tok_emb = self.transformer.wte(idx)  # (b, t, n_embd)
        if self.config.pos_encoding == "learned":
            pos = torch.arange(0, t, dtype=torch.long, device=device)  # (t,)
            pos_emb = self.transformer.wpe(pos)  # (t, n_embd)
        else:
            pos_emb = sinusoidal_positions(t, self.config.n_embd).to(device=device, dtype=tok_emb.dtype)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (b, t, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss


def configure_optimizers(
    model: nn.Module,
    weight_decay: float,
    learning_rate: float,
    betas: tuple[float, float],
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """nanoGPT's AdamW: weight decay on every parameter with dim >= 2, none on the rest."""
    # named_parameters() yields a tied weight only once
    param_dict = {pn: p for pn, p in model.named_parameters() if p.requires_grad}
    decay_params = [p for p in param_dict.values() if p.dim() >= 2]
    nodecay_params = [p for p in param_dict.values() if p.dim() < 2]
    optim_groups = [
        {"params": decay_params, "weight_decay": weight_decay},
        {"params": nodecay_params, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, eps=eps)


def get_lr(it: int, learning_rate: float, warmup_iters: int, lr_decay_iters: int, min_lr: float) -> float:
    """nanoGPT's learning-rate schedule: linear warmup, cosine decay, then ``min_lr``."""
    # 1) linear warmup for warmup_iters steps
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    # 2) if it > lr_decay_iters, return min learning rate
    if it > lr_decay_iters:
        return min_lr
    # 3) in between, use cosine decay down to min learning rate
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # ranges 0..1
    return min_lr + coeff * (learning_rate - min_lr)


def train_steps(
    model: GPT,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int,
    learning_rate: float,
    warmup_iters: int,
    lr_decay_iters: int,
    min_lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    grad_clip: float,
    eps: float = 1e-8,
) -> list[float]:
    """Run nanoGPT's training loop for ``steps`` iterations (batch ``i`` at step ``i``).

    The model is put in train mode and a fresh optimizer is made with
    :func:`configure_optimizers`. Returns the loss of every step (before its update).
    """
    assert len(batches) >= steps, f"need {steps} batches, got {len(batches)}"
    model.train()
    optimizer = configure_optimizers(model, weight_decay, learning_rate, betas, eps=eps)
    losses: list[float] = []
    for it in range(steps):
        lr = get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        x, y = batches[it]
        _, loss = model(x, y)
        assert loss is not None
        loss.backward()
        if grad_clip > 0.0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> torch.Tensor:
    """Sample ``max_new_tokens`` tokens after the (B, T) context ``idx``; returns (B, T + new).

    Runs a full forward pass each step on the last ``block_size`` tokens. As in
    nanoGPT the model's train/eval mode is left as is (call ``model.eval()`` first).
    """
    block_size = model.config.block_size
    for _ in range(max_new_tokens):
        # crop the context to the last block_size tokens
        idx_cond = idx if idx.size(1) <= block_size else idx[:, -block_size:]
        logits, _ = model(idx_cond)
        # logits at the final step, scaled by the temperature
        logits = logits[:, -1, :] / temperature
        if top_k is not None:
            v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
            logits[logits < v[:, [-1]]] = -float("Inf")
        probs = F.softmax(logits, dim=-1)
        idx_next = torch.multinomial(probs, num_samples=1)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx
