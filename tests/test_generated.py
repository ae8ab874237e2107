"""Generated structured tasks: determinism, shapes, label definitions and loading through the registry."""

from __future__ import annotations

import numpy as np
import pytest

import heartlora.data.generated as generated
from heartlora.data import get_task, list_tasks
from heartlora.data.generated import clevr, dsprites, smallnorb

TASKS = {"dsprites_loc": 16, "dsprites_ori": 16, "clevr_count": 8, "clevr_dist": 6, "smallnorb_azi": 18,
         "smallnorb_ele": 9}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HEARTLORA_CACHE", str(tmp_path / "cache"))


# Registry ------------------------------------------------------------------------------------------------------------

def test_every_task_is_registered_as_structured():
    infos = {info.name: info for info in list_tasks()}
    for name, num_classes in TASKS.items():
        assert infos[name].group == "structured"
        task = get_task(name)
        assert task.num_classes == num_classes and task.group == "structured"


def test_dsprites_loads_through_the_registry():
    task = get_task("dsprites_loc")
    images, labels = task.load("train800", img_size=32)
    assert images.shape == (800, 3, 32, 32) and str(images.dtype) == "torch.uint8"
    assert labels.shape == (800,) and 0 <= labels.min() and labels.max() < 16
    assert task.split_sizes() == {"train800": 800, "val200": 200, "train800val200": 1000,
                                  "test": generated.DEFAULT_TEST_SIZE}
    native = task.arrays()["train800"]
    first, first_labels = generated.preview("dsprites_loc", 8)  # the quick look shows the split's first images
    assert np.array_equal(first, native[0][:8]) and np.array_equal(first_labels, native[1][:8])
    # A fresh task object reads the same images back from the disk cache.
    again, again_labels = get_task("dsprites_loc").load("train800", img_size=32)
    assert np.array_equal(again.numpy(), images.numpy()) and np.array_equal(again_labels, labels)


def test_3d_tasks_build_their_splits(monkeypatch):
    # Rendering 3,000 scenes takes about a minute, so a stand-in renderer checks the split and label wiring here;
    # the renderers themselves are tested below on a few images.
    def fake_clevr(n: int, seed: int):
        images = np.full((n, 4, 4, 3), seed % 256, dtype=np.uint8)
        return images, {"num_objects": 3 + np.arange(n) % 8, "closest_depth": np.linspace(7, 11, n)}

    monkeypatch.setattr(generated, "render_clevr", fake_clevr)
    arrays = generated.clevr_count(test_size=10).arrays()
    assert {split: len(labels) for split, (_, labels) in arrays.items()} == {"train800": 800, "val200": 200, "test": 10}
    assert np.array_equal(arrays["train800"][1], np.arange(800) % 8)
    assert np.array_equal(arrays["val200"][1], np.arange(800, 1000) % 8)
    assert arrays["train800"][0][0, 0, 0, 0] != arrays["test"][0][0, 0, 0, 0]  # the test split has its own seed
    dist = generated.clevr_dist(test_size=10).arrays()
    assert dist["test"][1].tolist() == clevr.label_distance({"closest_depth": np.linspace(7, 11, 10)}).tolist()

    calls = []

    def fake_smallnorb(n: int, seed: int, instances: tuple[int, ...]):
        calls.append((n, instances))
        factors = {"azimuth": np.arange(n) % 18, "elevation": np.arange(n) % 9, "instance": np.full(n, instances[0])}
        return np.zeros((n, 4, 4), dtype=np.uint8), factors

    monkeypatch.setattr(generated, "render_smallnorb", fake_smallnorb)
    azi, ele = generated.smallnorb_azi(test_size=10).arrays(), generated.smallnorb_ele(test_size=10).arrays()
    assert np.array_equal(azi["train800"][1], np.arange(800) % 18)
    assert np.array_equal(ele["test"][1], np.arange(10) % 9)
    # Train and val come from smallNORB's training toys, test from the held-out ones.
    assert calls[:2] == [(1000, smallnorb.TRAIN_INSTANCES), (10, smallnorb.TEST_INSTANCES)]


# dSprites --------------------------------------------------------------------------------------------------------

def test_dsprites_is_deterministic_binary_64px():
    a, lat_a = dsprites.render_dsprites(64, seed=3)
    b, lat_b = dsprites.render_dsprites(64, seed=3)
    c, _ = dsprites.render_dsprites(64, seed=4)
    assert a.shape == (64, 64, 64) and a.dtype == np.uint8
    assert np.array_equal(a, b) and np.array_equal(lat_a, lat_b) and not np.array_equal(a, c)
    assert set(np.unique(a)) == {0, 255}
    assert (a.reshape(64, -1) > 0).any(axis=1).all()  # every image shows its sprite


