"""The one "same settings?" check (reglue.settings) and the recorded-file helper built on it."""

from __future__ import annotations

import json
import re

import pytest

from reglue.config import ConfigError
from reglue.data import store
from reglue.settings import SettingsError, check_same_settings, flatten_settings


def test_flatten_gives_dotted_keys_and_stores_tuples_as_lists():
    nested = {"train": {"seed": 0, "betas": (0.9, 0.999)}, "run_dir": "r", "log": {"wandb": {"project": None}}}
    assert flatten_settings(nested) == {"train.seed": 0, "train.betas": [0.9, 0.999], "run_dir": "r",
                                        "log.wandb.project": None}


def test_same_settings_pass_including_tuples_recorded_as_lists():
    check_same_settings({"a": [1, 2], "b": {"c": "x"}}, {"a": (1, 2), "b": {"c": "x"}}, what="w", fix="f")


def test_every_differing_key_is_listed_sorted_with_both_values_then_the_fix():
    recorded = {"train": {"seed": 0, "lr": 1e-4}, "data": {"dir": "d"}, "gone": 1}
    current = {"train": {"seed": 1, "lr": 1e-4}, "data": {"dir": "e"}, "new": "x"}
    with pytest.raises(SettingsError) as info:
        check_same_settings(recorded, current, what="RUN", fix="start a new run directory.")
    assert str(info.value) == (
        "RUN was made with other settings (data.dir: was 'd', now 'e', gone: was 1, now absent, "
        "new: was absent, now 'x', train.seed: was 0, now 1); start a new run directory."
    )
    assert isinstance(info.value, ValueError)


def test_free_prefixes_free_a_section_or_one_key_only():
    recorded = {"log": {"every": 10, "wandb": True}, "optim": {"lr": 1e-4, "eps": 1e-8}}
    current = {"log": {"every": 50, "wandb": False}, "optim": {"lr": 1e-5, "eps": 1e-8}}
    check_same_settings(recorded, current, what="w", fix="f", free=("log.", "optim.lr"))
    with pytest.raises(SettingsError, match=r"\(optim.eps: was 1e-08, now 1e-06\)"):
        check_same_settings(recorded, {**current, "optim": {"lr": 1e-5, "eps": 1e-6}}, what="w", fix="f",
                            free=("log.", "optim.lr"))


def test_a_key_only_one_side_has_counts_as_none():
    check_same_settings({"a": 1}, {"a": 1, "added_later": None}, what="w", fix="f")


def test_the_caller_chooses_the_error_class():
    with pytest.raises(ConfigError, match="train.seed: was 0, now 1"):
        check_same_settings({"train": {"seed": 0}}, {"train": {"seed": 1}}, what="w", fix="f", error=ConfigError)


def test_check_or_write_json_records_once_then_compares_only_the_wanted_keys(tmp_path):
    path = tmp_path / "out" / "settings.json"
    store.check_or_write_json(path, {"steps": 3, "size": (2, 2)}, fix="f")
    assert json.loads(path.read_text()) == {"size": [2, 2], "steps": 3}
    path.write_text(json.dumps({"steps": 3, "size": [2, 2], "stages": [["a", 1.0]]}))  # a caller's own entry
    store.check_or_write_json(path, {"steps": 3, "size": (2, 2)}, fix="f")
    message = f"{tmp_path / 'out'} was made with other settings (steps: was 3, now 4); rerun with the original options."
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        store.check_or_write_json(path, {"steps": 4, "size": [2, 2]}, fix="rerun with the original options.")
