"""``distnmt bench data``: how fast and how lean the data stage is, written to files.

Measures, on a corpus built by repeating the real WMT'14 sample (about 43k pairs of
Europarl, News Commentary and Giga-fren) until it has ``--pairs`` pairs:

* prepare: end-to-end pairs/s and per stage, and peak memory (the largest process,
  and the whole process tree summed), with the cleaning rules of the paper config;
* loader: tokens/s on one core from the shards (sampler + collate, as a trainer does);
* padding efficiency (real tokens / tokens in padded batches, source and target) at
  ``--max-tokens`` per batch: random batching, the paper's sort-20-batches pools,
  wider pools, and whole-epoch bucketing;
* one training step of a model (default: configs/quickstart.yaml) on one core, to
  compare with the loader: the loader must keep up with at least 20 such steps.

``--tiny`` runs the same on a few thousand pairs in seconds (the tests use it).
Figures go to ``OUT/data[-tiny].json`` and ``OUT/data[-tiny].md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO.parent / "shared/data/wmt14-en-fr"
PARTS = {"europarl-v7": "europarl-v7", "news-commentary-v9": "news-commentary", "giga-fren": "giga-fren"}
EVAL_FILES = ("dev/newstest2013-src.en.sgm", "dev/newstest2013-ref.fr.sgm",
              "test/newstest2014-fren-src.en.sgm", "test/newstest2014-fren-ref.fr.sgm")
TARGET_RSS_MIB = 2048
TARGET_PADDING = 0.95
TARGET_LOADER_RATIO = 20
BUCKETING = "whole-epoch bucketing (pool_batches 0)"


# ---------------------------------------------------------------------------- corpus


def _sample_pairs(sample: Path) -> int:
    import gzip

    total = 0
    for name in PARTS.values():
        with gzip.open(sample / "train/by-corpus" / f"{name}.en.gz", "rb") as f:
            total += sum(1 for _ in f)
    return total


def build_corpus(sample: Path, dest: Path, pairs: int) -> tuple[Path, int]:
    """A mirror holding the sample's parts, each repeated until the corpus has >= ``pairs``;
    returns (mirror, number of copies).

    Giga-fren is written as gzip, as it is published (the sample's own .gz repeated:
    concatenated gzip members are one valid gzip file), the others as plain text, as
    they come out of their .tgz archives. Reused when already built for ``pairs``.
    """
    import gzip

    per_copy = _sample_pairs(sample)
    copies = max(1, math.ceil(pairs / per_copy))
    stamp = dest / "corpus.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("copies") == copies:
        return dest, copies
    shutil.rmtree(dest, ignore_errors=True)
    corpus = dest / "train/by-corpus"
    corpus.mkdir(parents=True)
    for name in PARTS.values():
        for lang in ("en", "fr"):
            source = sample / "train/by-corpus" / f"{name}.{lang}.gz"
            if name == "giga-fren":
                data, out = source.read_bytes(), corpus / f"{name}.{lang}.gz"
            else:
                data, out = gzip.decompress(source.read_bytes()), corpus / f"{name}.{lang}"
            with open(out, "wb") as f:
                for _ in range(copies):
                    f.write(data)
    for rel in EVAL_FILES:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample / rel, dest / rel)
    stamp.write_text(json.dumps({"copies": copies}))
    return dest, copies


# ---------------------------------------------------------------------------- prepare, in a child


def _prepare_child(spec: str) -> int:
    """Runs in a separate process so its memory is measured alone: ``prepare(DataConfig(**spec))``."""
    from distnmt.config import DataConfig
    from distnmt.data import prepare

    prepare(DataConfig(**json.loads(spec)), progress=False)
    return 0


class _TreeRss:
    """Samples the summed RSS of a process and its descendants (psutil, when installed)."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        self.peak = 0
        self.available = True
        try:
            import psutil
        except ImportError:  # the largest-process figure from getrusage remains
            self.available = False
            return
        self._proc = psutil.Process(pid)
        self._stop = threading.Event()
        self._every = every
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self._proc, *self._proc.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                return
            self._stop.wait(self._every)

    def stop(self) -> None:
        if self.available:
            self._stop.set()
            self._thread.join()


