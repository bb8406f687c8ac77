"""``distnmt bench model``: how fast the RNNsearch model itself trains and decodes, in one process.

Figures (no Ray, no DDP: the model alone, as one training worker or the evaluator runs it):

* **training** target tokens/s of full steps, the training engine's own
  ``train_step`` (forward, fp32 loss, backward, clipping, the config's optimizer and
  schedule; one process, no Ray) for every combination of ``--threads`` x ``--precisions`` x
  ``--grus``, on real length-bucketed batches of the WMT'14 sample (the config's
  ``data.max_tokens``);
* **decoding** sentences/s and output tokens/s at each of ``--beams`` (1 is greedy) on
  the first ``--decode-sentences`` sentences of newstest2013, sorted by length and
  decoded ``eval.batch_sentences`` at a time, as the evaluator does;
* **peak memory** of each measurement (RSS via ``resource.getrusage``; the kernel's
  high-water mark is reset before each one where /proc/self/clear_refs allows it).

The model has the config's sizes (default: configs/quickstart.yaml) and fresh weights.
An untrained model rarely emits EOS, so every hypothesis runs to the length limit
(``max_len_a * src_len + max_len_b``): decoding sentences/s is a lower bound for a
trained model; output tokens/s does not depend on that. Each measurement is repeated
``--repeats`` times, interleaved with the others so that all see the same background
load, and the fastest is kept (other processes only ever slow a run down). Figures go to
``<out>/model.json`` and ``<out>/model.md`` (``model-tiny.*`` with ``--tiny``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from distnmt.config import Config, DataConfig, ModelConfig, load_config
from distnmt.data import BOS_ID, EOS_ID, PAD_ID, BucketBatchSampler, PreparedData, prepare
from distnmt.model.build import build_model
from distnmt.model.rnnsearch import RNNSearch
from distnmt.model.search import beam_search, greedy_search
from distnmt.train.engine import Engine, build_engine

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO.parent / "shared/data/wmt14-en-fr"
TINY_MODEL = dict(embed_size=16, hidden_size=32, align_size=32, maxout_size=32)


# ------------------------------------------------------------------ memory


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    """Peak RSS of this process (since the last reset) in MiB; ru_maxrss is KiB on Linux."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mib() -> float:
    """Current RSS in MiB (from /proc; 0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return 0.0


@contextmanager
def _memory(record: dict[str, Any]) -> Iterator[None]:
    """Fill ``record`` with the peak RSS during the block and the RSS before it."""
    record["rss_before_mib"] = round(_current_rss_mib(), 1)
    record["peak_rss_scope"] = "measurement" if _reset_peak_rss() else "process"
    yield
    record["peak_rss_mib"] = round(_peak_rss_mib(), 1)


# -------------------------------------------------------------------- data


@dataclasses.dataclass
class BenchData:
    """Prepared real data: training batches and newstest2013 sources, as token ids."""

    prepared: Path
    src_vocab: int
    tgt_vocab: int
    batches: list[Any]  # distnmt.data.Batch
    dev_sources: list[list[int]]


def _prepare_data(args: argparse.Namespace, cfg: Config, workdir: Path) -> Path:
    """An existing ``--prepared`` directory, or a fresh one built from the WMT'14 sample."""
    if args.prepared is not None:
        return args.prepared
    out = workdir / "prepared"
    prepare(DataConfig(source_dir=str(args.sample), prepared_dir=str(out), cache_dir=str(workdir / "cache"),
                       vocab_size=args.vocab_size, max_train_pairs=args.train_pairs, max_len=cfg.data.max_len),
            progress=False)
    return out


def _load_data(prepared: Path, cfg: Config, n_batches: int, n_sentences: int, max_tokens: int) -> BenchData:
    """The first ``n_batches`` length-bucketed training batches (fixed seed) and dev sources."""
    from distnmt.data import collate  # lazy in distnmt.data

    data = PreparedData(prepared, cfg.data.src_lang, cfg.data.tgt_lang)
    src, tgt = data.train_arrays()
    sampler = BucketBatchSampler(src.lengths, tgt.lengths, max_tokens, seed=0, pool_batches=cfg.data.pool_batches)
    batches = []
    for indices in sampler:
        if len(batches) == n_batches:
            break
        batches.append(collate(src, tgt, indices))
    dev = data.source_ids("dev")
    # Sources are cut as the translator cuts them; empty lines get EOS only, as there.
    sources = [dev[i][: cfg.eval.max_src_len].tolist() for i in range(min(n_sentences, len(dev)))]
    return BenchData(
        prepared=prepared,
        src_vocab=data.vocab_sizes["src"],
        tgt_vocab=data.vocab_sizes["tgt"],
        batches=batches,
        dev_sources=sources,
    )


