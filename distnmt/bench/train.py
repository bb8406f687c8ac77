"""``distnmt bench train``: training throughput of the real trainer on Ray.

Each case is a real ``distnmt train`` run (Ray Train workers, gloo or NCCL,
the quickstart model and the prepared sample) for a fixed number of steps; its
rank 0 writes ``metrics.jsonl``, from which the median global target tokens/s
after warm-up is taken. Cases: DDP and DeepSpeed ZeRO-1/2, 1 and 2 workers,
fp32 and bf16; scaling efficiency = 2-worker tokens/s / (2 x 1-worker tokens/s).
Figures go to ``<out>/train.json`` and ``<out>/train.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch

from distnmt.config import load_config
from distnmt.orchestrate import run_training

REPO = Path(__file__).resolve().parents[2]
ENGINES = {
    "ddp": [],
    "zero1": ["train.backend=deepspeed", f"train.deepspeed_config={REPO}/configs/deepspeed/zero1.json"],
    "zero2": ["train.backend=deepspeed", f"train.deepspeed_config={REPO}/configs/deepspeed/zero2.json"],
}


def _case(config: Path, engine: str, workers: int, precision: str, steps: int, storage: Path,
          extra: list[str]) -> dict[str, Any]:
    """One real training run; its median tokens/s over the logged intervals after the first."""
    name = f"{engine}-w{workers}-{precision}"
    overrides = [
        *ENGINES[engine], f"train.workers={workers}", f"train.precision={precision}",
        f"train.max_steps={steps}", f"train.checkpoint_every={steps}", f"train.storage_path={storage}",
        f"train.name={name}", f"logging.log_every={max(1, steps // 6)}", "logging.wandb=disabled",
        # The evaluator still scores the one checkpoint (it is part of a run), on one
        # sentence; the end-of-run test score and figures would add seconds per case and
        # measure nothing a throughput benchmark reports.
        "eval.max_sentences=1", "eval.beam_size=1", "eval.test_at_end=false", "eval.figures=false", *extra,
    ]
    cfg = load_config(config, overrides)
    started = time.time()
    run_training(cfg)
    lines = [json.loads(x) for x in (storage / name / "metrics.jsonl").read_text().splitlines()]
    rates = [x["tokens_per_s"] for x in lines[1:]] or [x["tokens_per_s"] for x in lines]
    return {
        "case": name, "engine": engine, "workers": workers, "precision": precision, "steps": steps,
        "tokens_per_s": statistics.median(rates), "step_time_s": statistics.median(x["step_time_s"] for x in lines[1:] or lines),
        "padding_efficiency": statistics.median(x["target_padding_efficiency"] for x in lines),
        "peak_rss_mib": max(x["peak_rss_mib"] for x in lines), "wall_s": round(time.time() - started, 1),
    }


def _markdown(results: list[dict[str, Any]], header: dict[str, Any]) -> str:
    rows = ["# distnmt bench train\n", *(f"- {k}: {v}" for k, v in header.items()), "",
            "| case | engine | workers | precision | tgt tokens/s | step s | padding eff | peak RSS MiB | scaling eff |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        scaling = f"{r['scaling_efficiency']:.2f}" if "scaling_efficiency" in r else ""
        rows.append(f"| {r['case']} | {r['engine']} | {r['workers']} | {r['precision']} | {r['tokens_per_s']:.0f} "
                    f"| {r['step_time_s']:.3f} | {r['padding_efficiency']:.3f} | {r['peak_rss_mib']:.0f} | {scaling} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="distnmt bench train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs/quickstart.yaml", help="model/data config")
    parser.add_argument("--engines", default="ddp,zero1,zero2", help="comma-separated: ddp, zero1, zero2")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16 (GPU)")
    parser.add_argument("--steps", type=int, default=36, help="optimizer steps per case")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config overrides for every case (e.g. train.use_gpu=true)")
    parser.add_argument("--tiny", action="store_true", help="seconds: DDP only, 1 worker, tiny model (for tests)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="where train.json/train.md go")
    args = parser.parse_args(argv)

    engines, workers, precisions = args.engines.split(","), [int(w) for w in args.workers.split(",")], args.precisions.split(",")
    extra = list(args.overrides)
    if args.tiny:
        engines, workers, precisions, args.steps = ["ddp"], [1], ["fp32"], 6
        extra += ["model.embed_size=16", "model.hidden_size=16", "model.align_size=16", "model.maxout_size=8"]
    args.out.mkdir(parents=True, exist_ok=True)
    from distnmt.cluster import start_local

    local_ray = start_local()  # loopback only, sized for one machine (docs/RELIABILITY.md)
    results: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="distnmt-bench-") as storage:
            for engine in engines:
                for precision in precisions:
                    for n in workers:
                        results.append(_case(args.config, engine, n, precision, args.steps, Path(storage), extra))
    finally:
        local_ray.stop()
    one = {(r["engine"], r["precision"]): r["tokens_per_s"] for r in results if r["workers"] == 1}
    for r in results:
        if r["workers"] == 2 and (r["engine"], r["precision"]) in one:
            r["scaling_efficiency"] = r["tokens_per_s"] / (2 * one[(r["engine"], r["precision"])])
    header = {
        "command": "distnmt bench train " + " ".join(argv), "machine": platform.machine(),
        "cpus": __import__("os").cpu_count(), "torch": torch.__version__, "ray": ray.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    (args.out / "train.json").write_text(json.dumps({"header": header, "results": results}, indent=1))
    (args.out / "train.md").write_text(_markdown(results, header))
    print(_markdown(results, header))
    return 0
