"""``distnmt bench peer``: distnmt beside JoeyNMT 2.3.0 and a naive baseline, same budget, same machine.

Each system trains for the same wall-clock budget (``--minutes``, counted from its
first training step) on the same cleaned training pairs with the same
sentencepiece models, model sizes and per-step token budget, one after the other
on this machine:

- **distnmt**: ``distnmt train`` (Ray, DDP, the config's workers) with
  ``train.max_minutes``; its evaluator scores each checkpoint on the dev subset.
- **naive**: the same with ``data.bucketing=false``: random batches at the same
  token budget, no length sorting.
- **joeynmt**: JoeyNMT 2.3.0 in its own virtual environment (made here on first
  use; never a dependency of distnmt), its RNN model set to our sizes; it has no
  time limit, so it gets SIGINT (it then saves a checkpoint) at the deadline.

Quality over time is dev BLEU and the dev cross-entropy per target subword
(teacher-forced, EOS included, the same sentencepiece models and dev sentences):
distnmt's evaluator stores it in every dev record (``xent``); JoeyNMT logs its
validation perplexity per target token, EOS included, whose log is the same
quantity (docs/BENCHMARKS.md says how comparable). The cross-entropy moves long
before BLEU does, so short budgets still compare.

After the budget, each system's checkpoint with the best dev BLEU translates
newstest2014 (greedy unless ``--beam``) and is scored by the same sacreBLEU call
(:func:`distnmt.evaluate.scoring.score_corpus`), so the signatures are equal.
Figures go to ``<out>/peer.json`` and ``<out>/peer.md``; docs/BENCHMARKS.md says
what each one means and how it is measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from tqdm import tqdm

from distnmt.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
JOEYNMT_VERSION = "2.3.0"
TORCH_VERSION = "2.13.0"
DEFAULT_VENV = Path.home() / ".cache/distnmt/joeynmt-venv"
# JoeyNMT 2.3.0 imports importlib_metadata; it calls sentencepiece's SetVocabulary,
# which 0.2.3 lacks (0.2.0 segments identically): see /work/shared notes and docs/BENCHMARKS.md.
JOEYNMT_PACKAGES = [f"torch=={TORCH_VERSION}", f"joeynmt=={JOEYNMT_VERSION}", "importlib_metadata", "sentencepiece==0.2.0"]
SYSTEMS = ("distnmt", "joeynmt", "naive")
# Seconds-scale sizes for --tiny (the integration test): figures mean nothing, the plumbing everything.
TINY_MODEL = ["model.embed_size=32", "model.hidden_size=48", "model.align_size=48", "model.maxout_size=32",
              "logging.log_every=2"]

# JoeyNMT log lines (its file log: "<asctime> - <level> - <logger> - <message>").
_STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - \w+ - [\w.]+ - "
_TRAIN_RE = re.compile(_STAMP + r"Epoch\s+(\d+), Step:\s+(\d+), Batch Loss:\s+([\d.naninf]+), "
                       r"Batch Acc: ([\d.naninf]+), Tokens per Sec:\s+(\d+), Lr: ([\d.e+-]+)")
_EVAL_RE = re.compile(_STAMP + r"Evaluation result \((?:greedy|beam search)\): (.*), ([\d.]+)\[sec\]")
_EPOCH_RE = re.compile(_STAMP + r"EPOCH (\d+)")
_PARAMS_RE = re.compile(_STAMP + r"Total params: (\d+)")
_PREDICT_RE = re.compile(_STAMP + r"Predicting \d+ example")


# ------------------------------------------------------------------ token budget


def joeynmt_batch_size(cfg: Config) -> int:
    """JoeyNMT's ``batch_size`` (batch_type token) for the same budget per update.

    JoeyNMT 2.3.0's TokenBatchSampler counts a pair as ``max(len(src) + 1,
    len(trg) + 1)`` and a batch as ``len(batch) * that maximum``: the same cost as
    ours. It closes a batch once the cost *reaches* the budget (ours stops before
    it would pass it), so its batches hold up to one pair more; one process takes
    the whole step's budget in one batch (``batch_multiplier`` 1).
    """
    return cfg.step_token_budget()


def joeynmt_padding_efficiency(src_lengths: np.ndarray, tgt_lengths: np.ndarray, batch_size: int,
                               seed: int = 0) -> float:
    """Target padding efficiency of JoeyNMT's token batches over these lengths (it does not log one).

    Replays its TokenBatchSampler: a random order, cut greedily where the cost first
    reaches ``batch_size``; efficiency = real target tokens (+EOS) / padded target slots.
    """
    order = np.random.default_rng(seed).permutation(len(src_lengths))
    cost = np.maximum(src_lengths[order], tgt_lengths[order]) + 1
    tgt = tgt_lengths[order] + 1
    real = padded = 0
    start = 0
    while start < len(order):
        running = np.maximum.accumulate(cost[start:]) * np.arange(1, len(order) - start + 1)
        size = int(np.searchsorted(running, batch_size, side="left")) + 1  # first k reaching the budget
        batch = tgt[start:start + size]
        real += int(batch.sum())
        padded += len(batch) * int(batch.max())
        start += size
    return real / padded


# ------------------------------------------------------------------ JoeyNMT set-up


@dataclass
class PeerData:
    """Text files JoeyNMT reads: ``<prefix>.<lang>`` for train, dev and test; vocab files; spm models."""

    train: Path
    dev: Path
    test: Path
    src_vocab: Path
    tgt_vocab: Path
    src_spm: Path
    tgt_spm: Path
    train_pairs: int


def write_peer_data(cfg: Config, out: Path, dev_sentences: Optional[int], test_sentences: Optional[int]) -> PeerData:
    """Write the prepared training pairs back to text (decoded with their own sentencepiece
    models, so JoeyNMT re-encodes the very pairs distnmt trains on), the dev and test
    subsets, and JoeyNMT vocabulary files listing our sentencepiece pieces in id order."""
    from distnmt.data.prepared import PreparedData
    from distnmt.data.shards import TokenArray

    prepared, (s, t) = PreparedData.from_config(cfg.data), (cfg.data.src_lang, cfg.data.tgt_lang)
    out.mkdir(parents=True, exist_ok=True)
    data = PeerData(out / "train", out / "dev", out / "test", out / f"vocab.{s}.txt", out / f"vocab.{t}.txt",
                    prepared.spm_model(s), prepared.spm_model(t), 0)
    for lang, vocab in ((s, data.src_vocab), (t, data.tgt_vocab)):
        tok = prepared.tokenizer(lang)
        # Specials (ids 0-3 in our models) are JoeyNMT's own; it adds them itself.
        vocab.write_text("".join(tok.id_to_piece(i) + "\n" for i in range(4, tok.vocab_size)), encoding="utf-8")
        arr = TokenArray(prepared.train_prefix(lang))
        data.train_pairs = len(arr)
        target = Path(f"{data.train}.{lang}")
        if not target.exists() or sum(1 for _ in open(target, encoding="utf-8")) != len(arr):
            with open(f"{target}.tmp", "w", encoding="utf-8") as handle:
                for i in tqdm(range(len(arr)), desc=f"train.{lang} as text", unit="pairs", mininterval=2):
                    handle.write(tok.decode(arr[i].tolist()) + "\n")
            os.replace(f"{target}.tmp", target)
    for split, path, limit in (("dev", data.dev, dev_sentences), ("test", data.test, test_sentences)):
        for lang in (s, t):
            lines = prepared.text(split, lang).read_text(encoding="utf-8").splitlines()
            Path(f"{path}.{lang}").write_text("".join(x + "\n" for x in lines[:limit]), encoding="utf-8")
    return data


def joeynmt_config(cfg: Config, data: PeerData, model_dir: Path, validation_freq: int, beam: int) -> dict[str, Any]:
    """A JoeyNMT 2.3.0 config for our model sizes, data, optimizer and token budget."""
    s, t, m = cfg.data.src_lang, cfg.data.tgt_lang, cfg.model

    def side(lang: str, vocab: Path, spm: Path) -> dict[str, Any]:
        return {"lang": lang, "level": "bpe", "voc_file": str(vocab), "lowercase": False,
                "max_length": cfg.data.max_len,  # our prepared pairs are within it already
                "tokenizer_type": "sentencepiece", "tokenizer_cfg": {"model_file": str(spm)}}

    return {
        "name": "distnmt-peer",
        "joeynmt_version": JOEYNMT_VERSION,
        "data": {"train": str(data.train), "dev": str(data.dev), "test": str(data.test), "dataset_type": "plain",
                 "src": side(s, data.src_vocab, data.src_spm), "trg": side(t, data.tgt_vocab, data.tgt_spm)},
        "testing": {"n_best": 1, "beam_size": beam, "beam_alpha": 1.0, "batch_size": 100, "batch_type": "sentence",
                    # No max_output_length: JoeyNMT then stops at 1.5 x the batch's longest source,
                    # near our eval.max_len_a/b (1.5 x source + 10); a fixed 150 made it decode far longer.
                    "eval_metrics": ["bleu"], "sacrebleu_cfg": {"tokenize": "13a"}},
        "training": {
            "random_seed": cfg.train.seed, "optimizer": cfg.optim.name if cfg.optim.name != "adadelta" else "adadelta",
            "learning_rate": cfg.optim.lr, "adam_betas": list(cfg.optim.betas), "weight_decay": cfg.optim.weight_decay,
            "clip_grad_norm": cfg.optim.clip_norm or None,
            # A constant rate, as ours (its "plateau" scheduler fails with torch 2.13).
            "scheduling": "exponential", "decrease_factor": 1.0, "scheduler_step_at": "step",
            "batch_size": joeynmt_batch_size(cfg), "batch_type": "token", "batch_multiplier": 1,
            "normalization": "tokens", "loss": "crossentropy", "label_smoothing": cfg.optim.label_smoothing,
            "epochs": 100000, "updates": 10**9,  # the budget stops it, not these
            "validation_freq": validation_freq,
            "logging_freq": joeynmt_logging_freq(cfg.logging.log_every, validation_freq),
            "early_stopping_metric": "bleu", "model_dir": str(model_dir), "overwrite": True, "shuffle": True,
            "use_cuda": False, "fp16": False, "print_valid_sents": [], "keep_best_ckpts": 1, "num_workers": 0,
        },
        "model": {
            "initializer": "xavier_uniform", "bias_initializer": "zeros", "init_rnn_orthogonal": True,
            "tied_embeddings": False, "tied_softmax": False,
            "encoder": {"type": "recurrent", "rnn_type": "gru", "bidirectional": True, "num_layers": 1,
                        "hidden_size": m.hidden_size, "embeddings": {"embedding_dim": m.embed_size},
                        "dropout": m.dropout},
            "decoder": {"type": "recurrent", "rnn_type": "gru", "num_layers": 1, "hidden_size": m.hidden_size,
                        "embeddings": {"embedding_dim": m.embed_size}, "attention": "bahdanau",
                        "dropout": m.dropout, "hidden_dropout": m.dropout,
                        "init_hidden": "bridge", "input_feeding": True},
        },
    }


def joeynmt_logging_freq(log_every: int, validation_freq: int) -> int:
    """The largest divisor of ``validation_freq`` below it and at most ``log_every``.

    JoeyNMT 2.3.0 refuses a ``logging_freq`` that is not smaller than, or does not
    divide, ``validation_freq``.
    """
    if validation_freq < 2:
        raise ConfigError(f"--checkpoint-every {validation_freq}: JoeyNMT needs at least 2 (it logs more often than it validates)")
    return max(d for d in range(1, min(log_every, validation_freq - 1) + 1) if validation_freq % d == 0)


def ensure_joeynmt(venv: Path, install: bool) -> Optional[Path]:
    """The venv's python with JoeyNMT 2.3.0 beside torch 2.13.0; made when missing and ``install``.

    Returns None when it is missing and not to be made. Refuses a venv whose pip
    resolution replaced torch (the comparison must run the same torch).
    """
    python = venv / "bin/python"
    probe = [str(python), "-c", "import torch, joeynmt, importlib_metadata; print(torch.__version__, joeynmt.__version__)"]
    if python.exists():
        done = subprocess.run(probe, capture_output=True, text=True)
        if done.returncode == 0:
            return _check_versions(python, done.stdout)
    if not install:
        return None
    print(f"[peer] making JoeyNMT's venv {venv} (pip install {' '.join(JOEYNMT_PACKAGES)})", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *JOEYNMT_PACKAGES], check=True)
    return _check_versions(python, subprocess.run(probe, capture_output=True, text=True, check=True).stdout)


def _check_versions(python: Path, probe_out: str) -> Path:
    torch_version, joey_version = probe_out.split()
    if not torch_version.startswith(TORCH_VERSION) or joey_version != JOEYNMT_VERSION:
        raise ConfigError(f"{python}: has torch {torch_version} and joeynmt {joey_version}, want {TORCH_VERSION} "
                          f"and {JOEYNMT_VERSION}; delete that venv (or pass --joeynmt-venv) to make a fresh one")
    return python


# ------------------------------------------------------------------ JoeyNMT log


def _stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def joeynmt_xent(scores: dict[str, str]) -> Optional[float]:
    """Dev cross-entropy per target subword (nats) from one JoeyNMT evaluation line's scores.

    JoeyNMT 2.3.0 (prediction.py) logs ``ppl = exp(total_loss / total_ntokens)``, the
    summed token NLL (label smoothing 0: plain NLL) over the target tokens of the dev
    set (``trg[:, 1:] != pad``: the subwords and EOS, as ours), so log(ppl) is our
    ``xent``. Taken from ppl, not ``loss``: ``loss`` is divided by the config's
    normalization and printed with two decimals, ppl keeps more digits where it matters.
    """
    if "ppl" not in scores:
        return None
    ppl = float(scores["ppl"])
    return round(math.log(ppl), 6) if ppl > 0 else None


def parse_joeynmt_log(text: str, validation_freq: int) -> dict[str, Any]:
    """Training start, per-interval tokens/s and steps, validation BLEU and cross-entropy over time, parameters.

    JoeyNMT validates when its step count is a multiple of ``validation_freq`` and
    does not log that step, so the k-th validation is at step k * validation_freq.
    """
    start: Optional[float] = None
    train: list[dict[str, float]] = []
    evals: list[dict[str, float]] = []
    params: Optional[int] = None
    predicting: Optional[float] = None  # when the running validation began
    for line in text.splitlines():
        if (m := _EPOCH_RE.match(line)) and start is None:
            start = _stamp(m.group(1))
        elif m := _TRAIN_RE.match(line):
            train.append({"time": _stamp(m.group(1)), "epoch": int(m.group(2)), "step": int(m.group(3)),
                          "loss": float(m.group(4)), "tokens_per_s": float(m.group(6))})
        elif m := _EVAL_RE.match(line):
            scores = dict(part.split(": ") for part in m.group(2).split(", "))
            seconds = float(m.group(3))
            # The state it scored was reached when validation began ("Predicting ..."), not
            # when it ended; the seconds on this line are only the scoring's.
            began = predicting if predicting is not None else _stamp(m.group(1)) - seconds
            predicting = None
            evals.append({"time": began, "step": (len(evals) + 1) * validation_freq,
                          "bleu": float(scores["bleu"]), "eval_seconds": seconds,
                          "xent": joeynmt_xent(scores)})
        elif m := _PREDICT_RE.match(line):
            predicting = _stamp(m.group(1))
        elif m := _PARAMS_RE.match(line):
            params = int(m.group(2))
    return {"start": start, "train": train, "evals": evals, "params": params}


# ------------------------------------------------------------------ running and watching


def tree_rss_mib(pid: int) -> tuple[float, float]:
    """(sum, largest) resident memory in MiB of ``pid`` and all its descendants, from /proc.

    The sum counts a shared page once per process that maps it: see tree_memory's PSS."""
    from distnmt.cluster import process_tree, tree_memory

    memory = tree_memory(process_tree(pid))
    return memory["rss"], memory["largest_rss"]