# ---------------------------------------------------------------- training


def _autocast(precision: str) -> Any:
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def case_engine(cfg: Config, model_cfg: ModelConfig, precision: str, src_vocab: int, tgt_vocab: int,
                device: torch.device = torch.device("cpu")) -> Engine:
    """A fresh model (seed 0) and the training engine as a worker builds it: the config's
    optimizer, schedule, clipping and loss normalisation, at ``precision``, one process
    (no DDP wrapper, no Ray), one batch per step."""
    train = dataclasses.replace(cfg.train, precision=precision, accumulate=1, backend="ddp")
    case_cfg = dataclasses.replace(cfg, model=model_cfg, train=train)
    torch.manual_seed(0)
    model = build_model(model_cfg, src_vocab, tgt_vocab, pad_id=PAD_ID).to(device)
    model.train()
    return build_engine(case_cfg, model, device)


@dataclasses.dataclass
class TrainCase:
    threads: int
    precision: str
    gru: str
    compiled: bool | str = False  # model.compile: False, "scores" or "step"

    @property
    def name(self) -> str:
        return f"{self.gru}-{self.precision}-t{self.threads}" + (f"-compile-{self.compiled}" if self.compiled else "")


def _train_once(case: TrainCase, cfg: Config, model_cfg: ModelConfig, data: BenchData) -> dict[str, Any]:
    """Fresh model and engine, one warm-up step, then one timed pass over every batch."""
    torch.set_num_threads(case.threads)
    record: dict[str, Any] = {}
    with _memory(record):
        case_cfg = dataclasses.replace(model_cfg, gru=case.gru, compile=case.compiled)
        engine = case_engine(cfg, case_cfg, case.precision, data.src_vocab, data.tgt_vocab)
        started = time.perf_counter()
        # Allocations and kernel choice; compiled, every batch once: each new shape may
        # recompile (torch then marks its dims dynamic), a one-off cost, not step speed.
        for batch in data.batches if case.compiled else data.batches[:1]:
            engine.train_step([batch])
        record["warmup_s"] = time.perf_counter() - started
        wall, cpu = time.perf_counter(), time.process_time()
        stats = [engine.train_step([b]) for b in data.batches]
        record["wall_s"] = time.perf_counter() - wall
        record["cpu_s"] = time.process_time() - cpu
    record["final_loss"] = stats[-1].loss_sum / max(stats[-1].tokens, 1)  # read after the timing
    return record


