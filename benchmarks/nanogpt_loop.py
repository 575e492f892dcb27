"""nanoGPT's train.py loop, CPU recipe, on the PyTorch reference model: the whole-process baseline.

What `python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
--log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
--lr_decay_iters=2000 --dropout=0.0` does, with `tests/reference/torch_gpt.py` as the model: memmapped
train.bin / val.bin of a prepared dataset folder (`python -m jaxgpt.prepare`, nanoGPT's format),
random batches, AdamW groups, warmup + cosine schedule, clipping, an evaluation every eval_interval
and the same console lines. It imports only torch and numpy, as nanoGPT does, so its start-up is
nanoGPT's.

    python benchmarks/nanogpt_loop.py --data DIR --max_iters 200
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.reference import torch_gpt  # noqa: E402

CPU_RECIPE = dict(batch_size=12, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False,
                  learning_rate=1e-3, max_iters=2000, lr_decay_iters=2000, min_lr=1e-4, beta1=0.9, beta2=0.99,
                  warmup_iters=100, weight_decay=0.1, grad_clip=1.0, eval_interval=250, eval_iters=20,
                  log_interval=1)


def train(train_ids: np.ndarray, val_ids: np.ndarray, vocab_size: int, *, seed: int = 1337, log=print,
          **settings) -> tuple[torch.nn.Module, dict]:
    """nanoGPT's loop for `settings` (CPU_RECIPE's keys): returns the model and {'val', 'best_val', 'wall_s', 'curve'},
    `curve` a list of (seconds since the loop started, step, val loss) at every evaluation."""
    s = dict(CPU_RECIPE, **settings)
    B, T = s["batch_size"], s["block_size"]
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(seed)
    model = torch_gpt.GPT(torch_gpt.TorchGPTConfig(vocab_size=vocab_size, block_size=T, n_layer=s["n_layer"],
                                                   n_head=s["n_head"], n_embd=s["n_embd"], dropout=s["dropout"],
                                                   bias=s["bias"]))
    opt = torch_gpt.configure_optimizers(model, s["weight_decay"], s["learning_rate"], (s["beta1"], s["beta2"]))
    splits = {"train": train_ids, "val": val_ids}

    def get_batch(split):
        data = splits[split]
        ix = torch.randint(len(data) - T, (B,))
        x = torch.stack([torch.from_numpy(data[i:i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + T].astype(np.int64)) for i in ix])
        return x, y

    @torch.no_grad()
    def estimate_loss():
        model.eval()
        out = {k: float(torch.stack([model(*get_batch(k))[1] for _ in range(s["eval_iters"])]).mean())
               for k in ("train", "val")}
        model.train()
        return out

    t0, val, best, curve = time.time(), None, float("inf"), []
    x, y = get_batch("train")
    for it in range(s["max_iters"] + 1):
        lr = torch_gpt.get_lr(it, s["learning_rate"], s["warmup_iters"], s["lr_decay_iters"], s["min_lr"])
        for group in opt.param_groups:
            group["lr"] = lr
        if it % s["eval_interval"] == 0:
            losses = estimate_loss()
            val, best = losses["val"], min(best, losses["val"])
            curve.append((time.time() - t0, it, val))
            log(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if it == s["max_iters"]:
            break
        t_step = time.time()
        _, loss = model(x, y)
        x, y = get_batch("train")  # nanoGPT fetches the next batch while the step's graph is built
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if it % s["log_interval"] == 0:
            log(f"iter {it}: loss {loss.item():.4f}, time {1000 * (time.time() - t_step):.2f}ms")
    return model, {"val": val, "best_val": best, "wall_s": time.time() - t0, "curve": curve}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a prepared dataset folder: train.bin, val.bin, meta.pkl")
    p.add_argument("--max_iters", type=int, default=CPU_RECIPE["max_iters"])
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--learning_rate", type=float, default=CPU_RECIPE["learning_rate"])
    args = p.parse_args(argv)
    data = pathlib.Path(args.data)
    train_ids = np.memmap(data / "train.bin", dtype=np.uint16, mode="r")
    val_ids = np.memmap(data / "val.bin", dtype=np.uint16, mode="r")
    vocab_size = int(max(train_ids.max(), val_ids.max())) + 1
    print(f"found vocab_size = {vocab_size} (inside {data})", flush=True)
    _, out = train(train_ids, val_ids, vocab_size, seed=args.seed, max_iters=args.max_iters,
                   learning_rate=args.learning_rate, log=lambda line: print(line, flush=True))
    print(f"done: best val loss {out['best_val']:.4f}, {out['wall_s']:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