def _default_sigint() -> None:
    """In the child before exec: SIGINT interrupts (Python raises KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_watched(cmd: list[str], log: Path, limit_s: float, env: Optional[dict[str, str]] = None,
                deadline: Optional[Callable[[float], Optional[float]]] = None, label: str = "") -> dict[str, Any]:
    """Run ``cmd`` (output to ``log``), polling the peak RSS of its process tree.

    ``deadline(launched_at)`` may return a time at which the process gets SIGINT
    (None: not yet known), again every 15 s while it runs (JoeyNMT can swallow one
    that lands mid-validation); past ``limit_s`` the same. After 90 s of that it gets
    SIGTERM, after 120 s SIGKILL, so a hung system never hangs the benchmark.
    The child gets SIGINT's default action back: a shell starts a background job
    (`distnmt bench peer ... &`, a CI script's `&`) with SIGINT ignored, Python then
    installs no KeyboardInterrupt handler, and every SIGINT would be lost until SIGTERM.
    """
    from distnmt.cluster import process_tree, tree_memory

    peak_total = peak_one = peak_pss = peak_uss = 0.0
    launched = time.time()
    interrupted_at: Optional[float] = None
    last_sigint = 0.0
    with open(log, "w", encoding="utf-8") as handle, tqdm(total=int(limit_s), desc=label, unit="s", leave=False) as bar:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=_default_sigint)
        try:
            while proc.poll() is None:
                # PSS: shared pages (torch's libraries in every Ray worker) counted once in
                # all, which summed RSS counts once per process; USS: private pages only.
                memory = tree_memory(process_tree(proc.pid))
                peak_total, peak_one = max(peak_total, memory["rss"]), max(peak_one, memory["largest_rss"])
                peak_pss, peak_uss = max(peak_pss, memory["pss"]), max(peak_uss, memory["uss"])
                now = time.time()
                bar.n = int(now - launched)
                bar.refresh()
                due = deadline(launched) if deadline is not None else None
                if interrupted_at is None and ((due is not None and now >= due) or now - launched > limit_s):
                    interrupted_at = last_sigint = now
                    os.kill(proc.pid, signal.SIGINT)  # JoeyNMT saves a checkpoint on it
                elif interrupted_at is not None and now - interrupted_at > 90:
                    proc.terminate() if now - interrupted_at < 120 else proc.kill()
                elif interrupted_at is not None and now - last_sigint >= 15:
                    last_sigint = now
                    os.kill(proc.pid, signal.SIGINT)
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {"returncode": proc.returncode, "wall_s": round(time.time() - launched, 1), "launched": launched,
            "interrupted": interrupted_at is not None, "peak_rss_tree_mib": round(peak_total),
            "peak_pss_tree_mib": round(peak_pss), "peak_uss_tree_mib": round(peak_uss),
            "peak_rss_largest_process_mib": round(peak_one)}


def minutes_to_targets(curve: list[dict[str, float]], targets: list[float]) -> dict[str, Optional[float]]:
    """For each target dev BLEU, the training minutes of the first point reaching it (None: never)."""
    return {f"{target:g}": next((round(p["minutes"], 2) for p in curve if p["bleu"] >= target), None)
            for target in targets}


def minutes_to_xent(curve: list[dict[str, Any]], targets: list[float]) -> dict[str, Optional[float]]:
    """For each target dev cross-entropy, the training minutes of the first point at or below it (None: never)."""
    return {f"{target:g}": next((round(p["minutes"], 2) for p in curve
                                 if p.get("xent") is not None and p["xent"] <= target), None)
            for target in targets}


def _decode_test(checkpoint: Path, test_prefix: Path, cfg: Config, beam: int) -> dict[str, Any]:
    """newstest2014 (the written subset) with a distnmt checkpoint, scored by score_corpus."""
    import dataclasses

    from distnmt.evaluate.scoring import score_corpus
    from distnmt.evaluate.translator import translator_from_checkpoint

    s, t = cfg.data.src_lang, cfg.data.tgt_lang
    sources = Path(f"{test_prefix}.{s}").read_text(encoding="utf-8").splitlines()
    refs = Path(f"{test_prefix}.{t}").read_text(encoding="utf-8").splitlines()
    translator = translator_from_checkpoint(checkpoint, dataclasses.replace(cfg.eval, beam_size=beam))
    started = time.time()
    hyps = translator.translate(sources, progress=True)
    return score_corpus(hyps, refs).to_dict() | {"decode_s": round(time.time() - started, 1)}


def distnmt_sets(name: str, overrides: list[str], minutes: float, checkpoint_every: int, runs: Path,
                 beam: int) -> list[str]:
    """``--set`` items of a distnmt or naive run: the two differ in ``data.bucketing`` only."""
    return [*overrides, f"train.max_minutes={minutes}", "train.max_steps=1000000000",
            f"train.checkpoint_every={checkpoint_every}", f"train.storage_path={runs}", f"train.name={name}",
            "eval.split=dev", "eval.test_at_end=false", "eval.figures=false", "logging.wandb=disabled",
            f"eval.beam_size={beam}", f"data.bucketing={'false' if name == 'naive' else 'true'}"]


def run_distnmt(name: str, cfg_path: Optional[Path], overrides: list[str], minutes: float, out: Path,
                data: PeerData, beam: int, targets: list[float], checkpoint_every: int,
                xent_targets: list[float]) -> dict[str, Any]:
    """One distnmt run (``naive``: without bucketing) under the budget, and its figures."""
    from distnmt.data.prepared import PreparedData
    from distnmt.evaluate.records import read_scores
    from distnmt.model.build import build_model

    runs = out / "runs"
    sets = distnmt_sets(name, overrides, minutes, checkpoint_every, runs, beam)
    cfg = load_config(cfg_path, sets)
    dev_lines = sum(1 for _ in open(f"{data.dev}.{cfg.data.src_lang}", encoding="utf-8"))
    cfg = load_config(cfg_path, [*sets, f"eval.max_sentences={dev_lines}"])
    run_dir = runs / name
    if run_dir.exists():
        import shutil
        shutil.rmtree(run_dir)  # a fresh run, never a resumed one: the budget is per run
    cmd = [sys.executable, "-m", "distnmt.cli", "train", *(["--config", str(cfg_path)] if cfg_path else []),
           *(x for s in [*sets, f"eval.max_sentences={dev_lines}"] for x in ("--set", s))]
    # Generous outer limit: start-up, the budget, the last checkpoint's scoring.
    watch = run_watched(cmd, out / f"{name}.log", limit_s=minutes * 60 + 600, label=name)
    if watch["returncode"] != 0:
        raise RuntimeError(f"{name}: distnmt train exited {watch['returncode']}; see {out / f'{name}.log'}")
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = metrics[0]
    # Training start: the first log line's time less the steps it covered.
    start = first["time"] - first["step"] * first["step_time_s"]
    scored = sorted((r for r in read_scores(run_dir / "eval/dev.jsonl") if r.origin == "training"),
                    key=lambda r: r.step)
    if not scored:
        raise RuntimeError(f"{name}: no checkpoint was scored; see {out / f'{name}.log'}")
    curve = [{"step": r.step, "minutes": (r.reported_at - start) / 60, "bleu": r.bleu, "xent": r.xent}
             for r in scored if r.reported_at is not None]
    best = max(scored, key=lambda r: r.bleu)
    vocab = PreparedData.from_config(cfg.data).vocab_sizes
    model = build_model(cfg.model, vocab["src"], vocab["tgt"])
    rates = [x["tokens_per_s"] for x in metrics[1:]] or [x["tokens_per_s"] for x in metrics]
    return {
        "system": name, "version": _distnmt_version(), "workers": cfg.train.max_workers,
        "bucketing": cfg.data.bucketing, "step_token_budget": cfg.step_token_budget(),
        "params": sum(p.numel() for p in model.parameters()),
        "tokens_per_s": round(statistics.median(rates)), "updates": max(metrics[-1]["step"], scored[-1].step),  # the last step is checkpointed, maybe not logged
        "last_checkpoint_step": scored[-1].step, "train_minutes": round(curve[-1]["minutes"], 2) if curve else None,
        "startup_s": round(start - watch["launched"], 1),
        "padding_efficiency": round(statistics.median(x["target_padding_efficiency"] for x in metrics), 4),
        "peak_rss_training_process_mib": round(max(x["peak_rss_mib"] for x in metrics)),
        **{k: watch[k] for k in ("peak_rss_tree_mib", "peak_pss_tree_mib", "peak_uss_tree_mib", "peak_rss_largest_process_mib", "wall_s")},
        "dev_curve": curve, "minutes_to_dev_bleu": minutes_to_targets(curve, targets),
        "minutes_to_dev_xent": minutes_to_xent(curve, xent_targets),
        "best_dev": {"checkpoint": best.checkpoint, "step": best.step, "bleu": best.bleu, "xent": best.xent},
        "last_dev_xent": scored[-1].xent,
        "test": _decode_test(Path(best.path or run_dir / best.checkpoint), data.test, cfg, beam),
    }


def run_joeynmt(python: Path, cfg: Config, minutes: float, out: Path, data: PeerData, beam: int,
                targets: list[float], validation_freq: int, xent_targets: list[float]) -> dict[str, Any]:
    """JoeyNMT under the budget (SIGINT at the deadline), then its best checkpoint on newstest2014."""
    import yaml

    from distnmt.evaluate.scoring import score_corpus

    model_dir = out / "joeynmt-model"
    if model_dir.exists():
        import shutil
        shutil.rmtree(model_dir)  # an old train.log would set the deadline from the old start
    config_file = out / "joeynmt.yaml"
    config_file.write_text(yaml.safe_dump(joeynmt_config(cfg, data, model_dir, validation_freq, beam),
                                          sort_keys=False), encoding="utf-8")
    train_log = model_dir / "train.log"

    def deadline(launched: float) -> Optional[float]:
        # The budget counts from its first training step, as distnmt's does.
        if not train_log.exists():
            return None
        start = parse_joeynmt_log(train_log.read_text(encoding="utf-8", errors="replace"), validation_freq)["start"]
        return None if start is None else start + minutes * 60

    env = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count() or 1))
    watch = run_watched([str(python), "-m", "joeynmt", "train", str(config_file), "--skip-test"], out / "joeynmt.log",
                        limit_s=minutes * 60 + 600, env=env, deadline=deadline, label="joeynmt")
    log = (parse_joeynmt_log(train_log.read_text(encoding="utf-8", errors="replace"), validation_freq)
           if train_log.exists() else None)
    if log is None or log["start"] is None or not log["train"]:
        raise RuntimeError(f"joeynmt: no training step logged in the budget; see {out / 'joeynmt.log'}")
    start = log["start"]
    # With label smoothing JoeyNMT's validation loss is the smoothed KL divergence, not the
    # plain cross-entropy distnmt's evaluator measures: then it has no comparable figure.
    smoothed = cfg.optim.label_smoothing > 0
    curve = [{"step": e["step"], "minutes": (e["time"] - start) / 60, "bleu": e["bleu"],
              "xent": None if smoothed else e["xent"]} for e in log["evals"]]
    # No validation in the budget: JoeyNMT's test then takes its latest checkpoint (the one SIGINT saved).
    best = max(curve, key=lambda p: p["bleu"]) if curve else None
    hyp = out / "joeynmt.hyp"
    done = subprocess.run([str(python), "-m", "joeynmt", "test", str(config_file),
                           "--output-path", str(hyp)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"joeynmt test failed: {done.stderr.strip().splitlines()[-1:]}")
    hyps = Path(f"{hyp}.test").read_text(encoding="utf-8").splitlines()
    refs = Path(f"{data.test}.{cfg.data.tgt_lang}").read_text(encoding="utf-8").splitlines()
    rates = [x["tokens_per_s"] for x in log["train"][1:]] or [x["tokens_per_s"] for x in log["train"]]
    from distnmt.data.prepared import PreparedData

    src, tgt = PreparedData.from_config(cfg.data).train_arrays()
    src_len, tgt_len = src.lengths, tgt.lengths
    return {
        "system": "joeynmt", "version": JOEYNMT_VERSION, "workers": 1, "bucketing": False,
        "step_token_budget": joeynmt_batch_size(cfg), "params": log["params"],
        "tokens_per_s": round(statistics.median(rates)) if rates else None,
        "updates": log["train"][-1]["step"], "last_checkpoint_step": curve[-1]["step"] if curve else None,
        "train_minutes": round(((log["train"][-1]["time"] if log["train"] else start) - start) / 60, 2),
        "startup_s": round(start - watch["launched"], 1),
        # Replayed from its sampler's rule over the same lengths: JoeyNMT logs none.
        "padding_efficiency": round(joeynmt_padding_efficiency(np.asarray(src_len), np.asarray(tgt_len),
                                                               joeynmt_batch_size(cfg), cfg.train.seed), 4),
        "peak_rss_training_process_mib": watch["peak_rss_largest_process_mib"],
        **{k: watch[k] for k in ("peak_rss_tree_mib", "peak_pss_tree_mib", "peak_uss_tree_mib", "peak_rss_largest_process_mib", "wall_s")},
        "dev_curve": curve, "minutes_to_dev_bleu": minutes_to_targets(curve, targets),
        "minutes_to_dev_xent": minutes_to_xent(curve, xent_targets),
        "best_dev": ({"checkpoint": "best.ckpt", "step": best["step"], "bleu": best["bleu"], "xent": best["xent"]}
                     if best else {"checkpoint": "latest.ckpt", "step": log["train"][-1]["step"], "bleu": None,
                                   "xent": None}),
        "last_dev_xent": curve[-1]["xent"] if curve else None,
        "test": score_corpus(hyps, refs).to_dict(),
    }


def _distnmt_version() -> str:
    try:
        from importlib.metadata import version
        return version("distnmt")
    except Exception:  # not installed as a distribution (e.g. run from a checkout)
        return "checkout"


# ------------------------------------------------------------------ report


def ratios(results: list[dict[str, Any]]) -> dict[str, Optional[float]]:
    """distnmt's tokens/s, test BLEU and last dev cross-entropy against each other system's (the issue's targets)."""
    by = {r["system"]: r for r in results if "error" not in r}
    out: dict[str, Optional[float]] = {}
    if "distnmt" in by:
        for other in ("joeynmt", "naive"):
            if other in by and by[other].get("tokens_per_s"):
                out[f"tokens_per_s_vs_{other}"] = round(by["distnmt"]["tokens_per_s"] / by[other]["tokens_per_s"], 2)
                out[f"test_bleu_minus_{other}"] = round(by["distnmt"]["test"]["bleu"] - by[other]["test"]["bleu"], 2)
            ours, theirs = by["distnmt"].get("last_dev_xent"), by.get(other, {}).get("last_dev_xent")
            if ours is not None and theirs is not None:  # at the end of the same budget; lower is better
                out[f"last_dev_xent_minus_{other}"] = round(ours - theirs, 3)
    return out


def _fmt(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.2f}"


def _fmt3(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.3f}"


def markdown(header: dict[str, Any], results: list[dict[str, Any]], targets: list[float],
             xent_targets: Optional[list[float]] = None) -> str:
    """The figures as one markdown page: header, one row per system, the ratios, dev BLEU and
    cross-entropy over time."""
    xent_targets = xent_targets or []
    lines = ["# distnmt bench peer\n", *(f"- {k}: {v}" for k, v in header.items() if k != "ratios"), ""]
    cols = ["system", "tgt tokens/s", "updates", "params", "padding eff", "peak RSS train proc MiB",
            "peak RSS tree MiB (summed)", "peak PSS tree MiB", "peak USS tree MiB", "start-up s", "best dev BLEU",
            *(f"min to dev {t:g}" for t in targets),
            "last dev xent", *(f"min to dev xent {t:g}" for t in xent_targets), "newstest2014 BLEU"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['system']} | {r['error']} |" + " |" * (len(cols) - 2))
            continue
        reach = [("" if v is None else f"{v:.1f}") for v in r["minutes_to_dev_bleu"].values()]
        xent_reach = [("" if v is None else f"{v:.1f}") for v in r.get("minutes_to_dev_xent", {}).values()]
        xent_reach += [""] * (len(xent_targets) - len(xent_reach))
        lines.append("| " + " | ".join([
            r["system"], f"{r['tokens_per_s']}", f"{r['updates']}", f"{r['params']:,}" if r["params"] else "",
            f"{r['padding_efficiency']:.3f}", f"{r['peak_rss_training_process_mib']}", f"{r['peak_rss_tree_mib']}",
            f"{r.get('peak_pss_tree_mib', '')}", f"{r.get('peak_uss_tree_mib', '')}",
            f"{r['startup_s']}", _fmt(r["best_dev"]["bleu"]), *reach, _fmt3(r.get("last_dev_xent")),
            *xent_reach[:len(xent_targets)], f"{r['test']['bleu']:.2f}"]) + " |")
    lines += ["", "Ratios: " + (", ".join(f"{k} {v}" for k, v in header["ratios"].items()) or "none"), ""]
    signatures = {r["test"]["bleu_signature"] for r in results if "error" not in r}
    lines += [f"newstest2014 sacreBLEU signature: {', '.join(sorted(signatures))}", "",
              "## Dev BLEU and cross-entropy over time\n",
              "dev xent: teacher-forced cross-entropy per target subword (nats, EOS included) on the dev subset.\n",
              "| system | step | train minutes | dev BLEU | dev xent |", "|---|---|---|---|---|"]
    for r in results:
        for p in r.get("dev_curve", []):
            lines.append(f"| {r['system']} | {p['step']} | {p['minutes']:.2f} | {p['bleu']:.2f} | "
                         f"{_fmt3(p.get('xent'))} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="distnmt bench peer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs/quickstart.yaml", help="distnmt config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="distnmt config overrides, applied to every system (e.g. data.prepared_dir=...)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="training budget per system, wall clock from its first step (default 20; --tiny 0.05)")
    parser.add_argument("--systems", default="distnmt,joeynmt,naive", help=f"comma-separated, of {', '.join(SYSTEMS)}")
    parser.add_argument("--targets", default="0.1,0.2,0.5,1", help="dev BLEU values to time")
    parser.add_argument("--xent-targets", default="6,5,4.5,4",
                        help="dev cross-entropy values (nats per target subword) to time")
    parser.add_argument("--dev-sentences", type=int, default=500, help="dev (newstest2013) subset each system validates on")
    parser.add_argument("--test-sentences", type=int, default=None, help="newstest2014 subset (default: all 3003)")
    parser.add_argument("--checkpoint-every", type=int, default=80, help="steps between checkpoints / validations")
    parser.add_argument("--beam", type=int, default=1, help="beam size for dev and test decoding (1 = greedy)")
    parser.add_argument("--joeynmt-venv", type=Path, default=DEFAULT_VENV, help="JoeyNMT's own virtual environment")
    parser.add_argument("--tiny", action="store_true",
                        help="seconds: tiny model, 3 s budget, 20 dev/test sentences; JoeyNMT skipped if its venv is missing")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="where peer.json/peer.md go")
    args = parser.parse_args(argv)

    systems = [s for s in args.systems.split(",") if s]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise ConfigError(f"--systems: unknown {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    targets = [float(x) for x in args.targets.split(",")]
    xent_targets = [float(x) for x in args.xent_targets.split(",") if x]
    overrides = list(args.overrides)
    args.minutes = args.minutes if args.minutes is not None else (0.05 if args.tiny else 20.0)
    if args.tiny:
        overrides += TINY_MODEL
        args.dev_sentences, args.test_sentences = 20, args.test_sentences or 20
        # Few checkpoints: each queued validation holds the run open at its end.
        args.checkpoint_every = min(args.checkpoint_every, 5)
    cfg = load_config(args.config, overrides)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    data = write_peer_data(cfg, args.out / "data", args.dev_sentences, args.test_sentences)

    results: list[dict[str, Any]] = []
    for system in systems:
        print(f"[peer] {system}: {args.minutes:g} min budget", flush=True)
        try:
            if system == "joeynmt":
                python = ensure_joeynmt(args.joeynmt_venv, install=not args.tiny)
                if python is None:
                    results.append({"system": "joeynmt", "error": f"skipped: no JoeyNMT venv at {args.joeynmt_venv} "
                                    "(--tiny never makes one; run without --tiny once to make it)"})
                    print(f"[peer] {results[-1]['error']}", flush=True)
                    continue
                results.append(run_joeynmt(python, cfg, args.minutes, args.out, data, args.beam, targets,
                                           args.checkpoint_every, xent_targets))
            else:
                results.append(run_distnmt(system, args.config, overrides, args.minutes, args.out, data, args.beam,
                                           targets, args.checkpoint_every, xent_targets))
        except (RuntimeError, subprocess.CalledProcessError, FileNotFoundError) as err:
            # One system failing must not cost the others' figures; the table says why.
            results.append({"system": system, "error": str(err).splitlines()[0]})
            print(f"[peer] {system} failed: {err}", flush=True)

    import torch

    header = {
        "command": "distnmt bench peer " + " ".join(argv), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s), {platform.processor() or platform.platform()}",
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, joeynmt {JOEYNMT_VERSION}",
        "budget_minutes": args.minutes, "config": str(args.config), "overrides": overrides,
        "model": f"embed {cfg.model.embed_size}, hidden {cfg.model.hidden_size}, align {cfg.model.align_size}",
        "step_token_budget": cfg.step_token_budget(), "train_pairs": data.train_pairs,
        "dev_sentences": args.dev_sentences, "test_sentences": args.test_sentences or "all (3003)",
        "beam": args.beam, "ratios": ratios(results),
    }
    (args.out / "peer.json").write_text(json.dumps({"header": header, "results": results}, indent=1), encoding="utf-8")
    page = markdown(header, results, targets, xent_targets)
    (args.out / "peer.md").write_text(page, encoding="utf-8")
    print(page)
    return 0 if all("error" not in r or r["error"].startswith("skipped") for r in results) else 1
