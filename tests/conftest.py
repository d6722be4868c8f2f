"""Shared test set-up: offline, few threads, and a small hand-made preprocessed dataset."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest

from mimigenrec.io import DataDir
from mimigenrec.toy_data import make_dataset


@pytest.fixture
def tiny_dataset(tmp_path) -> DataDir:
    return make_dataset(tmp_path / "ds")
