"""``distnmt prepare | train | evaluate | translate | bench | cluster``.

prepare, train and evaluate take ``--config FILE`` and any number of ``--set
key=value`` overrides; translate reads its settings from the checkpoint, bench and
cluster have options of their own (``--help``). User mistakes (config, data,
checkpoints) end in one line on stderr and exit status 2, never in a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from distnmt.checkpoint import CheckpointError
from distnmt.config import Config, ConfigError, EvalConfig, load_config
from distnmt.data.errors import DataError

USER_ERRORS = (ConfigError, DataError, CheckpointError)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", type=Path, help="experiment YAML (default: built-in defaults)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config key, e.g. --set model.hidden_size=256 (repeatable)",
    )


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def cmd_prepare(args: argparse.Namespace) -> int:
    """WMT'14 sources (a mirror directory, or downloads) -> cleaned, sentencepiece-encoded, sharded token arrays.

    Prints and writes (report.md, report.json) the pairs read, kept and dropped per
    cleaning rule and per part. Re-running with the same inputs and config reuses
    what is done; see docs/DATA.md.
    """
    from distnmt.data.prepare import prepare
    from distnmt.data.prepared import PreparedData

    overrides = list(args.overrides)
    if args.mirror is not None:
        overrides.append(f"data.source_dir={args.mirror}")
    cfg = load_config(args.config, overrides)  # every data value's range is checked here
    if args.synthetic is not None:  # [] for a bare --synthetic: the defaults
        _write_synthetic(cfg, args.synthetic)
    started = time.time()
    result = prepare(cfg.data, seed=cfg.train.seed, progress=not args.quiet)
    counts = result.manifest.get("counts", {})
    print(f"[prepare] wrote {result.out_dir} in {time.time() - started:.1f} s: {json.dumps(counts)}", flush=True)
    print(f"[prepare] report: {PreparedData(result.out_dir).report_md}", flush=True)
    return 0


def _write_synthetic(cfg: Config, settings: list[str]) -> None:
    """``prepare --synthetic``: write the synthetic task's plain-text corpus into data.source_dir.

    The config must read it where it is written (data.train_prefix etc., as in
    configs/claim.yaml); prepare then runs on it as on any corpus.
    """
    from distnmt.data.synthetic import write_for_config

    fields: dict[str, int] = {}
    for item in settings:
        key, _, value = item.partition("=")
        if key not in ("words", "min_words", "max_words", "group", "train_pairs", "dev_pairs", "test_pairs", "seed",
                       "log_lengths") \
                or not value.strip().isdigit():
            raise ConfigError(f"--synthetic {item!r}: expected KEY=INTEGER with KEY one of words, min_words, max_words, "
                              "group, train_pairs, dev_pairs, test_pairs, seed, log_lengths")
        fields[key] = int(value)
    task = write_for_config(cfg.data, fields)
    print(f"[prepare] synthetic corpus in {cfg.data.source_dir}: {task}", flush=True)


def cmd_train(args: argparse.Namespace) -> int:
    """Train with Ray (local cluster unless an address is given); the evaluator scores checkpoints."""
    from distnmt.orchestrate import TrainingError, run_training

    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"train.ray_address={args.address}")
    cfg = load_config(args.config, overrides)
    try:
        run_training(cfg)
    except TrainingError as err:
        print(f"distnmt train: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C or SIGTERM: the driver has stopped its Ray cluster on the way out.
        print("distnmt train: interrupted; run the same command again to resume from the last checkpoint",
              file=sys.stderr)
        return 130
    return 0


def _eval_overrides(args: argparse.Namespace, cfg: Config) -> EvalConfig:
    """The checkpoint's decoding settings with the command line's --beam/--split/--max-sentences."""
    changes: dict[str, object] = {}
    if args.beam is not None:
        changes["beam_size"] = args.beam
    if getattr(args, "split", None):
        changes["split"] = args.split
    if getattr(args, "max_sentences", None) is not None:
        changes["max_sentences"] = args.max_sentences
    return dataclasses.replace(cfg.eval, **changes)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score one checkpoint, or the average of the last N, on dev or test: no Ray, no evaluator actor."""
    import shutil

    import torch

    from distnmt.checkpoint import check_vocab, read_meta
    from distnmt.config import _apply_override, config_from_dict, parse_override
    from distnmt.data.prepared import PreparedData
    from distnmt.evaluate.average import average_checkpoints, last_checkpoints
    from distnmt.evaluate.records import RecordStore
    from distnmt.evaluate.score import decode_settings, evaluate_checkpoint, load_split

    checkpoint = Path(args.checkpoint)
    if args.config:
        cfg = load_config(args.config, args.overrides)
    else:
        # --set applies to the checkpoint's own config (its model, data and decoding settings).
        data = read_meta(checkpoint)["config"]
        for text in args.overrides:
            _apply_override(data, *parse_override(text))
        cfg = config_from_dict(data)
    cfg = dataclasses.replace(cfg, eval=_eval_overrides(args, cfg))
    prepared = args.prepared or Path(cfg.data.prepared_dir)
    # The checkpoint decodes with its own sentencepiece models, but data prepared with
    # another vocabulary means another preparation than the one it was trained for.
    prepared_data = PreparedData(Path(prepared), cfg.data.src_lang, cfg.data.tgt_lang)
    check_vocab(read_meta(checkpoint), prepared_data.spm_sha256, checkpoint)
    out = args.out or checkpoint.parent
    if args.average < 1:
        raise ConfigError(f"--average {args.average}: must be at least 1 (1 = no averaging)")
    if args.average > 1:
        paths = last_checkpoints(checkpoint, args.average)
        averaged = out / "averaged" / f"avg{args.average}_{checkpoint.name}"
        shutil.rmtree(averaged, ignore_errors=True)  # the same inputs give the same average: rewrite it
        checkpoint = average_checkpoints(paths, averaged)
        print(f"[evaluate] averaged {' '.join(p.name for p in paths)} into {checkpoint}", flush=True)
    torch.set_num_threads(cfg.eval.threads)
    device = "cuda" if cfg.eval.num_gpus > 0 and torch.cuda.is_available() else "cpu"
    split = load_split(prepared_data, cfg, cfg.eval.split)
    store = RecordStore(Path(out) / "eval")
    # A checkpoint already scored with these settings is not decoded again.
    record = store.find(split.name, checkpoint.name, decode_settings(cfg.eval, len(split.sources)))
    reused = " (persisted score reused)" if record is not None else ""
    if record is None:
        record = evaluate_checkpoint(checkpoint, checkpoint.name, split, cfg.eval, store, "evaluate", device).record
    cpu = "" if record.decode_cpu_seconds is None else f"; {record.decode_cpu_seconds:.1f} s of CPU"
    print(
        f"[evaluate] {record.sentences} sentences, beam {record.beam_size}: decoded in "
        f"{record.decode_seconds:.1f} s ({record.sentences_per_s:.1f} sentences/s{cpu}, {cfg.eval.threads} "
        f"thread(s)){reused}; hypotheses in {Path(out) / 'eval' / record.hyp_file}"
    )
    print(f"{record.test_set} {record.checkpoint}: {record.bleu_line}")
    print(f"chrF2|{record.chrf_signature} = {record.chrf:.2f}")
    if record.xent is not None:
        print(f"cross-entropy per target subword (teacher-forced, {record.xent_tokens} subwords incl. EOS) = "
              f"{record.xent:.4f} nats")
    return 0


