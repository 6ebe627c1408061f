"""Checkpoints written so that a crash never leaves a corrupt one.

``save_atomic`` writes to a temporary file in the destination's folder, flushes and
fsyncs it, then renames it over the destination (``os.replace`` is atomic on POSIX and
Windows): a reader sees either the old file or the new one, never a partial one. Before
the rename, the previous good checkpoint is kept as ``checkpoint.prev.pt`` (a hard link,
or a copy where links are not supported), so a checkpoint damaged later (disk, an
interrupted copy) still leaves one to resume from.
"""
from __future__ import annotations

import io
import os
import random
import shutil
import tempfile
from typing import Any, Dict

import torch

from .errors import TrainingError

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
FINAL_MODEL = "model.pt"
FORMAT = "torchadjoint-train-checkpoint"
VERSION = 1


def _fsync_folder(folder: str) -> None:
    # The rename itself is durable only once the folder entry is on disk.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_atomic(obj: Any, path: str, keep_previous: str = "") -> None:
    """``torch.save(obj)`` to ``path`` atomically; the old ``path`` becomes ``keep_previous``."""
    folder = os.path.dirname(os.path.abspath(path))
    buffer = io.BytesIO()
    torch.save(obj, buffer)  # serialise first: a failure here touches no file
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(buffer.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
        if keep_previous and os.path.exists(path):
            _keep_copy(path, os.path.join(folder, keep_previous))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def write_text_atomic(text: str, path: str) -> None:
    """Replace the text file ``path`` atomically (metrics tables are rewritten every epoch)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".txt", dir=folder)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _keep_copy(path: str, previous: str) -> None:
    """Make ``previous`` the current ``path`` without ever removing ``path`` meanwhile."""
    folder = os.path.dirname(previous)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-prev-", suffix=".pt", dir=folder)
    os.close(fd)
    os.unlink(tmp)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, previous)


def rng_states() -> Dict[str, Any]:
    """Every global random state a run touches (python, numpy, torch CPU and CUDA)."""
    states: Dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        states["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Dict[str, Any]) -> None:
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if "numpy" in states:
        import numpy as np

        np.random.set_state(states["numpy"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Read a training checkpoint; a missing, truncated or foreign file is a
    :class:`TrainingError` that says which file and what to do."""
    if not os.path.isfile(path):
        raise TrainingError(f"no checkpoint to resume from: {path} does not exist; train without --resume first")
    try:
        # Our own file, holding optimiser state and RNG states (numpy arrays, python tuples).
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises several types for damaged files
        hint = ""
        previous = os.path.join(os.path.dirname(path), PREVIOUS)
        if os.path.abspath(path) != os.path.abspath(previous) and os.path.isfile(previous):
            hint = f"; the previous checkpoint is kept: resume from it with --resume {previous}"
        raise TrainingError(f"cannot read checkpoint {path} ({type(exc).__name__}: {exc}){hint}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TrainingError(f"{path} is not a torchadjoint training checkpoint")
    if state.get("version") != VERSION:
        raise TrainingError(f"{path} has checkpoint version {state.get('version')!r}; this program reads version {VERSION}")
    return state
