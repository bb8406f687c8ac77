"""``distnmt bench gpu`` in its dry mode (CPU, tiny sizes): the same code a GPU runs,
with the GPU tests collected and reported as skipped with their reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distnmt.bench.gpu import device_peak, flops_per_target_token, main
from distnmt.config import load_config


def test_dry_run_writes_json_and_markdown(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the dry mode is for machines without one")
    assert main(["--quiet", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu-dry.json").read_text())
    assert result["dry"] is True and result["device"] == "cpu (dry run)"
    tests = result["tests"]["tests"]
    names = {t["test"].split("[")[0] for t in tests}
    assert {"test_ddp_over_nccl_with_one_worker", "test_deepspeed_zero2_bf16",
            "test_fp16_loss_scaling_skips_an_overflow_and_lowers_the_scale",
            "test_bit_exact_resume_including_the_cuda_generator", "test_gru_variants_on_cuda_match_the_cpu"} <= names
    assert all(t["outcome"] == "skipped" and "CUDA GPU" in t["reason"] for t in tests)
    rows = result["training"]
    assert [(r["precision"], r["budget"]) for r in rows] == [("bf16", 128), ("bf16", 256), ("tf32", 128), ("tf32", 256)]
    for r in rows:
        assert r["target_tokens_per_s"] > 0 and r["flops_per_target_token"] > 0 and r["final_loss"] > 0
        assert "mfu" not in r  # no peak for a CPU
    assert [d["beam"] for d in result["decoding"]] == [12, 12] and all(d["sentences_per_s"] > 0 for d in result["decoding"])
    assert "dry run" in (tmp_path / "gpu-dry.md").read_text()


def test_flops_per_target_token_at_paper_sizes() -> None:
    m = load_config(Path(__file__).parents[1] / "configs/rnnsearch-50.yaml").model
    f = flops_per_target_token(m, 30000, 30000, src_per_tgt=1.0, mean_src_len=30)
    E, H, A, M = 620, 1000, 1000, 500
    assert f["softmax_layer"] == 2 * M * 30000 == 30e6
    assert f["cell"] == 2 * 3 * H * (E + 2 * H) + 2 * 3 * H * H
    assert f["encoder_per_target_token"] == 4 * (3 * H * E + 3 * H * H) + 4 * H * A
    assert f["attention"] == 2 * H * A + 2 * 30 * A + 2 * 30 * 2 * H
    assert f["training"] == 3 * f["forward"] and 80e6 < f["forward"] < 90e6  # ~85 MFLOP forward per target token
    encdec = flops_per_target_token(load_config(None, ["model.arch=rnnencdec"]).model, 100, 100, 1.0, 30)
    assert encdec["attention"] == 0


def test_device_peaks() -> None:
    assert device_peak("NVIDIA H200") == (989.4, 494.7)
    assert device_peak("NVIDIA H100 PCIe") == (756.0, 378.0)
    assert device_peak("NVIDIA H100 80GB HBM3") == (989.4, 494.7)
    assert device_peak("NVIDIA A100-SXM4-80GB") == (312.0, 156.0)
    assert device_peak("NVIDIA L4") == (121.0, 60.0)
    assert device_peak("NVIDIA L40S")[0] == 362.1
    assert device_peak("Some Future GPU") is None
