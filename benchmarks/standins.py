"""Minimal stand-ins for `datasets` and `pandas`, so TRL's GRPOTrainer runs where they cannot be carried.

The GPU machines have no network and a 64 MiB carry limit; `datasets` needs pyarrow (a 55 MB wheel) and
TRL imports `pandas` at module level, where it only builds completion tables (`log_completions`, off in
the benchmark). What TRL 1.16's GRPOTrainer does with a training dataset is: an isinstance check against
`datasets.Dataset`, `cache_files` (empty: in memory), `len()`, and integer indexing by its RepeatSampler,
each row a dict; transformers'
Trainer only drops unused columns when `datasets` is installed (its availability check reads the
package metadata, which a stand-in does not have). `ListDataset` does exactly those things.

`install()` registers a stand-in only for a module that is not importable (or for every one with
force=True, which is how the CPU run checks that the stand-in suffices); it must run before `trl` is
imported.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types


class ListDataset:
    """A list of dict rows with the slice of `datasets.Dataset` that TRL's GRPOTrainer uses."""

    def __init__(self, rows: list[dict]):
        self._rows = list(rows)

    @classmethod
    def from_list(cls, rows: list[dict]) -> "ListDataset":
        return cls(rows)

    @classmethod
    def from_dict(cls, columns: dict[str, list]) -> "ListDataset":
        names = list(columns)
        return cls([dict(zip(names, values)) for values in zip(*columns.values())])

    @property
    def cache_files(self) -> list:  # in memory, as `Dataset.from_list` (TRL reads it for its model card)
        return []

    @property
    def column_names(self) -> list[str]:
        return list(self._rows[0]) if self._rows else []

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i):
        if isinstance(i, int):
            return self._rows[i]
        if isinstance(i, str):
            return [r[i] for r in self._rows]
        raise TypeError(f"ListDataset index {i!r}: int rows or str columns only")

    def __iter__(self):
        return iter(self._rows)


class _IterableStandIn:  # isinstance targets only: the stand-in never streams
    pass


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
    mod.__dict__.update(attrs)
    return mod


def _datasets() -> types.ModuleType:
    def load_dataset(*_a, **_k):
        raise RuntimeError("datasets stand-in: load_dataset is not available (no pyarrow on this machine)")

    return _module(
        "datasets",
        Dataset=ListDataset,
        IterableDataset=_IterableStandIn,
        DatasetDict=dict,
        IterableDatasetDict=dict,
        load_dataset=load_dataset,
        __version__="0.0.0+standin",
    )


def _pandas() -> types.ModuleType:
    class _Unavailable:
        def __init__(self, *_a, **_k):
            raise RuntimeError("pandas stand-in: tables are not available (turn log_completions off)")

    return _module(
        "pandas",
        DataFrame=_Unavailable,
        Series=_Unavailable,
        concat=_Unavailable,
        __version__="0.0.0+standin",
    )


def install(force: bool = False) -> list[str]:
    """Register stand-ins for missing `datasets` / `pandas`; returns the names replaced."""
    done = []
    for name, make in (("datasets", _datasets), ("pandas", _pandas)):
        if force or importlib.util.find_spec(name) is None:
            sys.modules[name] = make()
            done.append(name)
    return done