def cmd_translate(args: argparse.Namespace) -> int:
    """stdin -> stdout, one sentence per line."""
    from distnmt.checkpoint import read_meta
    from distnmt.config import config_from_dict
    from distnmt.evaluate.translator import translator_from_checkpoint

    stored = config_from_dict(read_meta(args.checkpoint)["config"])
    translator = translator_from_checkpoint(args.checkpoint, _eval_overrides(args, stored))
    data = sys.stdin.buffer.read()
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        raise DataError.at("<stdin>", data.count(b"\n", 0, err.start) + 1,
                           f"not valid UTF-8 ({err.reason} at byte {err.start - line_start + 1} of the line)") from None
    for text in translator.translate(lines, progress=not args.quiet):
        sys.stdout.write(text + "\n")
    sys.stdout.flush()
    return 0


# distnmt/bench/<name>.py ("-" -> "_"), each with main(argv) -> int; "all" runs the others in turn.
BENCHMARKS = ("data", "model", "train", "peer", "eval-lag", "gpu", "claim", "all")


def cmd_bench(args: argparse.Namespace) -> int:
    """Run one benchmark; each writes its figures as JSON and markdown (see --help of each)."""
    import importlib

    module = importlib.import_module(f"distnmt.bench.{args.benchmark.replace('-', '_')}")
    return int(module.main(args.bench_args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distnmt", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="clean WMT'14, train sentencepiece, write sharded token arrays",
                       description=cmd_prepare.__doc__)
    _add_config_args(p)
    p.add_argument("--mirror", metavar="DIR",
                   help="local directory holding the WMT'14 archives or their extracted files "
                        "(sets data.source_dir; with data.source_dir null, prepare downloads)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or report table")
    p.add_argument("--synthetic", nargs="*", metavar="KEY=N",
                   help="first write the synthetic task of distnmt/data/synthetic.py into data.source_dir "
                        "(e.g. --synthetic max_words=70 group=3; bare: its defaults); see configs/claim.yaml")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train on Ray (DDP workers + evaluator actor)", description=cmd_train.__doc__)
    _add_config_args(p)
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start a local cluster)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="score a checkpoint with sacreBLEU", description=cmd_evaluate.__doc__)
    p.add_argument("checkpoint", type=Path, help="checkpoint directory")
    _add_config_args(p)
    p.add_argument("--split", choices=["dev", "test"], help="dev (newstest2013) or test (newstest2014)")
    p.add_argument("--beam", type=int, help="beam size (1 = greedy)")
    p.add_argument("--max-sentences", type=int, help="score only the first N sentences")
    p.add_argument("--prepared", type=Path, help="prepared data directory (default: the config's)")
    p.add_argument("--out", type=Path, help="where eval/*.jsonl and hypotheses go (default: beside the checkpoint)")
    p.add_argument("--average", type=int, default=1, metavar="N",
                   help="score the average of the weights of the last N checkpoints up to CHECKPOINT "
                        "(written to OUT/averaged/); default 1: no averaging")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("translate", help="translate stdin to stdout", description=cmd_translate.__doc__)
    p.add_argument("checkpoint", type=Path, help="checkpoint directory")
    p.add_argument("--beam", type=int, help="beam size (1 = greedy)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_translate)

    p = sub.add_parser("bench", help="benchmarks that write their figures to files", description=cmd_bench.__doc__)
    p.add_argument("benchmark", choices=BENCHMARKS, help="which benchmark")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of that benchmark (try: distnmt bench data --help)")
    p.set_defaults(func=cmd_bench)

    from distnmt import cluster

    cluster.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except USER_ERRORS as err:
        _end_progress_bars()
        print(f"distnmt {args.command}: error: {err}", file=sys.stderr)
        return 2


def _end_progress_bars() -> None:
    """Close the progress bars an error left open, so that the error starts a line of
    its own instead of continuing the bar's (``clean: 0 pairs [...]distnmt prepare: error``)."""
    if "tqdm" not in sys.modules:
        return
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
