"""``distnmt bench gpu``: the GPU path checked and measured in one command (at most 8 minutes).

On one CUDA GPU it

1. runs the GPU-marked tests (``pytest -m gpu tests/gpu``): DDP over NCCL with one
   worker, DeepSpeed ZeRO-2 bf16, fp16 with loss scaling, bit-exact resume including
   the CUDA generator, the cuDNN GRU and the paper GRU;
2. measures RNNsearch-50 (configs/rnnsearch-50.yaml: the paper's sizes, 30k
   vocabularies) training throughput in target tokens/s at bf16 and at fp32 with TF32
   matmuls, for each ``--budgets`` token budget per step: the training engine's own
   step (build_engine + train_step, one process, no Ray) on length-bucketed batches
   cut by the training sampler from synthetic sentence lengths (see
   :func:`synthetic_lengths`); with peak GPU memory, the model FLOPs per target token
   (:func:`flops_per_target_token`, counted from the model sizes) and MFU against the
   device's peak (:data:`PEAK_TFLOPS`);
3. measures beam-12 decoding in sentences/s (fresh weights: every hypothesis runs to
   the length limit, so it is a lower bound for a trained model).

Figures go to ``<out>/gpu.json`` and ``<out>/gpu.md``. Without a GPU (or with
``--dry``) the same code runs on the CPU at tiny sizes in seconds: the GPU tests are
collected and reported as skipped with their reason, and the figures are marked dry
(``gpu-dry.*``). The suite runs the dry mode (tests/test_bench_gpu.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from distnmt.bench.model import case_engine
from distnmt.config import Config, ModelConfig, load_config
from distnmt.data import BOS_ID, EOS_ID, BucketBatchSampler
from distnmt.data.batch import Batch, collate_sentences
from distnmt.io import write_json, write_text
from distnmt.model.build import build_model
from distnmt.model.search import beam_search

REPO = Path(__file__).resolve().parents[2]
DRY_MODEL = dict(embed_size=16, hidden_size=24, align_size=16, maxout_size=12)
DRY_VOCAB = 200
TIME_LIMIT_S = 480  # the whole command, tests included

# Dense (no sparsity) peak tensor-core TFLOP/s per GPU from the vendors' data sheets:
# (bf16, tf32). Matched against torch.cuda.get_device_name() in order, first hit wins
# (so "H100 PCIe" comes before "H100"). --peak-tflops overrides.
PEAK_TFLOPS: list[tuple[str, float, float]] = [
    ("B200", 2250.0, 1100.0),
    ("H200", 989.4, 494.7),
    ("H100 PCIe", 756.0, 378.0),
    ("H100 NVL", 835.0, 418.0),
    ("H100", 989.4, 494.7),  # SXM
    ("GH200", 989.4, 494.7),
    ("A100", 312.0, 156.0),
    ("L40S", 362.1, 183.0),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 60.0),
    ("A10G", 70.0, 35.0),
    ("A10", 125.0, 62.5),
    ("RTX 4090", 165.2, 82.6),
    ("RTX 6000 Ada", 364.2, 182.1),
    ("A6000", 154.8, 77.4),
    ("V100", 125.0, 15.7),  # no bf16 or tf32: fp16 tensor cores and plain fp32
    ("T4", 65.0, 8.1),  # likewise
]


def device_peak(name: str) -> Optional[tuple[float, float]]:
    """(bf16, tf32) dense peak TFLOP/s of the GPU called ``name``, or None if unknown."""
    for key, bf16, tf32 in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return bf16, tf32
    return None


# ---------------------------------------------------------------------------- FLOPs


def flops_per_target_token(m: ModelConfig, src_vocab: int, tgt_vocab: int, src_per_tgt: float,
                           mean_src_len: float) -> dict[str, float]:
    """Model FLOPs of one training step per real target token, from the sizes alone.

    Counted: every matmul, 2 FLOPs per multiply-add, on real tokens only (padding is
    waste, not model work). E = embed, H = hidden, A = align, M = maxout, V = target
    vocabulary, S = mean source length (attention reads all S positions):

    * encoder, per source token, both directions: 2 * 2 * (3H*E + 3H*H); keys U_a h_j:
      2 * 2H*A. Scaled by source tokens per target token.
    * decoder, per target token: query W_a s: 2*H*A; scores v_a^T tanh(.): 2*S*A;
      context (weights x annotations): 2*S*2H; GRU cell: 2*3H*(E + 2H) input side
      and 2*3H*H recurrent (the paper cell: the same count, its U split in two);
      deep output [U_o; V_o; C_o]: 2*2M*(H + E + 2H); softmax layer W_o: 2*M*V.
    * the initial state W_s and embeddings lookups are negligible and left out.

    Training = 3x the forward FLOPs (the backward pass computes two matmuls per
    forward one: gradients of inputs and of weights), the usual convention for MFU.
    RNNencdec has no attention terms.
    """
    E, H, A, M, S = m.embed_size, m.hidden_size, m.align_size, m.maxout_size, mean_src_len
    attention = m.arch == "rnnsearch"
    encoder = 2 * 2 * (3 * H * E + 3 * H * H) + (2 * 2 * H * A if attention else 0)
    decoder = {
        "attention": (2 * H * A + 2 * S * A + 2 * S * 2 * H) if attention else 0.0,
        "cell": 2 * 3 * H * (E + 2 * H) + 2 * 3 * H * H,
        "deep_output": 2 * 2 * M * (H + E + 2 * H),
        "softmax_layer": 2 * M * tgt_vocab,
    }
    forward = encoder * src_per_tgt + sum(decoder.values())
    return {"encoder_per_target_token": encoder * src_per_tgt, **decoder,
            "forward": forward, "training": 3 * forward}


# ----------------------------------------------------------------------------- data


def synthetic_lengths(n: int, max_len: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Source and target lengths in subwords shaped like WMT'14 en-fr after cleaning:
    log-normal around 25 subwords (English), French about 1.15x longer, cut at max_len.

    The GPU machine need not hold the corpus; throughput depends on the lengths
    (padding, steps per sentence), not on which tokens fill them.
    """
    rng = np.random.default_rng(seed)
    src = np.clip(np.round(rng.lognormal(np.log(22), 0.55, n)), 1, max_len).astype(np.int64)
    tgt = np.clip(np.round(src * rng.normal(1.15, 0.12, n)), 1, max_len).astype(np.int64)
    return src, tgt


