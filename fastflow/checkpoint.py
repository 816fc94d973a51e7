"""Checkpoints that survive a crash mid-write and resume a training run exactly.

:func:`save_checkpoint` writes a dict of tensors, numbers, strings, lists and dicts (state dicts,
optimiser and scheduler states, step counters, random-number-generator states) atomically: into
a temporary file in the destination's directory, flushed and ``fsync``-ed, then moved over the
destination with ``os.replace`` (an atomic rename on POSIX and Windows). A reader therefore sees
the old checkpoint or the new one, never half of one, even when the writer is killed.

:func:`load_checkpoint` reads it back with ``torch.load(weights_only=True)`` (no arbitrary
pickled code runs) and turns every way a file can be wrong into one of two clear errors: a
missing file raises :class:`FileNotFoundError`; an empty, truncated, corrupt or foreign file
(not written by :func:`save_checkpoint`) raises :class:`CheckpointError`, whose message names the
file and says which.

:func:`rng_state` / :func:`set_rng_state` capture and restore every random stream a training
step may draw from: torch's global generator (and CUDA's, where initialised), numpy's global
generator, Python's ``random``, and any extra ``torch.Generator`` (e.g. the one that draws the
data batches), all as plain tensors and lists so they load under ``weights_only=True``.

Example:
    >>> import tempfile, os
    >>> model = torch.nn.Linear(2, 2)
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
    >>> save_checkpoint(path, {"model": model.state_dict(), "step": 3, "rng": rng_state()})
    >>> state = load_checkpoint(path)
    >>> state["step"], sorted(state["model"])
    (3, ['bias', 'weight'])
"""

from __future__ import annotations

import os
import random
import tempfile
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "rng_state",
    "set_rng_state",
]

#: The marker that :func:`save_checkpoint` puts in every file, checked by :func:`load_checkpoint`.
CHECKPOINT_FORMAT = "fastflow-checkpoint"
_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be used: empty, truncated, corrupt, or not written by
    :func:`save_checkpoint`. The message names the file."""


def _fsync_dir(directory: str) -> None:
    # The rename is durable only once the directory entry is on disk (POSIX); where a directory
    # cannot be opened (Windows), os.replace is still atomic.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_PLAIN = (str, int, float, bool, type(None), torch.Size, torch.dtype, torch.device)


def _check_plain(value: Any, where: str) -> None:
    """Raises TypeError unless ``value`` loads under ``torch.load(weights_only=True)``."""
    if isinstance(value, torch.Tensor) or type(value) in _PLAIN:
        return
    if isinstance(value, dict):  # OrderedDict (state dicts) included
        for k, v in value.items():
            if type(k) not in _PLAIN:
                raise TypeError(f"checkpoint entry {where} has a key of type {type(k).__name__}")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if type(value) in (list, tuple):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"checkpoint entry {where} is a {type(value).__module__}.{type(value).__qualname__}; "
        "save tensors, numbers, strings, None, lists, tuples and dicts only (convert it first)"
    )


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Writes ``state`` (a mapping with string keys) to ``path`` atomically.

    The file holds ``state`` plus two keys of its own, ``"format"`` and ``"format_version"``
    (so ``state`` must not use them). The parent directory must exist. On any error the
    temporary file is removed and ``path`` is left as it was.

    Only tensors, numbers, strings, None, ``torch.Size``/``dtype``/``device`` and lists, tuples
    and dicts of them are accepted (what ``torch.load(weights_only=True)`` reads back); a
    ``str`` subclass such as ``torch.__version__`` must be converted with ``str()`` first.

    Raises:
        TypeError: ``state`` is not a mapping with string keys, or holds another type (the
            message gives the entry's path).
        ValueError: ``state`` uses a reserved key.
        FileNotFoundError: the directory of ``path`` does not exist.
    """
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise TypeError("state must be a mapping with string keys")
    for key in ("format", "format_version"):
        if key in state:
            raise ValueError(f"state must not use the reserved key {key!r}")
    for key, value in state.items():
        _check_plain(value, repr(key))
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write checkpoint {path}: directory {directory} does not exist")
    payload = {"format": CHECKPOINT_FORMAT, "format_version": _VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".ckpt", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Reads a checkpoint written by :func:`save_checkpoint`; returns the saved mapping (with
    its ``"format"`` and ``"format_version"`` keys).

    Arguments:
        path: the file.
        map_location: as in ``torch.load`` (default ``"cpu"``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        IsADirectoryError: ``path`` is a directory.
        CheckpointError: the file is empty, truncated or corrupt, holds objects other than
            tensors and plain containers, or was not written by :func:`save_checkpoint` (or by
            a newer version of it).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint {path} is a directory, not a file")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the write did not complete")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch.load fails in many ways on a bad file; all mean "unusable"
        text = str(exc).strip()
        first = text.splitlines()[0].split(". ")[0] if text else type(exc).__name__
        if not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"checkpoint {path} is truncated or not a checkpoint file at all ({size} bytes, "
                "not a complete torch zip archive)"
            ) from None
        raise CheckpointError(
            f"checkpoint {path} is corrupt or holds objects that are not tensors or plain "
            f"containers ({first[:200]})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is a torch file but not a fastflow checkpoint (no {CHECKPOINT_FORMAT!r} "
            "marker); checkpoints are written by fastflow.checkpoint.save_checkpoint"
        )
    version = state.get("format_version")
    if not isinstance(version, int) or version > _VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version!r}; this fastflow reads up to {_VERSION}"
        )
    return state


# -- random-number-generator states -------------------------------------------------------------


def rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """The states of torch's, numpy's and Python's global generators (and CUDA's, where
    initialised), plus those of ``generators`` (a name -> ``torch.Generator`` mapping), as
    tensors and plain lists that load under ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "internal": list(internal), "gauss_next": gauss_next},
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(
    state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None
) -> None:
    """Restores what :func:`rng_state` captured; ``generators`` are set from the saved states of
    the same names (a name missing from ``state`` raises ``KeyError``)."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    saved = state.get("generators", {})
    for name, g in (generators or {}).items():
        if name not in saved:
            raise KeyError(f"the checkpoint has no state for the generator {name!r}")
        g.set_state(saved[name])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
