"""The benchmarks' quick modes run (CPU, seconds) and print their tables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize(
    "script,expect",
    [
        (["train_throughput.py", "--quick", "--presets", "tiny"], "bf16 img/s"),
        (
            ["train_throughput.py", "--quick", "--presets", "tiny", "--profile", "bf16"],
            "profile of tiny bf16: ",
        ),
        (["train_throughput.py", "--quick", "--presets", "tiny", "--optimizer"], "loop ms"),
        (["sample_throughput.py", "--quick", "--preset", "tiny"], "dpmpp-2m"),
        (["sample_throughput.py", "--quick", "--preset", "tiny", "--runs", "ddim:3"], "ddim  "),
        (["samplers.py", "--quick"], "ODE err s=3"),
        (["onnx_backend.py", "--quick", "--preset", "tiny", "--no-compile"], "onnxruntime fp32"),
        (["diffusers_export.py", "--quick", "--preset", "tiny"], "DPMSolverMultistepScheduler"),
        (["folder_load.py", "--quick"], "speed-up"),
        (["upsample.py", "--quick"], "speed-up of the step"),
        (["time_to_quality.py", "--quick"], "at the end"),
        (["time_to_quality.py", "--quick", "--schedule", "budget,held"], "schedule: "),
        (["distributed_scaling.py", "--quick", "--preset", "tiny"], "scaling efficiency: "),
        (["data_memory.py", "--quick", "--skip", "cgroup,speed"], "peak memory against dataset"),
    ],
)
def test_quick_benchmarks(script, expect):
    out = subprocess.run(
        [sys.executable, str(BENCH / script[0]), *script[1:], "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert expect in out.stdout


def _tune_demo():
    sys.path.insert(0, str(BENCH))
    try:
        import tune_demo
    finally:
        sys.path.remove(str(BENCH))
    return tune_demo


def test_tune_candidates_build_and_run():
    """Every tuning candidate is a valid change of cpu-demo whose network maps its (padded)
    input shape to itself."""
    import torch

    from cfgdiff.config import DiffusionConfig
    from cfgdiff.presets import PRESETS
    from cfgdiff.unet import UNet

    td = _tune_demo()
    for name, ov in td.candidates().items():
        cfg = td.apply(PRESETS["cpu-demo"], ov)
        size = 28 + 2 * ov.get("pad", 0)  # pad32 is MNIST padded from 28x28 to 32x32
        assert cfg.model.image_size == size, name
        net = UNet(cfg.model)
        x = torch.zeros(2, 1, size, size)
        out = net(x, torch.tensor([0, 999]), torch.tensor([3, 10]))
        assert out.shape == x.shape, name
    # the timestep candidates spell their law out in full, so they do not follow the preset
    demo = PRESETS["cpu-demo"]
    assert td.apply(demo, td.candidates()["tmix-hi"]) == demo
    uniform = td.apply(demo, td.candidates()["uniform"]).diffusion
    assert uniform == DiffusionConfig(schedule="cosine", prediction="v")
    assert td.apply(demo, td.candidates()["tln-hi"]).diffusion.t_uniform == 0.0


def test_tune_padding_round_trip():
    import torch

    td = _tune_demo()
    images = torch.randint(1, 256, (3, 1, 28, 28), dtype=torch.uint8)
    padded = td.pad_images(images, 2)
    assert padded.shape == (3, 1, 32, 32)
    border = padded.clone()
    border[..., 2:30, 2:30] = 0
    assert int(border.abs().sum()) == 0  # the border is MNIST's background (0)
    assert torch.equal(td.crop_images(padded, 2), images)
    assert td.crop_images(images, 0) is images


def test_tune_demo_quick_uses_each_candidates_own_speed():
    """The quick mode runs end to end, and a candidate with another network (pad32: a larger
    input) is sized by its own CPU speed, not the base network's."""
    import json

    speeds = BENCH / "results" / "cpu_throughput.json"
    out = subprocess.run(
        [sys.executable, str(BENCH / "tune_demo.py"), "--quick", "--throughput", str(speeds)]
        + ["--only", "base,pad32,lr1e-3", "--device", "cpu", "--precision", "fp32"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    rows = {ln.split()[0]: ln.split() for ln in out.stdout.splitlines()[2:] if ln.strip()}
    ips = json.loads(speeds.read_text())
    assert set(rows) == {"base", "pad32", "lr1e-3"}
    assert float(rows["pad32"][1]) == round(ips["pad32"])
    assert float(rows["lr1e-3"][1]) == round(ips["base"])  # same network: the base's speed
    assert ips["pad32"] < ips["base"]


def _bench_module(name):
    sys.path.insert(0, str(BENCH))
    try:
        import importlib

        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def test_profile_summary_of_cuda_kernels():
    """The GPU profile's arithmetic, on kernel events as torch.profiler gives them (CPU-side
    events are left out; a kernel is classified by its name)."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    tt = _bench_module("train_throughput")

    def ev(name, us, dev=DeviceType.CUDA):
        return SimpleNamespace(name=name, device_type=dev, self_device_time_total=us)

    events = [
        ev("sm90_xmma_fprop_implicit_gemm_bf16", 3000),
        ev("sm90_xmma_wgrad_bf16", 1000),
        ev("triton_red_fused_native_group_norm_silu_3", 1200),  # norm first, fused or not
        ev("triton_poi_fused_add_mul_silu_5", 800),
        ev("pytorch_flash::flash_fwd_kernel", 500),
        ev("multi_tensor_apply_kernel<FusedAdamMathFunctor>", 400),
        ev("ampere_bf16_s16816gemm_bf16_128x64", 600),
        ev("Memcpy DtoD (Device -> Device)", 100),
        ev("aten::convolution", 99999, DeviceType.CPU),  # host side: not kernel time
    ]
    times = tt.kernel_times(events)
    assert len(times) == 8
    prof = tt.summarise(times, steps=2, step_s=0.005, launches=True)
    assert prof["kernels_per_step"] == 4
    assert prof["busy_ms"] == 3.8 and prof["busy_share"] == 3.8 / 5
    assert prof["ms_per_step_by_kind"] == {
        "convolution": 2.0,
        "normalisation": 0.6,
        "fused (compiled)": 0.4,
        "matmul": 0.3,
        "attention": 0.25,
        "optimizer": 0.2,
        "copies": 0.05,
    }
    assert prof["top"][0] == ("sm90_xmma_fprop_implicit_gemm_bf16", 1.5)


def test_a_failing_variant_keeps_the_others_figures(monkeypatch, capsys):
    """A variant that raises (a compile mode on a stack that cannot run it) is reported as
    failed and left out of "best"; the other variants are still measured and printed."""
    tt = _bench_module("train_throughput")
    real = tt.measure

    def measure(*args, **kw):
        if kw.get("cudagraphs"):
            raise RuntimeError("CUDA graphs are not supported here\nsecond line")
        return real(*args, **kw)

    monkeypatch.setattr(tt, "measure", measure)
    argv = [
        "--quick",
        "--presets",
        "tiny",
        "--device",
        "cpu",
        "--variants",
        "fp32,bf16-compile-cg,bf16",
    ]
    monkeypatch.setattr(sys, "argv", ["train_throughput.py", *argv])
    assert tt.main() == 0
    out, err = capsys.readouterr()
    assert "tiny bf16-compile-cg: failed: RuntimeError: CUDA graphs are not supported here\n" in err
    assert "tiny bf16: " in err and "second line" not in err
    assert "! tiny bf16-compile-cg: failed: RuntimeError" in out
    (row,) = [line for line in out.splitlines() if line.startswith("tiny ")]
    assert "nan!" in row and "nan " not in row.split("nan!")[1]  # best/base and TFLOP/s measured


def test_quality_budget_tables_and_plots_points_per_dataset(tmp_path):
    """bench/quality_budget.py on sweep records of two datasets: one table row per point with
    the best scale's FID over the floor, and a plot with a pair of lines per dataset."""
    import json

    def record(dataset: str, fids: list[float], name: str) -> Path:
        rows = [
            {"scale": s, "fid": f, "precision": 0.8, "recall": 0.7, "class_accuracy": a}
            for s, f, a in zip([1.0, 1.5, 3.0], fids, [0.95, 0.99, 1.0], strict=True)
        ]
        r = {"rows": rows, "real_floor": {"fid": 0.1}, "n": 1000, "sampler": "ddpm",
             "steps": 20, "dataset": dataset}  # fmt: skip
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(r))
        return path

    points = [
        ("30", "big", record("mnist", [0.2, 0.3, 0.5], "a")),
        ("10", "small", record("mnist", [0.5, 0.4, 0.6], "b")),
        ("10", "small", record("fashion-mnist", [0.9, 0.8, 1.2], "c")),
    ]
    argv = [sys.executable, str(BENCH / "quality_budget.py"), "--plot", str(tmp_path / "q.png")]
    for minutes, label, path in points:
        argv += ["--point", f"{minutes},{label},{path}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [x for x in out.stdout.splitlines() if x.startswith("| ") and "---" not in x]
    assert lines[1].startswith("| fashion-mnist | 10 min | small | ddpm 20 | 1000 | 1.5 | 0.800")
    assert "| 8.00 |" in lines[1]
    assert lines[2].startswith("| mnist | 10 min | small |") and "| 1.5 | 0.400" in lines[2]
    assert lines[3].startswith("| mnist | 30 min | big |") and "| 2.00 |" in lines[3]
    assert (tmp_path / "q.png").stat().st_size > 1000