def run_prepare(mirror: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Prepare ``mirror`` into ``out`` in a child process; returns its figures."""
    from distnmt.data.prepared import PreparedData

    spec = {  # DataConfig's fields
        "source_dir": str(mirror), "prepared_dir": str(out), "cache_dir": str(out / "cache"), "preset": "sample",
        "dev_sets": ["newstest2013"], "test_set": "newstest2014", "vocab_size": args.vocab_size, "max_len": 50,
        "workers": args.workers, "shard_size": args.shard_size, "spm_sample_pairs": args.spm_sample_pairs,
        "max_words": 50, "max_ratio": 3.0, "dedupe": args.dedupe,
    }
    shutil.rmtree(out, ignore_errors=True)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_before = usage.ru_utime + usage.ru_stime
    started = time.monotonic()
    child = subprocess.Popen([sys.executable, "-m", "distnmt.bench.data", "_prepare", json.dumps(spec)])
    tree = _TreeRss(child.pid)
    code = child.wait()
    seconds = time.monotonic() - started
    tree.stop()
    if code != 0:
        raise RuntimeError(f"prepare failed with exit status {code}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    largest = usage.ru_maxrss  # KiB on Linux: the largest process
    cpu = usage.ru_utime + usage.ru_stime - cpu_before  # prepare and all its workers
    manifest = PreparedData.load(out).manifest
    read, timings = manifest["counts"]["train_read"], manifest["timings"]
    return {
        "pairs_read": read,
        "pairs_kept": manifest["counts"]["train"],
        "shards": len(manifest["shards"]),
        "workers": manifest["workers"],
        "seconds": round(seconds, 1),
        "pairs_per_s": round(read / seconds),
        "cpu_seconds": round(cpu, 1),
        "pairs_per_cpu_s": round(read / cpu),
        "stage_seconds": timings,
        "clean_pairs_per_s": round(read / max(timings["clean"], 1e-9)),
        "encode_pairs_per_s": round(read / max(timings["encode"], 1e-9)),
        "peak_rss_largest_process_mib": round(largest / 1024, 1),
        "peak_rss_tree_mib": round(tree.peak / 2**20, 1) if tree.available else None,
        "dropped": manifest["dropped"],
    }


# ---------------------------------------------------------------------------- loader, padding


def _one_core() -> Optional[set[int]]:
    """Pin this process to one core (returns the old mask to restore)."""
    try:
        old = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(old)})
        return old
    except AttributeError:
        return None


def measure_loader(prepared: Path, max_tokens: int, seconds: float, max_batches: int) -> dict[str, Any]:
    """Sampler + collate from the memory-mapped shards, on one core and one thread."""
    import torch

    from distnmt.data import BucketBatchSampler, PreparedData, collate

    old_mask = _one_core()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        src, tgt = PreparedData.load(prepared).train_arrays()
        sampler = BucketBatchSampler(src.lengths, tgt.lengths, max_tokens, seed=1)
        n_batches = len(sampler)  # builds the epoch's batch list
        setup = time.perf_counter() - t0
        batches = tgt_tokens = all_tokens = 0
        t0, c0 = time.perf_counter(), time.process_time()
        for indices in sampler:
            batch = collate(src, tgt, indices)
            tgt_tokens += batch.num_target_tokens()
            all_tokens += int(batch.src_lengths.sum()) + batch.num_target_tokens()
            batches += 1
            if batches >= max_batches or time.perf_counter() - t0 > seconds:
                break
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        torch.set_num_threads(old_threads)
        if old_mask is not None:
            os.sched_setaffinity(0, old_mask)
    return {
        "pairs": len(src),
        "target_tokens_per_cpu_s": round(tgt_tokens / cpu),
        "epoch_setup_seconds": round(setup, 2),
        "batches_per_epoch": n_batches,
        "batches_timed": batches,
        "batches_per_s": round(batches / elapsed, 1),
        "target_tokens_per_s": round(tgt_tokens / elapsed),
        "tokens_per_s": round(all_tokens / elapsed),
    }


def random_batch_efficiency(src: np.ndarray, tgt: np.ndarray, max_tokens: int, seed: int = 0) -> float:
    """Padding efficiency of batches cut from a shuffled order, same budget rule, no sorting:
    the sampler's own naive cut (``bucketing=False``) over one pool of the whole corpus."""
    from distnmt.data import BucketBatchSampler

    return BucketBatchSampler(src, tgt, max_tokens, seed=seed, pool_batches=0, bucketing=False).padding_efficiency()


def measure_padding(prepared: Path, max_tokens: int, copies: int = 1) -> dict[str, Any]:
    """Padding efficiency of each way of batching, on the whole corpus and on one copy of it.

    A corpus made by repeating the sample holds every (source, target) length pair
    ``copies`` times, which flatters sorting: on it, large pools find exact length
    matches that a real corpus of that size would not have. The figures on one copy
    (the sample's distinct pairs) are the honest lower bound.
    """
    from distnmt.data import BucketBatchSampler, PreparedData

    data = PreparedData.load(prepared)
    src, tgt = (array.lengths for array in data.train_arrays())
    subsets = {"corpus": (src, tgt)}
    if copies > 1:
        # The rules depend on content only, so each copy of a part keeps the same pairs,
        # and the first kept/copies pairs of each part are one copy of it.
        keep, start = [], 0
        for part, row in data.manifest["report"].items():
            if part == "total":
                continue
            keep.append(np.arange(start, start + row["kept"] // copies))
            start += row["kept"]
        one = np.concatenate(keep)
        subsets["one copy"] = (src[one], tgt[one])
    result: dict[str, Any] = {}
    for name, (s, t) in subsets.items():
        row = {"pairs": len(s), "random": round(random_batch_efficiency(s, t, max_tokens), 4)}
        for label, pool in (("pools of 20 batches (paper)", 20), ("pools of 100 batches", 100),
                            ("pools of 1000 batches", 1000), ("whole-epoch bucketing (pool_batches 0)", 0)):
            row[label] = round(BucketBatchSampler(s, t, max_tokens, pool_batches=pool).padding_efficiency(), 4)
        result[name] = row
    return result


def measure_step(prepared: Path, config: Path, tiny: bool, steps: int) -> dict[str, Any]:
    """Target tokens/s of full training steps on one core: the engine's own step
    (the config's optimizer, schedule, clipping and precision), one batch per step."""
    import dataclasses

    import torch

    from distnmt.config import load_config
    from distnmt.data import PAD_ID, BucketBatchSampler, PreparedData, collate
    from distnmt.model.build import build_model
    from distnmt.train.engine import build_engine

    cfg = load_config(config)
    if tiny:
        cfg.model = dataclasses.replace(cfg.model, embed_size=32, hidden_size=32, align_size=32, maxout_size=32)
    cfg.train = dataclasses.replace(cfg.train, accumulate=1, backend="ddp")
    old_mask = _one_core()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        data = PreparedData.load(prepared)
        vocab = data.vocab_sizes
        model = build_model(cfg.model, vocab["src"], vocab["tgt"], pad_id=PAD_ID)
        engine = build_engine(cfg, model, torch.device("cpu"))  # one process: no DDP wrapper, no Ray
        src, tgt = data.train_arrays()
        sampler = BucketBatchSampler(src.lengths, tgt.lengths, cfg.data.max_tokens, seed=2,
                                     pool_batches=cfg.data.pool_batches)
        tokens, elapsed, cpu = 0, 0.0, 0.0
        for i, indices in enumerate(sampler):
            if i > steps:
                break
            batch = collate(src, tgt, indices)
            t0, c0 = time.perf_counter(), time.process_time()
            engine.train_step([batch])
            if i > 0:  # the first step pays for allocations and kernel selection
                elapsed += time.perf_counter() - t0
                cpu += time.process_time() - c0
                tokens += batch.num_target_tokens()
    finally:
        torch.set_num_threads(old_threads)
        if old_mask is not None:
            os.sched_setaffinity(0, old_mask)
    return {
        "config": str(config.relative_to(REPO) if config.is_relative_to(REPO) else config) + (" (tiny sizes)" if tiny else ""),
        "max_tokens": cfg.data.max_tokens,
        "precision": cfg.train.precision,
        "steps_timed": steps,
        "target_tokens_per_s": round(tokens / elapsed),
        "target_tokens_per_cpu_s": round(tokens / cpu),
    }


# ---------------------------------------------------------------------------- report


def _markdown(r: dict[str, Any]) -> str:
    p, l, step, t = r["prepare"], r["loader"], r["train_step"], r["targets"]
    ok = {True: "yes", False: "**no**", None: "n/a"}
    corpus = f"{p['pairs_read']:,} pairs" + (f" (the sample's {r['copies']} copies)" if r["copies"] > 1 else "")
    lines = [
        f"# Data benchmark{' (tiny)' if r['tiny'] else ''}",
        "",
        f"Command: `{r['command']}`  ",
        f"Machine: {r['machine']}; {r['date']}",
        "",
        "| figure | value | target | met |",
        "|---|---:|---:|:---:|",
        f"| corpus read by prepare | {corpus} | | |",
        f"| prepare, end to end ({p['workers']} workers) | {p['pairs_per_s']:,} pairs/s ({p['seconds']} s wall) | | |",
        f"| prepare, per CPU second (all processes) | {p['pairs_per_cpu_s']:,} pairs/CPU-s ({p['cpu_seconds']} CPU-s) | | |",
        f"| clean stage / encode stage (wall) | {p['clean_pairs_per_s']:,} / {p['encode_pairs_per_s']:,} pairs/s | | |",
        f"| peak RSS, largest process | {p['peak_rss_largest_process_mib']:,} MiB | < {TARGET_RSS_MIB:,} MiB | {ok[t['rss']]} |",
        f"| peak RSS, process tree summed (shared pages counted in each) | {p['peak_rss_tree_mib']} MiB | | |",
        f"| loader (sampler + collate from shards), one core | {l['target_tokens_per_s']:,} target tokens/s "
        f"({l['target_tokens_per_cpu_s']:,} per CPU-s) | | |",
        f"| training step, one core ({step['config']}, {step['precision']}) | {step['target_tokens_per_s']:,} target tokens/s "
        f"({step['target_tokens_per_cpu_s']:,} per CPU-s) | | |",
        f"| loader / training step (per CPU-s) | {r['loader_over_step']:.0f}x | >= {TARGET_LOADER_RATIO}x | {ok[t['loader']]} |",
    ]
    for subset, row in r["padding"].items():
        for label, value in row.items():
            if label == "pairs":
                continue
            target = label == BUCKETING and (subset == "one copy" or len(r["padding"]) == 1)
            lines.append(f"| padding efficiency, {r['max_tokens']} tokens, {subset} ({row['pairs']:,} pairs): {label} | "
                         f"{value:.3f} | {'>= ' + str(TARGET_PADDING) if target else ''} | {ok[t['padding']] if target else ''} |")
    lines += ["", "Prepare stages (seconds, wall): " + ", ".join(f"{k} {v}" for k, v in p["stage_seconds"].items()), ""]
    return "\n".join(lines)


def _machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        mem_text = f", {mem:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        mem_text = ""
    cpu = platform.processor() or platform.machine()
    return f"{cores} cores{mem_text}, {cpu}, Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distnmt bench data", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a few thousand pairs, tiny model: seconds (for tests)")
    p.add_argument("--pairs", type=int, default=5_000_000, help="corpus size to build by repeating the sample")
    p.add_argument("--sample", type=Path, default=SAMPLE, help="the WMT'14 sample (default: ../shared/data/wmt14-en-fr)")
    p.add_argument("--work", type=Path, default=Path("bench-results/work-data"),
                   help="where the corpus and prepared data go (deleted afterwards unless --keep)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="where data.json and data.md go")
    p.add_argument("--workers", type=int, default=None, help="prepare processes (default: every core)")
    p.add_argument("--vocab-size", type=int, default=8000, help="sentencepiece vocabulary per language")
    p.add_argument("--spm-sample-pairs", type=int, default=1_000_000, help="pairs sentencepiece trains on")
    p.add_argument("--shard-size", type=int, default=100_000, help="input pairs per shard")
    p.add_argument("--dedupe", action="store_true", help="also deduplicate (a repeated corpus then shrinks to the sample)")
    p.add_argument("--max-tokens", type=int, default=4096, help="batch budget for loader and padding figures")
    p.add_argument("--loader-seconds", type=float, default=20.0, help="time the loader for at most this long")
    p.add_argument("--step-config", type=Path, default=REPO / "configs/quickstart.yaml",
                   help="model, precision and batch budget of the training step to compare with")
    p.add_argument("--keep", action="store_true", help="keep the corpus and prepared data in --work")
    return p


def main(argv: list[str]) -> int:
    if argv[:1] == ["_prepare"]:
        return _prepare_child(argv[1])
    args = build_parser().parse_args(argv)
    if args.tiny:
        args.pairs, args.vocab_size, args.spm_sample_pairs = min(args.pairs, 4000), 500, 2000
        args.shard_size, args.loader_seconds = 1000, 2.0
        args.work = args.work.with_name(args.work.name + "-tiny")
    from distnmt.config import load_config

    load_config(args.step_config)  # fail now, not after a long prepare, if the step's config is broken
    mirror, copies = build_corpus(args.sample, args.work / "corpus", args.pairs)
    if args.tiny:  # the sample repeated once is 43k pairs; tiny keeps only the first lines of each part
        mirror, copies = _truncate(mirror, args.work / "corpus-tiny", args.pairs // len(PARTS)), 1
    prepared = args.work / "prepared"
    result: dict[str, Any] = {
        "tiny": args.tiny,
        "command": "distnmt bench data " + " ".join(argv),
        "machine": _machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "max_tokens": args.max_tokens,
    }
    result["prepare"] = run_prepare(mirror, prepared, args)
    result["loader"] = measure_loader(prepared, args.max_tokens, args.loader_seconds, 100 if args.tiny else 10**9)
    result["copies"] = copies
    result["padding"] = measure_padding(prepared, args.max_tokens, copies)
    result["train_step"] = measure_step(prepared, args.step_config, args.tiny, 3 if args.tiny else 8)
    # Per CPU second: on a shared machine the wall-clock rates depend on the neighbours' load.
    result["loader_over_step"] = result["loader"]["target_tokens_per_cpu_s"] / result["train_step"]["target_tokens_per_cpu_s"]
    result["targets"] = {
        "rss": result["prepare"]["peak_rss_largest_process_mib"] < TARGET_RSS_MIB,
        "padding": result["padding"]["one copy" if copies > 1 else "corpus"][BUCKETING] >= TARGET_PADDING,
        "loader": result["loader_over_step"] >= TARGET_LOADER_RATIO,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "data-tiny" if args.tiny else "data"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (args.out / f"{stem}.md").write_text(_markdown(result), encoding="utf-8")
    print(_markdown(result))
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0


def _truncate(mirror: Path, dest: Path, pairs: int) -> Path:
    """The first ``pairs`` lines of each part (tiny mode)."""
    import gzip

    shutil.rmtree(dest, ignore_errors=True)
    for path in (mirror / "train/by-corpus").iterdir():
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:  # type: ignore[operator]
            lines = [next(f) for _ in range(pairs)]
        out = dest / "train/by-corpus" / path.name
        out.parent.mkdir(parents=True, exist_ok=True)
        with opener(out, "wb") as f:  # type: ignore[operator]
            f.writelines(lines)
    for rel in EVAL_FILES:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mirror / rel, dest / rel)
    return dest


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
