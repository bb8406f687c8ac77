"""``distnmt bench claim``: the paper's central claim (its Figure 2) in miniature, on CPU.

RNNencdec, which squeezes a sentence into one vector, degrades as sentences get
longer; RNNsearch, which aligns, does not. Here both models, of the same size and
with the same budget (``train.max_steps`` or ``train.max_minutes``), train through
the real path on a task whose translation is known exactly:

1. ``distnmt prepare --config configs/claim.yaml --synthetic ...``: the synthetic
   corpus of :mod:`distnmt.data.synthetic` (a dictionary word for word, each group
   of 3 words reversed, source lengths 3-70), cleaned, sentencepiece-encoded and
   sharded like any corpus;
2. for each model, :func:`distnmt.train.driver.run_training`: Ray Train workers
   and the evaluator actor, which scores every checkpoint on dev and the best one
   on test (beam search, sacreBLEU);
3. the best checkpoint's test translations, BLEU by source length for both models
   in one figure (``claim_bleu_by_length.png``, the paper's Figure 2), the
   attention of RNNsearch on the longest dev sentence
   (``claim_attention.png``, its Figure 3), and every figure in ``claim.json`` /
   ``claim.md``.

``--tiny`` (the suite's test) trains a tiny model on sentences of 3-12 words for
a few hundred steps: RNNsearch must reach dev BLEU 90 there, which a bug in the
masking, the attention, beam search or detokenisation prevents.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

from distnmt.config import ConfigError, load_config
from distnmt.io import write_json, write_text

REPO = Path(__file__).resolve().parents[2]
MODELS = ("rnnsearch", "rnnencdec")
# The task of the full run and of --tiny (distnmt/data/synthetic.py SyntheticTask fields).
TASK = {"max_words": 70, "train_pairs": 20000, "dev_pairs": 200, "test_pairs": 500}
TINY_TASK = {"max_words": 12, "train_pairs": 3000, "dev_pairs": 100, "test_pairs": 100}
# --tiny: a model that learns the short task in a few hundred single-worker steps.
TINY = [
    "model.embed_size=32", "model.hidden_size=64", "model.align_size=64", "model.maxout_size=64",
    "optim.lr=0.01", "train.workers=1", "train.cpus_per_worker=1", "train.batch_sentences=32",
    "train.max_steps=1000", "train.checkpoint_every=500", "eval.beam_size=3", "eval.batch_sentences=100",
    "eval.policy=every", "logging.log_every=50",
]


def _figure(results: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    """BLEU by source length, one line per model, in the style of the paper's Figure 2."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from distnmt.evaluate.figures import LENGTH_BIN

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    styles = {"rnnsearch": ("RNNsearch", "-", "o"), "rnnencdec": ("RNNencdec", "--", "s")}
    for model, result in results.items():
        bins = result["test_bleu_by_length"]
        label, line, marker = styles[model]
        x = [b["low"] + (LENGTH_BIN - 1) / 2 for b in bins]
        ax.plot(x, [b["bleu"] for b in bins], linestyle=line, marker=marker, label=f"{label} (test BLEU {result['test_bleu']:.1f})")
    labels = {b["low"] + (LENGTH_BIN - 1) / 2: (f"{b['low']}+" if b["high"] < 0 else f"{b['low']}-{b['high']}")
              for r in results.values() for b in r["test_bleu_by_length"]}
    ax.set_xticks(list(labels), list(labels.values()))
    ax.set_xlabel("Sentence length (source words)")
    ax.set_ylabel("BLEU score")
    ax.set_ylim(0, 102)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _scores(run_dir: Path, prepared: Path, cfg: Any) -> dict[str, Any]:
    """Best dev BLEU, its checkpoint's test BLEU and test BLEU by source length, from the evaluator's files."""
    from distnmt.data.prepared import PreparedData
    from distnmt.evaluate.figures import bleu_by_length

    final = json.loads((run_dir / "eval" / "final.json").read_text(encoding="utf-8"))
    best, test = final["best"], final["test"]
    if best is None or test is None:
        raise RuntimeError(f"{run_dir}: the evaluator scored no checkpoint on dev and test (see eval/final.json)")
    hypotheses = (run_dir / "eval" / test["hyp_file"]).read_text(encoding="utf-8").splitlines()
    sources, references = PreparedData.from_config(cfg.data).eval_text("test")
    bins = bleu_by_length(sources, hypotheses, references)
    exact = sum(h == r for h, r in zip(hypotheses, references))
    dev = [json.loads(line) for line in (run_dir / "eval" / "dev.jsonl").read_text(encoding="utf-8").splitlines()]
    return {
        "best_checkpoint": best["checkpoint"], "best_step": best["step"], "dev_bleu": best["bleu"],
        "dev_bleu_by_step": {r["step"]: r["bleu"] for r in sorted(dev, key=lambda r: r["step"])},
        "test_bleu": test["bleu"], "test_bleu_line": test["bleu_line"], "test_exact_match": exact / max(len(references), 1),
        "test_bleu_by_length": [{"low": b.low, "high": b.high, "sentences": b.sentences, "bleu": round(b.bleu, 2)} for b in bins],
        "checkpoint_path": best.get("path") or str(run_dir / best["checkpoint"]),
    }


