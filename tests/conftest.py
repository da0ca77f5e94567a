"""Shared test fixtures: two small ShapesWorld CNNs trained once and cached, and a held-out batch.

The models are trained by a deliberately minimal loop (not training/trainer.py, which has its own tests) so the
attack and explanation tests rest on a model that really classifies. Weights are cached as safetensors in
pytest's cache directory, keyed by a version string: bump `MODEL_VERSION` when the recipe changes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conceptlens.handlers.allocator import tune_allocator
from conceptlens.handlers.zoo import ImageClassifier, build_model, load_weights, save_weights
from conceptlens.training.data.shapes import SHAPES_CLASSES, ShapesWorld

tune_allocator()  # the suite runs torch as the conceptlens command does (handlers/allocator.py)

torch.set_num_threads(2)

log = logging.getLogger(__name__)

MODEL_VERSION = "v1"
SIZE = 32  # small images keep CPU tests fast; ShapesWorld is still learnable at this size
TRAIN_N, EPOCHS, BATCH, LR = 1800, 3, 32, 3e-3
VAL_SEED = 9_001  # the held-out images (train sets use other seeds)


def shapes_tensors(n: int, seed: int, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """n ShapesWorld images (n,3,size,size) in [0,1] and their labels (n,)."""
    ds = ShapesWorld(n, size=size, seed=seed)
    items = [ds[i] for i in range(n)]
    return torch.stack([im for im, _ in items]), torch.tensor([lab for _, lab in items])


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


def _train(seed: int) -> ImageClassifier:
    """A minimal supervised loop: AdamW, cosine decay, horizontal flips."""
    images, labels = shapes_tensors(TRAIN_N, seed=seed)
    with torch.random.fork_rng():  # keep the global RNG of other tests untouched
        torch.manual_seed(seed)
        model = build_model("small_cnn", SHAPES_CLASSES, input_size=SIZE)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
        total = EPOCHS * -(-TRAIN_N // BATCH)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=total, pct_start=0.15)
        model.train()
        for _ in range(EPOCHS):
            order = torch.randperm(TRAIN_N)
            for start in range(0, TRAIN_N, BATCH):
                idx = order[start : start + BATCH]
                x = images[idx]
                flip = torch.rand(len(idx)) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(3), x)
                loss = F.cross_entropy(model(x), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    model.eval()
    return model


def _cached_model(request: pytest.FixtureRequest, seed: int) -> ImageClassifier:
    name = f"small_cnn_s{SIZE}_seed{seed}_{MODEL_VERSION}.safetensors"
    try:
        folder = Path(request.config.cache.mkdir("conceptlens_models"))
    except AttributeError:  # cache plugin disabled (-p no:cacheprovider)
        folder = request.getfixturevalue("tmp_path_factory").mktemp("models")
    path = folder / name
    if path.is_file():
        model = build_model("small_cnn", SHAPES_CLASSES, input_size=SIZE)
        load_weights(model, path)
        return model.eval()
    started = time.perf_counter()
    model = _train(seed)
    save_weights(model, path)
    log.info("trained %s in %.1f s", name, time.perf_counter() - started)
    return model


@pytest.fixture(scope="session")
def shapes_model(request: pytest.FixtureRequest) -> ImageClassifier:
    """small_cnn trained on ShapesWorld (32x32, seed 1), in eval mode. Do not train it further in a test."""
    return _cached_model(request, seed=1)


@pytest.fixture(scope="session")
def shapes_model_b(request: pytest.FixtureRequest) -> ImageClassifier:
    """A second small_cnn trained on different ShapesWorld images (seed 2): the held-out model for transfer."""
    return _cached_model(request, seed=2)


@pytest.fixture(scope="session")
def shapes_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """64 held-out ShapesWorld images (64,3,32,32) in [0,1] and labels (64,). Treat as read-only."""
    return shapes_tensors(64, seed=VAL_SEED)
