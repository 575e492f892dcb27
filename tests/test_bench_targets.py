"""Every program of a run compiles for a TPU v5e chip, an H100 and a T4 on this CPU host (bench_targets.py)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import targets  # noqa: E402

PROGRAMS = {"train_chunk", "evaluation", "sample_prefill", "sample_decode"}


@pytest.fixture(scope="module")
def quick_rows(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("targets") / "rows.json"
    packages = os.environ.get("JAXGPT_TARGETS_PACKAGES", str(ROOT / ".targets"))
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_targets.py"), "--quick", "--json", str(out),
                          "--packages", packages], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_every_program_compiles_and_fits_on_each_target(quick_rows):
    seen = {(r["target"], r["config"], r["program"]) for r in quick_rows if r["compiled"] and r["fits"]}
    for target in ("tpu-v5e-1", "h100"):
        for config in ("tiny float32", "tiny bfloat16", "tiny-speedrun bfloat16",  # speedrun: switches and Muon
                       "tiny-dropout float32", "tiny-dropout bfloat16"):
            assert {(target, config, p) for p in PROGRAMS} <= seen
    # Colab's free GPU has no bf16 units and Triton does not compile for it (compute capability 7.5).
    assert {("t4", "tiny-dropout float32", p) for p in PROGRAMS} <= seen


@pytest.mark.slow
def test_roofline_figures_are_filled(quick_rows):
    for r in quick_rows:
        assert r["gflops"] > 0 and r["gbytes"] > 0 and r["bound_ms"] > 0, r
        assert 0 < r["roofline_mfu"] <= 1, r
        assert r["need_gb"] < r["hbm_gb"], r


@pytest.mark.slow
def test_a_gpu_program_compiled_on_a_cpu_takes_the_gpu_paths(quick_rows):
    """model.attention_impl='auto' means cuDNN's fused attention in a 16-bit GPU program, whatever the host runs."""
    rows = {(r["config"], r["program"]): r for r in quick_rows if r["target"] == "h100"}
    assert rows[("tiny bfloat16", "train_chunk")]["cudnn"] >= 2  # forward and backward
    assert rows[("tiny bfloat16", "evaluation")]["cudnn"] >= 1
    assert rows[("tiny-speedrun bfloat16", "train_chunk")]["cudnn"] >= 2  # rotary and QK-norm keep the fused kernel
    assert rows[("tiny float32", "train_chunk")]["cudnn"] == 0  # cuDNN's flash kernel is 16-bit only


@pytest.mark.slow
def test_gpu_attention_dropout_runs_jaxgpts_fused_kernels(quick_rows):
    """With attention dropout a GPU training step runs flash_dropout's three Pallas kernels a layer (forward,
    dK/dV, dQ), not the (T, T) weights in memory."""
    rows = {(r["config"], r["program"]): r for r in quick_rows if r["target"] == "h100"}
    for dtype in ("float32", "bfloat16"):
        assert rows[(f"tiny-dropout {dtype}", "train_chunk")]["pallas"] == 3 * 2  # the tiny model's 2 layers
    assert rows[("tiny-dropout bfloat16", "evaluation")]["pallas"] == 0  # no dropout when evaluating: cuDNN's
    assert rows[("tiny-dropout bfloat16", "evaluation")]["cudnn"] >= 1
    assert rows[("tiny bfloat16", "train_chunk")]["pallas"] == 0
    t4 = {(r["config"], r["program"]): r for r in quick_rows if r["target"] == "t4"}
    assert t4[("tiny-dropout float32", "train_chunk")]["pallas"] == 0  # the ladder: Triton needs Ampere or newer


@pytest.mark.slow
def test_a_tpu_program_compiled_on_a_cpu_runs_jaxgpts_flash_kernels(quick_rows):
    """Every TPU program's attention is flash_dropout_tpu's two Pallas kernels a layer (forward; backward), with
    dropout and without, in both precisions: Mosaic compiles them for the chip (the tiny model: 2 layers, two
    64-wide heads in one 128-lane group)."""
    rows = {(r["config"], r["program"]): r for r in quick_rows if r["target"] == "tpu-v5e-1"}
    for config in ("tiny float32", "tiny bfloat16", "tiny-dropout float32", "tiny-dropout bfloat16",
                   "tiny-speedrun bfloat16"):  # speedrun: rotary and QK-norm before the kernels
        assert rows[(config, "train_chunk")]["pallas"] == 2 * 2, config
        assert rows[(config, "evaluation")]["pallas"] == 2, config  # the forward kernel, no dropout


HLO = """HloModule m

%fused_add (p0: f32[4]) -> f32[4] {
  %p0 = f32[4]{0} parameter(0)
  ROOT %add = f32[4]{0} add(%p0, %p0)
}

%body (t: (s32[], bf16[4,8])) -> (s32[], bf16[4,8]) {
  %t = (s32[], bf16[4,8]{1,0}) parameter(0)
  %x = bf16[4,8]{1,0} get-tuple-element(%t), index=1
  %g = bf16[4,8]{1,0} custom-call(%x, %x), custom_call_target="__cublas$gemm"
  %c = f32[4,8]{1,0} convert(%g)
  %p = bf16[4,8]{1,0} custom-call(%g), custom_call_target="__gpu$xla.gpu.triton"
  ROOT %r = (s32[], bf16[4,8]{1,0}) tuple(%i, %g)
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  %f = f32[4]{0} fusion(%a), kind=kLoop, calls=%fused_add
  %w = (s32[], bf16[4,8]{1,0}) while(%t0), condition=%cond, body=%body
  ROOT %tri = f32[4]{0} fusion(%f), kind=kCustom, calls=%fused_add, backend_config={"kind":"__triton_gemm"}
}
"""


def test_gpu_kernels_counts_launches_not_fusion_bodies():
    k = targets.gpu_kernels(HLO)
    # fusion, triton, gemm, convert, Pallas kernel
    assert (k["kernels"], k["cublas"], k["triton"], k["fusion"], k["pallas"]) == (5, 1, 1, 1, 1)
    assert k["once"] == 2  # ENTRY's fusion and Triton gemm; the loop's three launch each step
    assert k["f32_converts"] == 1


def test_kernel_bytes_reads_operands_and_writes_results():
    # fusion: 16 in + 16 out; triton: 16 + 16; gemm: 2 x 64 in + 64 out; convert: 64 in + 128 out; Pallas: 64 + 64
    assert targets.kernel_bytes(HLO) == 32 + 32 + 192 + 192 + 128


def test_gpu_target_config_names_the_chip():
    text = targets.gpu_target_config(targets.TARGETS["t4"].gpu)
    assert 'device_description_str: "Tesla T4"' in text and "major: 7 minor: 5" in text