def synthetic_batches(src_len: np.ndarray, tgt_len: np.ndarray, budget: int, count: int, vocab: tuple[int, int],
                      max_sentences: Optional[int], seed: int = 0) -> list[Batch]:
    """The first ``count`` batches the training sampler cuts at ``budget`` tokens, filled
    with random token ids (4..V-1: no PAD, BOS or EOS inside a sentence)."""
    from distnmt.data.batch import collate

    class _Random:  # a TokenArray look-alike: row i is random ids of the given length
        def __init__(self, lengths: np.ndarray, v: int, salt: int) -> None:
            self.lengths, self.v, self.salt = lengths, v, salt

        def __getitem__(self, i: int) -> np.ndarray:
            return np.random.default_rng((seed, self.salt, int(i))).integers(4, self.v, int(self.lengths[i]))

    sampler = BucketBatchSampler(src_len, tgt_len, budget, seed=seed, max_sentences=max_sentences)
    src, tgt = _Random(src_len, vocab[0], 0), _Random(tgt_len, vocab[1], 1)
    batches = []
    for indices in sampler:
        if len(batches) == count:
            break
        batches.append(collate(src, tgt, indices))  # type: ignore[arg-type]
    return batches


# ------------------------------------------------------------------------ GPU tests


def run_gpu_tests(timeout_s: float, say: Callable[[str], None]) -> dict[str, Any]:
    """``pytest -m gpu tests/gpu`` in a child process; each test's outcome and skip reason."""
    with tempfile.TemporaryDirectory(prefix="distnmt-bench-gpu-") as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs",
               f"--junitxml={xml}", str(REPO / "tests/gpu")]
        env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        started = time.time()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
            code, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired as err:
            code, tail = -1, f"timed out after {timeout_s:.0f} s\n" + str(err.stdout or "")[-2000:]
        tests = []
        if xml.exists():
            for case in ET.parse(xml).getroot().iter("testcase"):
                outcome, reason = "passed", ""
                for kind in ("failure", "error", "skipped"):
                    node = case.find(kind)
                    if node is not None:
                        outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
                        reason = (node.get("message") or "").strip()[:300]
                        break
                tests.append({"test": case.get("name"), "outcome": outcome, "reason": reason,
                              "seconds": round(float(case.get("time") or 0), 1)})
    for t in tests:
        say(f"[bench gpu] test {t['test']}: {t['outcome']}" + (f" ({t['reason']})" if t["reason"] else ""))
    return {"command": " ".join(cmd[1:-1] + ["tests/gpu"]), "exit_code": code, "seconds": round(time.time() - started, 1),
            "tests": tests, "output_tail": tail if code not in (0, 5) else ""}


