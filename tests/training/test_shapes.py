"""ShapesWorld: determinism, the concept list, and masks that agree with the pixels actually drawn."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conceptlens.handlers.errors import InvalidInput
from conceptlens.training.data.shapes import SHAPES_CLASSES, ShapesWorld
from conceptlens.training.data.shapes_catalog import BACKGROUND_COLORS, CLASS_PARTS, OBJECT_COLORS


def _cid(world: ShapesWorld, category: str, name: str) -> int:
    return next(cid for cid, n, c in world.concepts if c == category and n == name)


def test_concept_list_is_complete_and_stable():
    world = ShapesWorld(10)
    concepts = world.concepts
    assert [cid for cid, _, _ in concepts] == list(range(1, len(concepts) + 1))
    assert {c for _, _, c in concepts} == {"object", "part", "color", "texture"}
    assert len({(n, c) for _, n, c in concepts}) == len(concepts)
    assert len(SHAPES_CLASSES) >= 8 and world.classes == SHAPES_CLASSES
    assert [n for _, n, c in concepts if c == "object"] == SHAPES_CLASSES
    used_by = Counter(part for parts in CLASS_PARTS.values() for part in {name for name, _ in parts})
    assert all(len({name for name, _ in CLASS_PARTS[cls]}) >= 2 for cls in SHAPES_CLASSES)
    shared = {part for part, count in used_by.items() if count >= 2}
    assert {"wheel", "window"} <= shared  # a part detector need not be a class detector
    assert len({n for _, n, c in concepts if c == "texture"}) >= 4


def test_same_seed_and_index_give_the_same_sample():
    a, b = ShapesWorld(20, seed=5, with_masks=True), ShapesWorld(20, seed=5, with_masks=True)
    for i in (0, 7, 19):
        (xa, ya, ma), (xb, yb, mb) = a[i], b[i]
        assert torch.equal(xa, xb) and ya == yb
        assert all(torch.equal(ma[c], mb[c]) for c in ma)
    # another seed draws other images, with the same balanced labels
    other = ShapesWorld(20, seed=6)
    assert not torch.equal(a[3][0], other[3][0])
    assert [a[i][1] for i in range(20)] == [other[i][1] for i in range(20)]
    assert Counter(a[i][1] for i in range(18)) == Counter({k: 2 for k in range(len(SHAPES_CLASSES))})


def test_items_have_the_contract_types():
    world = ShapesWorld(4, size=48, with_masks=True)
    image, label, masks = world[2]
    assert image.dtype == torch.float32 and image.shape == (3, 48, 48)
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert isinstance(label, int) and 0 <= label < len(SHAPES_CLASSES)
    assert set(masks) == {"object", "part", "color", "texture"}
    assert all(m.dtype == torch.int64 and m.shape == (48, 48) for m in masks.values())
    x, y = ShapesWorld(4, size=48)[2]
    assert torch.equal(x, image) and y == label
    with pytest.raises(IndexError):
        world[4]


def test_masks_match_the_drawn_pixels():
    """Decode each pixel's colour and check every mask against what the renderer actually painted there."""
    world = ShapesWorld(90, seed=11, with_masks=True)
    names = {cid: (n, c) for cid, n, c in world.concepts}
    rgb_of = {**OBJECT_COLORS, **BACKGROUND_COLORS}
    bg_rgbs = np.array(list(BACKGROUND_COLORS.values()))
    stray_seen = blob_seen = 0
    for i in range(len(world)):
        s = world.render(i)
        img, m = s.image.astype(np.int64), s.masks
        # color: the named colour of every pixel is exactly the pixel's RGB
        decoded = np.array([rgb_of[names[cid][0]] for cid in m["color"].ravel()]).reshape(img.shape)
        assert np.array_equal(decoded, img)
        # texture: exactly the pixels showing a background colour, and there the image equals the background layer
        is_bg = (img[:, :, None, :] == bg_rgbs[None, None]).all(-1).any(-1)
        assert np.array_equal(m["texture"] > 0, is_bg)
        assert np.array_equal(img[is_bg], s.background[is_bg].astype(np.int64))
        assert set(np.unique(m["texture"][is_bg])) == {_cid(world, "texture", s.texture)}
        # object: only the sample's class, every object pixel is one of its parts, in that part's drawn colour
        obj = m["object"] > 0
        assert set(np.unique(m["object"][obj])) == {_cid(world, "object", s.class_name)}
        assert (m["part"][obj] > 0).all() and not is_bg[obj].any()
        own = {p.name: p.color for p in s.parts if p.role == "object"}
        assert set(own) == {name for name, _ in CLASS_PARTS[s.class_name]}
        for name, color in own.items():
            where = obj & (m["part"] == _cid(world, "part", name))
            assert where.any(), f"sample {i}: part {name} of {s.class_name} not visible"
            assert (img[where] == rgb_of[color]).all()
        # stray parts: labelled as parts but not as object, in a colour drawn for that stray part
        strays = {}
        for p in s.parts:
            if p.role == "distractor" and p.name != "blob":
                strays.setdefault(p.name, set()).add(rgb_of[p.color])
        stray_px = (m["part"] > 0) & ~obj
        for cid in np.unique(m["part"][stray_px]):
            name = names[int(cid)][0]
            colours = {tuple(c) for c in img[stray_px & (m["part"] == cid)]}
            assert colours <= strays[name]
            stray_seen += 1
        # pixels in no object, part or texture mask are blob distractors, in a blob's colour
        nothing = (m["object"] == 0) & (m["part"] == 0) & (m["texture"] == 0)
        blobs = {rgb_of[p.color] for p in s.parts if p.name == "blob"}
        assert {tuple(c) for c in img[nothing]} <= blobs
        blob_seen += int(nothing.any())
    assert stray_seen > 5 and blob_seen > 5  # the distractor branches were exercised


def test_generation_is_fast():
    world = ShapesWorld(300, with_masks=True)
    start = time.perf_counter()
    for i in range(len(world)):
        world[i]
    assert time.perf_counter() - start < 6.0  # ~0.2 s on one idle core; generous for a loaded machine


def test_works_with_dataloader_workers():
    world = ShapesWorld(16, seed=2, with_masks=True)
    batches = list(DataLoader(world, batch_size=4, num_workers=2))
    images = torch.cat([b[0] for b in batches])
    parts = torch.cat([b[2]["part"] for b in batches])
    assert torch.equal(images, torch.stack([world[i][0] for i in range(16)]))
    assert torch.equal(parts, torch.stack([world[i][2]["part"] for i in range(16)]))


@pytest.mark.parametrize(("n", "size"), [(0, 64), (-3, 64), (10, 8)])
def test_bad_arguments_are_invalid_input(n, size):
    with pytest.raises(InvalidInput):
        ShapesWorld(n, size=size)