def test_dsprites_location_label_is_the_binned_x_of_the_sprite():
    latents = dsprites.sample_latents(200, np.random.default_rng(0))
    latents[:, 0] = 0  # squares: their pixel centroid is their centre
    images = dsprites.draw_sprites(latents)
    cols = np.arange(64) + 0.5
    centroid_x = (images > 0).sum(axis=1) @ cols / (images > 0).sum(axis=(1, 2))
    index = np.round((centroid_x - dsprites._CENTRE_LO) / (dsprites._CENTRE_HI - dsprites._CENTRE_LO) * 31)
    assert np.array_equal(index, latents[:, 3])
    assert np.array_equal(dsprites.label_location(latents), index.astype(int) // 2)


def test_dsprites_label_bins_follow_vtab():
    grid = np.zeros((40, 5), dtype=np.int64)
    grid[:, 2] = np.arange(40)
    grid[:32, 3] = np.arange(32)
    assert np.array_equal(np.bincount(dsprites.label_location(grid[:32])), [2] * 16)
    assert np.array_equal(np.bincount(dsprites.label_orientation(grid)), [3, 2] * 8)
    assert np.array_equal(dsprites.label_orientation(grid), np.floor(np.arange(40) / 2.5).astype(int))


def test_dsprites_orientation_label_follows_the_drawn_angle():
    latents = np.array([[1, 5, i, 16, 16] for i in range(40)])  # large centred ellipses, every orientation
    images = dsprites.draw_sprites(latents) > 0
    rows, cols = np.mgrid[:64, :64]
    x, y = cols[None] - cols[None].mean(), -(rows[None] - rows[None].mean())  # y up, as the angle is measured
    m = images.sum(axis=(1, 2))
    mx, my = (images * x).sum(axis=(1, 2)) / m, (images * y).sum(axis=(1, 2)) / m
    sxx = (images * (x - mx[:, None, None]) ** 2).sum(axis=(1, 2))
    syy = (images * (y - my[:, None, None]) ** 2).sum(axis=(1, 2))
    sxy = (images * (x - mx[:, None, None]) * (y - my[:, None, None])).sum(axis=(1, 2))
    measured = 0.5 * np.arctan2(2 * sxy, sxx - syy)  # the long axis' angle, modulo π
    error = (measured - dsprites.ORIENTATIONS + np.pi / 2) % np.pi - np.pi / 2
    assert np.abs(error).max() < np.radians(3)
    assert np.array_equal(images[39], images[0])  # 2π is drawn like 0, as in dSprites


# CLEVR ------------------------------------------------------------------------------------------------------------

def test_clevr_is_deterministic_rgb():
    a, info_a = clevr.render_clevr(3, seed=5, size=48)
    b, info_b = clevr.render_clevr(3, seed=5, size=48)
    c, _ = clevr.render_clevr(3, seed=6, size=48)
    assert a.shape == (3, 48, 48, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(info_a["closest_depth"], info_b["closest_depth"])
    assert np.array_equal(clevr.label_count(info_a), info_a["num_objects"] - 3)


def test_clevr_count_is_the_number_of_objects_drawn():
    images, info = clevr.render_clevr(3, seed=1, size=64)
    for i in range(3):
        scene, image, ids = clevr.draw_scene(np.random.default_rng([1, i]), size=64)
        assert np.array_equal(image, images[i])
        # Every object placed is visible in the id image, and the label counts exactly those.
        assert len(np.unique(ids[ids >= 0])) == len(scene.objects) == info["num_objects"][i]
        assert 3 <= len(scene.objects) <= 10
        assert info["closest_depth"][i] == scene.closest_depth()


def test_clevr_label_distributions():
    scenes = [clevr.sample_scene(np.random.default_rng([2, i])) for i in range(400)]
    counts = np.array([len(s.objects) for s in scenes])
    depths = np.array([s.closest_depth() for s in scenes])
    assert set(counts) == set(range(3, 11))
    dist = clevr.label_distance({"closest_depth": depths})
    assert np.bincount(dist, minlength=6).min() >= 20  # every bin is well covered (natural distribution)
    assert np.all((6.0 < depths) & (depths < 13.5))
    assert np.array_equal(clevr.label_distance({"closest_depth": np.array([7.9, 8.0, 8.49, 8.5, 9.2, 9.7, 10.0, 12])}),
                          [0, 1, 1, 2, 3, 4, 5, 5])
    scene = scenes[0]
    assert scene.closest_depth() == min(scene.camera.depth(o.centre()) for o in scene.objects)


# smallNORB --------------------------------------------------------------------------------------------------------

def test_smallnorb_is_deterministic_grayscale():
    a, f_a = smallnorb.render_smallnorb(4, seed=2, size=48)
    b, f_b = smallnorb.render_smallnorb(4, seed=2, size=48)
    c, _ = smallnorb.render_smallnorb(4, seed=3, size=48)
    assert a.shape == (4, 48, 48) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert all(np.array_equal(f_a[k], f_b[k]) for k in f_a)
    assert set(f_a["instance"]) <= set(smallnorb.TRAIN_INSTANCES)
    assert f_a["azimuth"].max() < 18 and f_a["elevation"].max() < 9 and f_a["lighting"].max() < 6


def test_smallnorb_views_follow_the_factors():
    toy = smallnorb.make_toy("car", 0)
    view = smallnorb.render_view(toy, 0, 30, 0, size=48)
    assert np.array_equal(view, smallnorb.render_view(toy, 360, 30, 0, size=48))
    assert np.abs(view.astype(int) - smallnorb.render_view(toy, 20, 30, 0, size=48)).mean() > 1
    assert np.abs(view.astype(int) - smallnorb.render_view(toy, 0, 35, 0, size=48)).mean() > 1
    # The toy is darker than the plain background it stands on.
    assert view[24, 24] < view[2, 2]
    assert set(smallnorb.TRAIN_INSTANCES).isdisjoint(smallnorb.TEST_INSTANCES)
    _, factors = smallnorb.render_smallnorb(3, seed=0, instances=smallnorb.TEST_INSTANCES, size=16)
    assert set(factors["instance"]) <= set(smallnorb.TEST_INSTANCES)
