"""The one "same settings?" check behind every resumable job (SPEC §9).

A job that resumes (prepare, cache-semantics, sample, train, train-compressor, the demo) records
the settings that decide its results, and a rerun must bring the same ones: otherwise the files
already written would silently mix two runs. :func:`check_same_settings` compares the recorded
and the current settings and, when they differ, raises one error that lists every differing key
and says what to do. It knows nothing about files; the callers read and write them
(:func:`reglue.data.store.check_or_write_json`, the checkpoint loaders).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from reglue.errors import InputError


class SettingsError(InputError):
    """A rerun whose settings differ from the recorded ones; the message lists them and the fix."""


def flatten_settings(settings: Mapping, prefix: str = "") -> dict[str, object]:
    """Nested mappings as one level of dotted keys: {"train": {"seed": 0}} -> {"train.seed": 0}.

    Tuples become lists, as a JSON round trip stores them, so a recorded ``[1, 2]`` equals ``(1, 2)``.
    """
    flat: dict[str, object] = {}
    for key, value in settings.items():
        if isinstance(value, Mapping):
            flat.update(flatten_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = _as_stored(value)
    return flat


def _as_stored(value: object) -> object:
    if isinstance(value, (list, tuple)):
        return [_as_stored(item) for item in value]
    return value


def check_same_settings(
    recorded: Mapping,
    current: Mapping,
    *,
    what: str,
    fix: str,
    free: Sequence[str] = (),
    error: type[InputError] = SettingsError,
) -> None:
    """Raise ``error`` unless ``current`` equals ``recorded`` outside the ``free`` keys.

    Both are (nested) mappings, compared key by key after :func:`flatten_settings`; a key under
    one of the ``free`` prefixes (``"log."`` frees a section, ``"optim.lr"`` one key) may
    change. A key only one side has counts as None on the other, so a setting added later
    with default None does not block resuming an older run. The message reads
    ``"{what} was made with other settings (key: was X, now Y, ...); {fix}"`` and lists every
    differing key, sorted. ``error``: the exception class to raise (an InputError subclass, e.g.
    ``ConfigError`` for a run config).
    """
    old, new = flatten_settings(recorded), flatten_settings(current)
    free = tuple(free)
    differing = [key for key in sorted(old.keys() | new.keys())
                 if old.get(key) != new.get(key) and not key.startswith(free)]
    if differing:
        detail = ", ".join(f"{key}: was {_shown(old, key)}, now {_shown(new, key)}" for key in differing)
        raise error(f"{what} was made with other settings ({detail}); {fix}")


def _shown(flat: dict, key: str) -> str:
    return repr(flat[key]) if key in flat else "absent"