# ------------------------------------------------------------------------ training


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_training(cfg: Config, model_cfg: ModelConfig, vocab: tuple[int, int], budgets: list[int],
                     precisions: list[str], steps: int, device: torch.device, deadline: float,
                     say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Target tokens/s of the engine's step, per precision x token budget."""
    # Sentences of up to data.max_words (RNNsearch-50: 50), one subword per word here;
    # data.max_len is only a guard against garbage lines.
    longest = min(cfg.data.max_len, getattr(cfg.data, "max_words", None) or cfg.data.max_len)
    src_len, tgt_len = synthetic_lengths(20000, longest)
    peak = device_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    results = []
    for precision in precisions:
        for budget in budgets:
            if time.time() > deadline:
                results.append({"precision": precision, "budget": budget, "skipped": "out of time"})
                continue
            tf32 = precision == "tf32"
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
            batches = [b.pin_memory() for b in
                       synthetic_batches(src_len, tgt_len, budget, steps + 2, vocab, cfg.data.max_batch_sentences)]
            engine = case_engine(cfg, model_cfg, "fp32" if tf32 else precision, vocab[0], vocab[1], device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for b in batches[:2]:  # warm-up: allocator, cuDNN plans, lazy optimizer state
                engine.train_step([b.to(device, non_blocking=True)])
            _sync(device)
            started = time.perf_counter()
            stats = [engine.train_step([b.to(device, non_blocking=True)]) for b in batches[2:]]
            _sync(device)
            seconds = time.perf_counter() - started
            timed = batches[2:]
            tokens = sum(b.num_target_tokens() for b in timed)
            src_tokens = sum(int(b.src_lengths.sum()) for b in timed)
            flops = flops_per_target_token(model_cfg, vocab[0], vocab[1], src_tokens / tokens,
                                           src_tokens / sum(len(b) for b in timed))
            row: dict[str, Any] = {
                "precision": precision, "budget": budget, "steps": len(timed),
                "sentences_per_step": round(sum(len(b) for b in timed) / len(timed), 1),
                "target_tokens_per_s": round(tokens / seconds),
                "step_s": round(seconds / len(timed), 4),
                "padding_efficiency": round(tokens / sum(b.tgt_out.numel() for b in timed), 3),
                "final_loss": round(stats[-1].loss_sum / stats[-1].tokens, 3),
                "flops_per_target_token": round(flops["training"]),
                "model_tflops": round(tokens / seconds * flops["training"] / 1e12, 3),
            }
            if device.type == "cuda":
                row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if peak is not None:
                row["mfu"] = round(row["model_tflops"] / (peak[1] if tf32 else peak[0]), 4)
            results.append(row)
            say(f"[bench gpu] train {precision} budget {budget}: {row['target_tokens_per_s']} tgt tok/s"
                + (f", MFU {row['mfu']:.1%}" if "mfu" in row else ""))
            del engine, batches
            if device.type == "cuda":
                torch.cuda.empty_cache()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True  # torch's defaults
    return results


def measure_decoding(cfg: Config, model_cfg: ModelConfig, vocab: tuple[int, int], sentences: int, beam: int,
                     precisions: list[str], device: torch.device, deadline: float,
                     say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Beam-``beam`` sentences/s on synthetic sources, batched ``eval.batch_sentences`` at a time."""
    src_len, _ = synthetic_lengths(sentences, cfg.eval.max_src_len, seed=1)
    rng = np.random.default_rng(1)
    sources = sorted((rng.integers(4, vocab[0], int(n)).tolist() for n in src_len), key=len)
    torch.manual_seed(0)
    model = build_model(model_cfg, vocab[0], vocab[1]).to(device).eval()
    results = []
    for precision in precisions:
        if time.time() > deadline:
            results.append({"precision": precision, "beam": beam, "skipped": "out of time"})
            continue
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        out_tokens = 0
        with torch.inference_mode(), autocast:
            first = collate_sentences(sources[:2])  # warm-up
            beam_search(model, first[0].to(device), first[1], BOS_ID, EOS_ID, beam_size=beam, max_len_a=0, max_len_b=3)
            _sync(device)
            started = time.perf_counter()
            for i in range(0, len(sources), cfg.eval.batch_sentences):
                src, lengths = collate_sentences(sources[i:i + cfg.eval.batch_sentences])
                hyps = beam_search(model, src.to(device), lengths, BOS_ID, EOS_ID, beam_size=beam,
                                   alpha=cfg.eval.alpha, max_len_a=cfg.eval.max_len_a, max_len_b=cfg.eval.max_len_b)
                out_tokens += sum(len(h) for h in hyps)
            _sync(device)
            seconds = time.perf_counter() - started
        results.append({"precision": precision, "beam": beam, "sentences": len(sources),
                        "sentences_per_s": round(len(sources) / seconds, 2),
                        "output_tokens_per_s": round(out_tokens / seconds),
                        "batch_sentences": cfg.eval.batch_sentences})
        say(f"[bench gpu] decode beam {beam} {precision}: {results[-1]['sentences_per_s']} sentences/s")
    torch.backends.cuda.matmul.allow_tf32 = False
    return results


# ------------------------------------------------------------------------- report


def to_markdown(r: dict[str, Any]) -> str:
    m = r["model"]
    lines = [
        "# distnmt bench gpu" + (" (dry run: CPU, tiny sizes; no GPU figures)" if r["dry"] else ""), "",
        f"- command: `{r['command']}`",
        f"- date: {r['date']}; device: {r['device']}; torch {r['torch']}, CUDA {r['cuda']}; {r['seconds']} s in all",
        f"- model: {m['arch']} emb {m['embed_size']}, hidden {m['hidden_size']}, align {m['align_size']}, "
        f"maxout {m['maxout_size']}, gru {m['gru']}, vocab {m['src_vocab']}/{m['tgt_vocab']}, "
        f"{m['parameters']:,} parameters; optimizer {r['optimizer']}",
        f"- peak TFLOP/s used for MFU (bf16, tf32): {r['peak_tflops'] or 'unknown device: no MFU'}", "",
        "## GPU tests", "", f"`{r['tests']['command']}`: exit {r['tests']['exit_code']}, {r['tests']['seconds']} s", "",
        "| test | outcome | reason |", "|---|---|---|",
    ]
    lines += [f"| {t['test']} | {t['outcome']} | {t['reason']} |" for t in r["tests"]["tests"]]
    lines += ["", "## Training (the engine's step; synthetic WMT-like lengths)", "",
              "| precision | token budget | sentences/step | tgt tokens/s | step s | padding eff. | peak GiB | GFLOP/token | model TFLOP/s | MFU |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for t in r["training"]:
        if "skipped" in t:
            lines.append(f"| {t['precision']} | {t['budget']} | {t['skipped']} |||||||")
            continue
        mfu = f"{t['mfu']:.2%}" if "mfu" in t else "-"
        lines.append(f"| {t['precision']} | {t['budget']} | {t['sentences_per_step']} | {t['target_tokens_per_s']} | "
                     f"{t['step_s']} | {t['padding_efficiency']} | {t.get('peak_memory_gib', '-')} | "
                     f"{t['flops_per_target_token'] / 1e9:.3f} | {t['model_tflops']} | {mfu} |")
    lines += ["", "## Decoding (fresh weights: hypotheses run to the length limit)", "",
              "| precision | beam | sentences | sentences/s | output tokens/s |", "|---|---|---|---|---|"]
    for d in r["decoding"]:
        if "skipped" in d:
            lines.append(f"| {d['precision']} | {d['beam']} | {d['skipped']} |||")
        else:
            lines.append(f"| {d['precision']} | {d['beam']} | {d['sentences']} | {d['sentences_per_s']} | "
                         f"{d['output_tokens_per_s']} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distnmt bench gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry", "--tiny", dest="dry", action="store_true",
                   help="CPU, tiny sizes, seconds (the default without a GPU)")
    p.add_argument("--config", type=Path, default=REPO / "configs/rnnsearch-50.yaml",
                   help="model sizes, optimizer, eval settings (default: configs/rnnsearch-50.yaml)")
    p.add_argument("--vocab", type=int, default=30000, help="source and target vocabulary (paper: 30000)")
    p.add_argument("--budgets", type=int, nargs="+", default=[2040, 4080, 8160],
                   help="token budgets per step (data.max_tokens; the paper's batch of 80 is 4080)")
    p.add_argument("--precisions", nargs="+", default=["bf16", "tf32"], choices=["bf16", "tf32", "fp32", "fp16"])
    p.add_argument("--steps", type=int, default=12, help="timed steps per training case (after 2 warm-up steps)")
    p.add_argument("--decode-sentences", type=int, default=200, help="sentences to beam-decode")
    p.add_argument("--beam", type=int, default=12)
    p.add_argument("--no-tests", action="store_true", help="skip the GPU tests")
    p.add_argument("--peak-tflops", type=float, nargs=2, metavar=("BF16", "TF32"), default=None,
                   help="the device's dense peak TFLOP/s, where the built-in table does not know it")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="where gpu.json and gpu.md go")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    started = time.time()
    deadline = started + TIME_LIMIT_S - 20
    dry = args.dry or not torch.cuda.is_available()
    say = (lambda _: None) if args.quiet else (lambda line: (sys.stdout.write(line + "\n"), sys.stdout.flush()))
    cfg = load_config(args.config)
    model_cfg, vocab = cfg.model, (args.vocab, args.vocab)
    if dry:
        model_cfg = dataclasses.replace(model_cfg, **DRY_MODEL)
        vocab = (DRY_VOCAB, DRY_VOCAB)
        args.budgets, args.steps, args.decode_sentences = [128, 256], 2, 4
        args.precisions = [p for p in args.precisions if p in ("bf16", "fp32", "tf32")]
        cfg.eval.max_len_a, cfg.eval.max_len_b, cfg.eval.batch_sentences = 0.2, 2, 2
    device = torch.device("cpu" if dry else "cuda")
    tests = (run_gpu_tests(max(60.0, deadline - time.time() - 240), say) if not args.no_tests
             else {"command": "(--no-tests)", "exit_code": None, "seconds": 0, "tests": []})
    threads = torch.get_num_threads()
    if dry:
        torch.set_num_threads(1)
    try:
        training = measure_training(cfg, model_cfg, vocab, args.budgets, args.precisions, args.steps, device,
                                    deadline - 45, say)
        decoding = measure_decoding(cfg, model_cfg, vocab, args.decode_sentences, args.beam,
                                    [p for p in args.precisions if p in ("bf16", "tf32", "fp32")], device, deadline, say)
    finally:
        torch.set_num_threads(threads)
    name = "cpu (dry run)" if dry else torch.cuda.get_device_name(device)
    peak = tuple(args.peak_tflops) if args.peak_tflops else (None if dry else device_peak(name))
    if args.peak_tflops and not dry:  # the table's MFU recomputed against the given peak
        for row in training:
            if "model_tflops" in row:
                row["mfu"] = round(row["model_tflops"] / (peak[1] if row["precision"] == "tf32" else peak[0]), 4)
    params = sum(p.numel() for p in build_model(model_cfg, *vocab).parameters())
    result = {
        "benchmark": "gpu", "dry": dry, "command": "distnmt bench gpu " + " ".join(argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seconds": round(time.time() - started, 1),
        "device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
        "peak_tflops": list(peak) if peak else None, "optimizer": cfg.optim.name,
        "model": {**dataclasses.asdict(model_cfg), "src_vocab": vocab[0], "tgt_vocab": vocab[1], "parameters": params},
        "tests": tests, "training": training, "decoding": decoding,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "gpu-dry" if dry else "gpu"
    write_json(args.out / f"{stem}.json", result)
    markdown = to_markdown(result)
    write_text(args.out / f"{stem}.md", markdown)
    say(markdown)
    failed = [t for t in tests["tests"] if t["outcome"] in ("failed", "error")]
    # pytest: 0 all passed or skipped, 5 none collected; anything else is a failure.
    return 1 if failed or tests["exit_code"] not in (0, 5, None) else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