def measure_training(cases: list[TrainCase], cfg: Config, model_cfg: ModelConfig, data: BenchData, repeats: int,
                     say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Best of ``repeats`` interleaved passes per case."""
    tokens = sum(b.num_target_tokens() for b in data.batches)
    padded = sum(b.tgt_out.numel() for b in data.batches)
    runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in cases}
    for r in range(repeats):
        for case in cases:
            run = _train_once(case, cfg, model_cfg, data)
            runs[case.name].append(run)
            say(f"[bench model] train {case.name} pass {r + 1}/{repeats}: {tokens / run['wall_s']:.0f} tgt tok/s")
    results = []
    for case in cases:
        passes = runs[case.name]
        walls = [p["wall_s"] for p in passes]
        results.append({
            "case": case.name, "threads": case.threads, "precision": case.precision, "gru": case.gru,
            "compiled": case.compiled,
            "tokens_per_s": tokens / min(walls),
            "tokens_per_s_median": tokens / statistics.median(walls),
            # Per CPU-second: less sensitive to other processes; equals wall rate at 1 thread when idle.
            "tokens_per_cpu_s": tokens / min(p["cpu_s"] for p in passes),
            "step_s": min(walls) / len(data.batches),
            "warmup_s": min(p["warmup_s"] for p in passes),
            "peak_rss_mib": max(p["peak_rss_mib"] for p in passes),
            "rss_before_mib": min(p["rss_before_mib"] for p in passes),
            "peak_rss_scope": passes[0]["peak_rss_scope"],
            "final_loss": passes[-1]["final_loss"],
            "batches": len(data.batches), "target_tokens": tokens, "padding_efficiency": tokens / padded,
            "repeats": repeats,
        })
    return results


# ---------------------------------------------------------------- decoding


def _decode_once(model: RNNSearch, sources: list[list[int]], beam: int, batch_sentences: int, cfg: Config,
                 precision: str) -> tuple[float, float, int]:
    """Decode every source (sorted by length, batched); returns (wall s, cpu s, output tokens)."""
    from distnmt.data import collate_sentences  # lazy in distnmt.data

    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    e = cfg.eval
    out_tokens = 0
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode(), _autocast(precision):
        for start in range(0, len(order), batch_sentences):
            src, lengths = collate_sentences([sources[i] for i in order[start : start + batch_sentences]])
            if beam == 1:
                hyps = greedy_search(model, src, lengths, BOS_ID, EOS_ID, e.max_len_a, e.max_len_b)
            else:
                hyps = beam_search(model, src, lengths, BOS_ID, EOS_ID, beam_size=beam, alpha=e.alpha,
                                   max_len_a=e.max_len_a, max_len_b=e.max_len_b)
            out_tokens += sum(len(h) for h in hyps)
    return time.perf_counter() - wall, time.process_time() - cpu, out_tokens


def measure_decoding(beams: list[int], threads: int, precision: str, model_cfg: ModelConfig, data: BenchData,
                     cfg: Config, repeats: int, say: Callable[[str], None],
                     compiled: tuple[bool | str, ...] = (False,)) -> list[dict[str, Any]]:
    """Sentences/s and output tokens/s per beam size, best of ``repeats`` interleaved passes."""
    torch.set_num_threads(threads)
    models = {}
    for c in compiled:
        torch.manual_seed(0)  # the same weights with and without compile
        models[c] = build_model(dataclasses.replace(model_cfg, compile=c), data.src_vocab, data.tgt_vocab,
                                pad_id=PAD_ID).eval()
        if c:  # compiling is a one-off cost, not decoding speed
            _decode_once(models[c], data.dev_sources[:2], max(beams), 2, cfg, precision)
    n = len(data.dev_sources)
    keys = [(b, c) for c in compiled for b in beams]
    runs: dict[tuple[int, bool | str], list[dict[str, Any]]] = {key: [] for key in keys}
    for r in range(repeats):
        for beam, c in keys:
            record: dict[str, Any] = {}
            with _memory(record):
                record["wall_s"], record["cpu_s"], record["out_tokens"] = _decode_once(
                    models[c], data.dev_sources, beam, cfg.eval.batch_sentences, cfg, precision)
            runs[(beam, c)].append(record)
            tag = f" (model.compile={c})" if c else ""
            say(f"[bench model] decode beam {beam}{tag} pass {r + 1}/{repeats}: {n / record['wall_s']:.1f} sentences/s")
    src_tokens = sum(len(s) + 1 for s in data.dev_sources)  # + EOS
    results = []
    for beam, c in keys:
        passes = runs[(beam, c)]
        best = min(passes, key=lambda p: p["wall_s"])
        results.append({
            "beam": beam, "search": "greedy" if beam == 1 else "beam", "threads": threads, "precision": precision,
            "gru": model_cfg.gru, "compiled": c, "sentences": n,
            "sentences_per_s": n / best["wall_s"],
            "sentences_per_s_median": n / statistics.median(p["wall_s"] for p in passes),
            "sentences_per_cpu_s": n / min(p["cpu_s"] for p in passes),
            "output_tokens_per_s": best["out_tokens"] / best["wall_s"],
            "mean_output_len": best["out_tokens"] / max(n, 1),
            "mean_source_len": src_tokens / max(n, 1),
            "batch_sentences": cfg.eval.batch_sentences,
            "peak_rss_mib": max(p["peak_rss_mib"] for p in passes),
            "rss_before_mib": min(p["rss_before_mib"] for p in passes),
            "peak_rss_scope": passes[0]["peak_rss_scope"],
            "repeats": repeats,
        })
    return results


# ----------------------------------------------------------------- summary


def summarize(training: list[dict[str, Any]], decoding: list[dict[str, Any]]) -> dict[str, float]:
    """Ratios the issue asks about: bf16 over fp32, 2 threads over 1, paper GRU over cuDNN's,
    and model.compile over eager where it was measured."""
    by = {(r["threads"], r["precision"], r["gru"], r["compiled"]): r["tokens_per_s"] for r in training}
    out: dict[str, float] = {}
    for (t, p, g, c), v in by.items():
        if c:
            base = by.get((t, p, g, False))
            if base:
                out[f"compile_over_eager_train_{g}_{p}_t{t}"] = v / base
            continue
        if p == "bf16" and (t, "fp32", g, False) in by:
            out[f"bf16_over_fp32_{g}_t{t}"] = v / by[(t, "fp32", g, False)]
        if t == 2 and (1, p, g, False) in by:
            out[f"t2_over_t1_{g}_{p}"] = v / by[(1, p, g, False)]
        if g == "paper" and (t, p, "cudnn", False) in by:
            out[f"paper_over_cudnn_{p}_t{t}"] = v / by[(t, p, "cudnn", False)]
    eager = {r["beam"]: r["sentences_per_s"] for r in decoding if not r["compiled"]}
    for r in decoding:
        if r["compiled"] and r["beam"] in eager:
            out[f"compile_over_eager_decode_beam{r['beam']}"] = r["sentences_per_s"] / eager[r["beam"]]
    return {k: round(v, 3) for k, v in sorted(out.items())}


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "python": platform.python_version(), "torch": torch.__version__,
            "load_average_start": round(os.getloadavg()[0], 2)}


def to_markdown(result: dict[str, Any]) -> str:
    """The figures as a markdown report."""
    m, d = result["model"], result["data"]
    lines = [
        "# distnmt bench model", "",
        f"- command: `{result['command']}`",
        f"- date: {result['date']}; machine: {result['machine']['cores']} cores, {result['machine']['cpu']}, "
        f"torch {result['machine']['torch']}; load average {result['machine']['load_average_start']} at start, "
        f"{result['machine']['load_average_end']} at end",
        f"- model: {m['arch']} emb {m['embed_size']}, hidden {m['hidden_size']}, align {m['align_size']}, "
        f"maxout {m['maxout_size']}, vocab {m['src_vocab']}/{m['tgt_vocab']}, {m['parameters']:,} parameters, fresh weights",
        f"- training data: {d['train_batches']} real batches (max_tokens {d['max_tokens']}), "
        f"{d['target_tokens']} target tokens, padding efficiency {d['padding_efficiency']:.3f}",
        f"- decoding data: first {d['decode_sentences']} sentences of newstest2013, sorted by length",
        f"- each figure: the fastest of {result['repeats']} interleaved passes; 'per CPU-s' divides by the "
        "process CPU time instead of wall time", "",
        "## Training (the engine's step: forward, loss, backward, clipping, the config's optimizer)", "",
        "| case | threads | precision | GRU | tgt tokens/s | median | per CPU-s | step s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["training"]:
        gru = r["gru"] + (f" + model.compile={r['compiled']}" if r["compiled"] else "")
        lines.append(f"| {r['case']} | {r['threads']} | {r['precision']} | {gru} | {r['tokens_per_s']:.0f} | "
                     f"{r['tokens_per_s_median']:.0f} | {r['tokens_per_cpu_s']:.0f} | {r['step_s']:.3f} | "
                     f"{r['peak_rss_mib']:.0f} |")
    lines += ["", "Ratios (tokens/s): " + ", ".join(f"{k} {v}" for k, v in result["summary"].items()), "",
              "## Decoding (untrained model: every hypothesis runs to the length limit)", "",
              "| beam | threads | precision | compile | sentences/s | median | per CPU-s | output tokens/s | mean out len | peak RSS MiB |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["decoding"]:
        lines.append(f"| {r['beam']} | {r['threads']} | {r['precision']} | {r['compiled'] or 'no'} | "
                     f"{r['sentences_per_s']:.1f} | "
                     f"{r['sentences_per_s_median']:.1f} | {r['sentences_per_cpu_s']:.1f} | "
                     f"{r['output_tokens_per_s']:.0f} | {r['mean_output_len']:.1f} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distnmt bench model", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny model and data: seconds (for tests)")
    p.add_argument("--config", type=Path, default=REPO / "configs/quickstart.yaml",
                   help="model sizes, data.max_tokens and eval settings (default: configs/quickstart.yaml)")
    p.add_argument("--sample", type=Path, default=SAMPLE, help="the WMT'14 sample (default: ../shared/data/wmt14-en-fr)")
    p.add_argument("--prepared", type=Path, default=None,
                   help="an existing `distnmt prepare` output to use instead of preparing the sample")
    p.add_argument("--train-pairs", type=int, default=20000, help="training pairs to prepare from the sample")
    p.add_argument("--vocab-size", type=int, default=None, help="sentencepiece vocabulary (default: the config's)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads for training")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--grus", nargs="+", default=["cudnn", "paper"], choices=["cudnn", "paper"])
    p.add_argument("--compile", nargs="?", const="scores", default=None, choices=["scores", "step"],
                   help="also measure model.compile=MODE (default scores): training at the first thread count; "
                        "decoding too for scores (step compiles training's recurrence only)")
    p.add_argument("--train-batches", type=int, default=4, help="batches per timed training pass")
    p.add_argument("--beams", type=int, nargs="+", default=[1, 5, 12], help="beam sizes to decode with")
    p.add_argument("--decode-sentences", type=int, default=200, help="newstest2013 sentences to decode")
    p.add_argument("--decode-threads", type=int, default=None, help="threads for decoding (default: eval.threads)")
    p.add_argument("--decode-precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=3, help="timed passes per measurement; the fastest is kept")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="where model.json and model.md go")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config)
    model_cfg = cfg.model
    max_tokens = cfg.data.max_tokens
    if args.tiny:
        model_cfg = dataclasses.replace(model_cfg, **TINY_MODEL)
        # Every dimension of the full run, on the least work that exercises it.
        args.train_pairs, args.vocab_size, args.train_batches, args.repeats = 1000, 500, 1, 1
        args.decode_sentences, cfg.eval.batch_sentences, max_tokens = 3, 2, 128
        cfg.eval.max_len_a, cfg.eval.max_len_b = 0.5, 2
    if args.vocab_size is None:
        args.vocab_size = cfg.data.vocab_size
    say = (lambda _: None) if args.quiet else (lambda line: (sys.stdout.write(line + "\n"), sys.stdout.flush()))
    old_threads = torch.get_num_threads()
    started = time.time()
    machine = _machine()
    try:
        with tempfile.TemporaryDirectory(prefix="distnmt-bench-model-") as workdir:
            say(f"[bench model] preparing data in {workdir}" if args.prepared is None else f"[bench model] data: {args.prepared}")
            prepared = _prepare_data(args, cfg, Path(workdir))
            data = _load_data(prepared, cfg, args.train_batches, args.decode_sentences, max_tokens)
            cases = [TrainCase(t, p, g) for t in args.threads for p in args.precisions for g in args.grus]
            if args.compile:
                cases += [TrainCase(args.threads[0], p, model_cfg.gru, compiled=args.compile) for p in args.precisions]
            training = measure_training(cases, cfg, model_cfg, data, args.repeats, say)
            decode_threads = args.decode_threads or cfg.eval.threads
            decoding = measure_decoding(args.beams, decode_threads, args.decode_precision, model_cfg, data, cfg,
                                        args.repeats, say, (False, args.compile) if args.compile == "scores" else (False,))
    finally:
        torch.set_num_threads(old_threads)
    machine["load_average_end"] = round(os.getloadavg()[0], 2)
    params = sum(p.numel() for p in build_model(model_cfg, data.src_vocab, data.tgt_vocab).parameters())
    result = {
        "benchmark": "model",
        "tiny": args.tiny,
        "command": "distnmt bench model " + " ".join(argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds": round(time.time() - started, 1),
        "machine": machine,
        "model": {**dataclasses.asdict(model_cfg), "src_vocab": data.src_vocab, "tgt_vocab": data.tgt_vocab,
                  "parameters": params},
        "data": {"prepared": str(args.prepared or "(temporary, from --sample)"), "train_batches": len(data.batches),
                 "max_tokens": max_tokens, "target_tokens": sum(b.num_target_tokens() for b in data.batches),
                 "padding_efficiency": training[0]["padding_efficiency"],
                 "decode_sentences": len(data.dev_sources)},
        "repeats": args.repeats,
        "training": training,
        "decoding": decoding,
        "summary": summarize(training, decoding),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "model-tiny" if args.tiny else "model"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    markdown = to_markdown(result)
    (args.out / f"{stem}.md").write_text(markdown)
    say(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
