"""Model FLOPs utilisation (MFU) as nanoGPT computes it, with the peak dense bf16 FLOP/s of common chips.

FLOPs per token = 6N + 12 * n_layer * n_head * head_size * T (PaLM appendix B; nanoGPT's
`estimate_mfu`): 6N for the matmuls with the weights (forward + backward), the second term for the
attention scores and their weighting. MFU = achieved FLOP/s / (peak FLOP/s per chip * chips).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax

if TYPE_CHECKING:  # bench_gpu.py imports this module where ml_collections may be missing
    import ml_collections

# Peak dense (no sparsity) bfloat16 FLOP/s per chip, from the vendors' data sheets.
PEAK_BF16_FLOPS = {
    "A100": 312e12,
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H200": 989e12,
    "TPU v4": 275e12,
    "TPU v5e": 197e12,  # also reported as "TPU v5 lite"
    "TPU v5p": 459e12,
    "TPU v6e": 918e12,  # Trillium, also reported as "TPU v6 lite"
}

# device_kind strings as JAX reports them -> a key of PEAK_BF16_FLOPS; the most specific match first.
_KIND_PATTERNS = (
    ("h100 pcie", "H100 PCIe"),
    ("h100", "H100 SXM"),  # 'NVIDIA H100 80GB HBM3' is the SXM part
    ("h200", "H200"),
    ("a100", "A100"),
    ("tpu v4", "TPU v4"),
    ("tpu v5 lite", "TPU v5e"),
    ("tpu v5e", "TPU v5e"),
    ("tpu v5p", "TPU v5p"),
    ("tpu v5", "TPU v5p"),  # the v5p reports itself as plain 'TPU v5'
    ("tpu v6 lite", "TPU v6e"),
    ("tpu v6e", "TPU v6e"),
)


def peak_flops(device_kind: str | None = None) -> float | None:
    """Peak bf16 FLOP/s of one chip of `device_kind` (default: jax.devices()[0]); None when unknown (CPUs)."""
    kind = (jax.devices()[0].device_kind if device_kind is None else device_kind).lower()
    for pattern, name in _KIND_PATTERNS:
        if pattern in kind:
            return PEAK_BF16_FLOPS[name]
    return None


def flops_per_token(n_params: int, n_layer: int, n_head: int, head_size: int, seq_len: int) -> float:
    """nanoGPT's estimate of training FLOPs per token: 6N + 12 * L * H * Q * T."""
    return 6 * n_params + 12 * n_layer * n_head * head_size * seq_len


def model_flops_per_token(model_config: ml_collections.ConfigDict, n_params: int) -> float:
    """`flops_per_token` of a config's model (`config.model`): the bigram model has no attention term."""
    m = model_config
    n_layer = m.n_layer if m.name == "gpt" else 0
    return flops_per_token(n_params, n_layer, m.n_head, m.n_embd // m.n_head, m.block_size)


def step_mfu(model_config: ml_collections.ConfigDict, n_params: int, n_devices: int,
             device_kind: str | None = None) -> Callable[[float], float | None]:
    """tokens/s -> MFU over `n_devices` chips of the config's model with `n_params` (non-embedding) parameters;
    always None when the chip's peak is unknown."""
    if peak_flops(device_kind) is None:
        return lambda tokens_per_s: None
    per_token = model_flops_per_token(model_config, n_params)
    return lambda tokens_per_s: mfu(tokens_per_s, per_token, n_devices, device_kind)


def mfu(tokens_per_second: float, flops_per_token: float, n_devices: int = 1, device_kind: str | None = None):
    """Achieved / peak FLOP/s over `n_devices` chips, as a fraction; None when the chip's peak is unknown."""
    peak = peak_flops(device_kind)
    if peak is None:
        return None
    return tokens_per_second * flops_per_token / (peak * n_devices)


def has_bf16(device: jax.Device | None = None) -> bool:
    """Whether `device` (default: jax.devices()[0]) has bfloat16 matmul units: every TPU, and NVIDIA GPUs from
    Ampere on (compute capability 8.0: A100, L4, H100, ...). Not a T4 (7.5) or V100 (7.0), and not a CPU: there
    `model.dtype='bfloat16'` only saves memory."""
    device = jax.devices()[0] if device is None else device
    if device.platform == "tpu":
        return True
    if device.platform in ("gpu", "cuda"):
        try:
            return float(getattr(device, "compute_capability", "0")) >= 8.0
        except ValueError:  # not an NVIDIA device
            return False
    return False
