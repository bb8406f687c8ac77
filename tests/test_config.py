"""Config loading: every shipped config loads; mistakes are one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from distnmt.config import Config, ConfigError, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def test_configs_are_shipped() -> None:
    names = {p.name for p in SHIPPED}
    assert {"quickstart.yaml", "rnnsearch-50.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_key_of_shipped_configs_is_commented(path: Path) -> None:
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        is_section = stripped.endswith(":") and not line.startswith(" ")
        assert is_section or "#" in line, f"{path.name}:{number}: key without a comment: {line!r}"


def test_paper_config_has_the_paper_values() -> None:
    cfg = load_config(REPO / "configs/rnnsearch-50.yaml")
    m = cfg.model
    assert (m.embed_size, m.hidden_size, m.align_size, m.maxout_size) == (620, 1000, 1000, 500)
    assert (cfg.optim.name, cfg.optim.eps, cfg.optim.rho, cfg.optim.clip_norm) == ("adadelta", 1e-6, 0.95, 1.0)
    assert (cfg.data.vocab_size, cfg.data.max_words) == (30000, 50) and cfg.data.max_len > 4 * cfg.data.max_words  # words only


def test_overrides_are_typed() -> None:
    cfg = load_config(None, ["model.hidden_size=256", "optim.lr=1e-3", "train.use_gpu=false", "data.max_train_pairs=null"])
    assert cfg.model.hidden_size == 256
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.train.use_gpu is False
    assert cfg.data.max_train_pairs is None
    # An int where a float is expected is widened, not rejected.
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0


def _error(tmp_path: Path, yaml_text: str | None, overrides: list[str] = []) -> str:
    path = None
    if yaml_text is not None:
        path = tmp_path / "exp.yaml"
        path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_key_in_file_names_file_line_and_closest_key(tmp_path: Path) -> None:
    message = _error(tmp_path, "model:\n  embed_size: 64\n  hiden_size: 3\n")
    assert message.endswith("exp.yaml:3: unknown key 'model.hiden_size' (did you mean 'model.hidden_size'?)")


def test_unknown_section(tmp_path: Path) -> None:
    assert "unknown key 'modle' (did you mean 'model'?)" in _error(tmp_path, "modle:\n  x: 1\n")


def test_wrong_type_in_file(tmp_path: Path) -> None:
    message = _error(tmp_path, "train:\n  workers: two\n")
    assert message.endswith("exp.yaml:2: train.workers: expected int or list, got str 'two'")


def test_bool_is_not_an_int(tmp_path: Path) -> None:
    assert "train.workers: expected int or list, got bool True" in _error(tmp_path, "train:\n  workers: true\n")


def test_bad_choice(tmp_path: Path) -> None:
    assert "train.backend: 'horovod' is not one of 'ddp', 'deepspeed'" in _error(tmp_path, "train:\n  backend: horovod\n")


def test_override_errors_name_the_key(tmp_path: Path) -> None:
    assert _error(tmp_path, None, ["model.hiden_size=3"]) == "--set: unknown key 'model.hiden_size' (did you mean 'model.hidden_size'?)"
    assert _error(tmp_path, None, ["model.hidden_size=big"]) == "--set model.hidden_size: expected int, got str 'big'"
    assert "expected KEY=VALUE" in _error(tmp_path, None, ["model.hidden_size"])
    assert "is a value, not a section" in _error(tmp_path, None, ["train.workers.x=1"])


def test_impossible_values(tmp_path: Path) -> None:
    assert "train.workers: -1 must be a number of workers >= 1, 0 (Ray Train's local mode" in _error(tmp_path, "train:\n  workers: -1\n")
    assert load_config(None, ["train.workers=0"]).train.local_mode  # one process, no cluster
    assert "train.workers: [2, 1] must be a number of workers >= 1, 0 (" in _error(tmp_path, "train:\n  workers: [2, 1]\n")
    assert "train.workers: [1, 2, 4] must be" in _error(tmp_path, "train:\n  workers: [1, 2, 4]\n")


def test_elastic_zero3_is_refused_up_front(tmp_path: Path) -> None:
    """ZeRO-1/2 state is re-sharded through a universal checkpoint; ZeRO-3's is not tested, so refused."""
    from distnmt.orchestrate import check_elastic

    zero3 = tmp_path / "zero3.json"
    zero3.write_text('{"zero_optimization": {"stage": 3}}')
    ds = ["train.backend=deepspeed", "train.workers=[1,2]"]
    with pytest.raises(ConfigError, match=r"train.workers: \[1, 2\] is elastic but .*zero3.json is ZeRO-3"):
        check_elastic(load_config(None, [*ds, f"train.deepspeed_config={zero3}"]))
    check_elastic(load_config(None, [*ds, f"train.deepspeed_config={Path(__file__).resolve().parents[1]}/configs/deepspeed/zero2.json"]))  # accepted
    check_elastic(load_config(None, ["train.backend=deepspeed", "train.workers=2", f"train.deepspeed_config={zero3}"]))
    assert "data.max_tokens: 20 must be at least data.max_len + 1 = 51" in _error(tmp_path, "data:\n  max_tokens: 20\n")
    assert "fp16 needs a GPU" in _error(tmp_path, "train:\n  precision: fp16\n")


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    message = _error(tmp_path, "model:\n  embed_size: [1,\n")
    assert "exp.yaml:" in message and "invalid YAML" in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml: cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_elastic_workers_keep_the_effective_batch() -> None:
    """workers: [min, max]: accumulate is meant at max workers; fewer accumulate more."""
    cfg = load_config(None, ["train.workers=[1, 4]", "train.accumulate=2"]).train
    assert (cfg.elastic, cfg.min_workers, cfg.max_workers) == (True, 1, 4)
    assert [cfg.accumulate_at(w) * w for w in (1, 2, 4)] == [8, 8, 8]  # token budgets per step
    assert cfg.accumulate_at(3) == 3  # 8/3 cannot be kept exactly: the nearest (9); the log says so
    fixed = load_config(None, ["train.workers=3"]).train
    assert (fixed.elastic, fixed.min_workers, fixed.max_workers, fixed.accumulate_at(3)) == (False, 3, 3, 1)
    same = load_config(None, ["train.workers=[2, 2]"]).train
    assert not same.elastic and same.max_workers == 2


