"""Checkpoint services: when to save (cadence), how (atomic, verified store, background
writer), what to keep (retention), what state is (RNG, nested state dicts), and resume.

They save and restore *named stateful parts* — anything with ``state_dict()`` /
``load_state_dict()`` — and know nothing about the trainer that owns them.
"""

from so8t.checkpoint.cadence import SaveCadence
from so8t.checkpoint.errors import CheckpointError
from so8t.checkpoint.identity import DEFAULT_SHAPE_KEYS, compare_identity
from so8t.checkpoint.retention import Retention
from so8t.checkpoint.service import CheckpointService, ResumeResult, SavedCheckpoint
from so8t.checkpoint.state import capture_rng, flatten_state, restore_rng, unflatten_state
from so8t.checkpoint.store import CheckpointStore
from so8t.checkpoint.writer import AsyncCheckpointWriter

__all__ = [
    "AsyncCheckpointWriter",
    "CheckpointError",
    "CheckpointService",
    "CheckpointStore",
    "DEFAULT_SHAPE_KEYS",
    "ResumeResult",
    "Retention",
    "SaveCadence",
    "SavedCheckpoint",
    "capture_rng",
    "compare_identity",
    "flatten_state",
    "restore_rng",
    "unflatten_state",
]