def _attention(checkpoint: Path, prepared: Path, cfg: Any, path: Path) -> dict[str, Any]:
    """RNNsearch's alignment of the longest dev sentence (the paper's Figure 3)."""
    from distnmt.data.prepared import PreparedData
    from distnmt.evaluate.figures import plot_attention
    from distnmt.evaluate.translator import translator_from_checkpoint

    sources, references = PreparedData.from_config(cfg.data).eval_text("dev")
    index = max(range(len(sources)), key=lambda i: len(sources[i].split()))
    translator = translator_from_checkpoint(checkpoint, cfg.eval)
    (alignment,) = translator.attention([sources[index]])
    words = len(sources[index].split())
    plot_attention(alignment.src_pieces, alignment.tgt_pieces, alignment.weights, path,
                   f"RNNsearch, dev sentence {index + 1} ({words} words): "
                   f"{'exact' if alignment.translation == references[index] else 'not exact'}")
    return {"dev_index": index, "words": words, "exact": alignment.translation == references[index],
            "source": sources[index], "translation": alignment.translation, "reference": references[index]}


def _markdown(result: dict[str, Any]) -> str:
    rows = ["# distnmt bench claim", "", f"- command: `{result['command']}`",
            *(f"- {k}: {v}" for k, v in result["setup"].items()), "",
            "| model | steps | wall s | best dev BLEU (step) | test BLEU | test exact match |",
            "|---|---:|---:|---:|---:|---:|"]
    for model, r in result["models"].items():
        rows.append(f"| {model} | {r['steps']} | {r['wall_s']:.0f} | {r['dev_bleu']:.2f} ({r['best_step']}) | "
                    f"{r['test_bleu']:.2f} | {100 * r['test_exact_match']:.1f}% |")
    models = list(result["models"])
    rows += ["", "Test BLEU by source length (words):", "",
             "| length | sentences | " + " | ".join(models) + " |", "|---|---:|" + "---:|" * len(models)]
    by_model = {m: {b["low"]: b for b in result["models"][m]["test_bleu_by_length"]} for m in models}
    for low in sorted({low for bins in by_model.values() for low in bins}):
        first = next(bins[low] for bins in by_model.values() if low in bins)
        label = f"{low}+" if first["high"] < 0 else f"{low}-{first['high']}"
        cells = [f"{by_model[m][low]['bleu']:.2f}" if low in by_model[m] else "" for m in models]
        rows.append(f"| {label} | {first['sentences']} | " + " | ".join(cells) + " |")
    if result.get("attention"):
        a = result["attention"]
        rows += ["", f"Attention figure: dev sentence {a['dev_index'] + 1} ({a['words']} words), "
                     f"translation {'exact' if a['exact'] else 'not exact'}."]
    return "\n".join(rows) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="distnmt bench claim", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs/claim.yaml", help="the claim config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides for both models (e.g. train.max_minutes=8)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--tiny", action="store_true", help="the suite's version: short sentences, a tiny model, 1 worker")
    parser.add_argument("--out", type=Path, default=Path("bench-results/claim"), help="corpus, runs and figures go here")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    if not models or any(m not in MODELS for m in models):
        raise ConfigError(f"--models {args.models!r}: choose from {', '.join(MODELS)}")
    out = args.out.resolve()
    task = TINY_TASK if args.tiny else TASK
    common = [f"data.source_dir={out / 'corpus'}", f"data.prepared_dir={out / 'prepared'}",
              f"train.storage_path={out / 'runs'}", *(TINY if args.tiny else []), *args.overrides]

    from distnmt.data.prepare import prepare
    from distnmt.data.synthetic import write_for_config
    from distnmt.orchestrate import run_training

    started = time.time()
    # What `distnmt prepare --synthetic` does: write the task, then prepare it like any corpus.
    data_cfg = load_config(args.config, common)
    print(f"[bench claim] synthetic corpus in {data_cfg.data.source_dir}: {write_for_config(data_cfg.data, task)}",
          flush=True)
    prepare(data_cfg.data, seed=data_cfg.train.seed, progress=False)
    prepared = out / "prepared"
    results: dict[str, dict[str, Any]] = {}
    for model in models:
        cfg = load_config(args.config, [*common, f"model.arch={model}", f"train.name={model}"])
        run_started = time.time()
        run_training(cfg)
        run_dir = out / "runs" / model
        scores = _scores(run_dir, prepared, cfg)
        # The last checkpoint's step: train.max_minutes stops between logged steps.
        results[model] = {"steps": max(scores["dev_bleu_by_step"], default=0), "wall_s": round(time.time() - run_started, 1),
                          **scores}
        print(f"[bench claim] {model}: dev BLEU {results[model]['dev_bleu']:.2f}, test BLEU {results[model]['test_bleu']:.2f}", flush=True)

    cfg = load_config(args.config, common)
    title = (f"Synthetic task ({task['max_words']}-word max), {cfg.model.hidden_size} units, "
             f"beam {cfg.eval.beam_size}: BLEU by source length on test")
    result: dict[str, Any] = {
        "command": "distnmt bench claim " + " ".join(argv),
        "setup": {"task": task, "model": f"embed {cfg.model.embed_size}, hidden {cfg.model.hidden_size}, "
                                         f"align {cfg.model.align_size}, maxout {cfg.model.maxout_size}, gru {cfg.model.gru}",
                  "optim": f"{cfg.optim.name} lr {cfg.optim.lr}", "workers": cfg.train.workers,
                  "budget": f"max_steps {cfg.train.max_steps}, max_minutes {cfg.train.max_minutes}",
                  "batch": f"{cfg.train.batch_sentences} sentences per update" if cfg.train.batch_sentences
                  else f"{cfg.data.max_tokens} tokens per worker",
                  "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "total_wall_s": None},
        "models": results,
        "figures": {"bleu_by_length": "claim_bleu_by_length.png"},
    }
    _figure(results, out / "claim_bleu_by_length.png", title)
    if "rnnsearch" in results:
        result["attention"] = _attention(Path(results["rnnsearch"]["checkpoint_path"]), prepared, cfg,
                                         out / "claim_attention.png")
        result["figures"]["attention"] = "claim_attention.png"
    result["setup"]["total_wall_s"] = round(time.time() - started, 1)
    write_json(out / "claim.json", result)
    write_text(out / "claim.md", _markdown(result))
    print(f"[bench claim] {out / 'claim.md'}, {out / 'claim.json'}, figures in {out}", flush=True)
    return 0