def test_benchmark_keys_bucketing_and_max_minutes() -> None:
    """data.bucketing (the naive baseline) and train.max_minutes (time-to-BLEU budget), issue 8."""
    cfg = load_config(REPO / "configs/quickstart.yaml")
    assert cfg.data.bucketing is True and cfg.train.max_minutes is None
    cfg = load_config(REPO / "configs/quickstart.yaml", ["data.bucketing=false", "train.max_minutes=2.5"])
    assert cfg.data.bucketing is False and cfg.train.max_minutes == 2.5
    with pytest.raises(ConfigError, match=r"train\.max_minutes: 0\.0 must be positive or null"):
        load_config(REPO / "configs/quickstart.yaml", ["train.max_minutes=0"])
    with pytest.raises(ConfigError, match=r"data\.bucketing"):
        load_config(REPO / "configs/quickstart.yaml", ["data.bucketing=3"])


def test_step_token_budget_all_ranks_together() -> None:
    cfg = load_config(None, ["data.max_tokens=1000", "train.accumulate=3", "train.workers=[1, 2]"])
    assert cfg.step_token_budget() == 1000 * 3 * 2  # the configured run: 2 workers
    assert cfg.step_token_budget(1) == 1000 * 6 * 1  # one worker left: it accumulates twice as much
    odd = load_config(None, ["data.max_tokens=1000", "train.accumulate=1", "train.workers=[2, 3]"])
    assert odd.step_token_budget(2) == 1000 * 2 * 2 != odd.step_token_budget()  # 2 does not divide 3
