"""Placement rules (llama.cpp's -ngl order), `auto` fitting, device choice and the flags."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from llmapp.runtime.execution import placement
from llmapp.runtime.execution.backend import GPU_INSTALL_HINT, find_offload_device
from llmapp.runtime.execution.model_runner import ModelRunner, RunnerOptions
from llmapp.runtime.files.gguf_file import GGUFFile

CTX = 64


def device_bytes(value: object) -> int:
    data = getattr(value, "data", value)  # a PackedWeight's bytes, or a tensor itself
    return int(getattr(data, "nbytes", 0))


def test_slots_follow_llama_cpp() -> None:
    assert placement.split_slots(4, 0) == (False, [False] * 4)
    assert placement.split_slots(4, 1) == (True, [False] * 4)  # the head only
    assert placement.split_slots(4, 3) == (True, [False, False, True, True])
    assert placement.split_slots(4, 5) == (True, [True] * 4)
    assert placement.split_slots(4, 99) == (True, [True] * 4)


def test_parsing() -> None:
    assert placement.parse_n_gpu_layers("12") == 12
    assert placement.parse_n_gpu_layers("AUTO") == "auto"
    assert placement.parse_n_gpu_layers("all") == "all"
    with pytest.raises(ValueError):
        placement.parse_n_gpu_layers("-1")
    assert placement.parse_bytes("1.5GiB") == 3 << 29
    assert placement.parse_bytes("512MiB") == 512 << 20
    assert placement.parse_bytes("800M") == 800 << 20
    assert placement.parse_bytes("1024") == 1024
    with pytest.raises(ValueError):
        placement.parse_bytes("lots")
    with pytest.raises(ValueError):
        RunnerOptions(n_gpu_layers=-2)


def test_fit_stops_at_the_first_slot_that_does_not_fit() -> None:
    costs = placement.LayerCosts((300, 100, 100), head_weights=50, kv_per_layer=10, compute=5)
    margin = 1000
    assert costs.need(1) == 55
    assert costs.need(2) == 55 + 110
    assert placement.resolve_slots("auto", costs, margin + 54, margin) == 0
    assert placement.resolve_slots("auto", costs, margin + 55, margin) == 1
    assert placement.resolve_slots("auto", costs, margin + 165, margin) == 2
    # block 0 is the next slot and the biggest: the fit stops there
    assert placement.resolve_slots("auto", costs, margin + 400, margin) == 3
    assert placement.resolve_slots("auto", costs, margin + 10_000, margin) == 4
    assert placement.resolve_slots("auto", costs, None, margin) == 4
    assert placement.resolve_slots(2, costs, None, margin) == 2
    with pytest.raises(placement.PlacementError, match="use --n-gpu-layers 2"):
        placement.resolve_slots("all", costs, margin + 200, margin)


def test_no_torch_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    assert find_offload_device(False).name is None
    with pytest.raises(placement.PlacementError, match=r"pip install \"llmapp\[gpu\]\""):
        find_offload_device(True)
    assert "llmapp[gpu]" in GPU_INSTALL_HINT


def test_no_cuda_warns_and_stays_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    monkeypatch.delenv("LLMAPP_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device = find_offload_device(True)
    assert device.name is None and device.warning and "no CUDA device" in device.warning


@pytest.mark.real_model
def test_auto_picks_what_the_estimate_says(
    smollm2_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torch")
    monkeypatch.setenv("LLMAPP_DEVICE", "cpu")
    margin = 64 << 20
    options = RunnerOptions(ctx_size=CTX, n_threads=1, n_gpu_layers="auto", gpu_margin=margin)
    with GGUFFile(smollm2_path) as gguf:
        from llmapp.runtime.execution.models import load_config

        cfg = load_config(gguf)
        costs = placement.layer_costs(gguf, cfg, CTX // options.block_size, options.block_size)
    for want in (0, 1, 9, cfg.n_layer + 1):
        free = margin + costs.need(want) + (costs.need(want + 1) - costs.need(want)) // 2
        if want == cfg.n_layer + 1:
            free = margin + costs.need(want) + (1 << 20)
        monkeypatch.setenv("LLMAPP_DEVICE_MEMORY", str(free))
        runner = ModelRunner(smollm2_path, options)
        got = runner.offload.layers if runner.offload else 0
        assert got == want, f"free {free}: {got} layers, the estimate says {want}"
        if runner.offload:
            weights, kv = costs.slot_bytes(want)
            assert runner.offload.weight_bytes == weights and runner.offload.kv_bytes == kv
            device_kv = sum(k.nbytes + v.nbytes for k, v in runner.kv_layers[-(want - 1) :])
            assert want == 1 or device_kv == kv
            # what the device really holds: packed matrices and vectors of offloaded parts
            held = device_bytes(runner.weights.output) + device_bytes(runner.weights.output_norm)
            for layer in runner.weights.layers[cfg.n_layer - (want - 1) :]:
                held += sum(device_bytes(v) for v in layer.tensors())
            assert abs(held - weights) <= 0.1 * weights, (held, weights)
        del runner
    monkeypatch.setenv("LLMAPP_DEVICE_MEMORY", "8MiB")
    with pytest.raises(placement.PlacementError, match="8 MiB is free"):
        ModelRunner(smollm2_path, RunnerOptions(ctx_size=CTX, n_gpu_layers="all"))


@pytest.mark.real_model
def test_run_json_and_verbose_report_the_split(
    smollm2_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("torch")
    from llmapp.app.cli import main

    monkeypatch.setenv("LLMAPP_DEVICE", "cpu")
    monkeypatch.delenv("LLMAPP_DEVICE_MEMORY", raising=False)
    common = [str(smollm2_path), "Hi", "--max-tokens", "2", "--temperature", "0", "--raw"]
    common += ["--threads", "1", "-q", "--ctx-size", "64", "-ngl", "3"]
    assert main(["run", *common, "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["offload"]["device"] == "cpu"
    assert out["offload"]["layers"] == 3 and out["offload"]["of"] == 31
    assert out["offload"]["weight_bytes"] > 0 and out["offload"]["kv_bytes"] > 0
    assert main(["run", *common, "--verbose"]) == 0
    assert "offload: 3/31 layers on cpu" in capsys.readouterr().err
