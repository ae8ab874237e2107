"""Tasks and the input pipeline: VTAB-1K folders, export round trips, few-shot sampling, offline sources, caches."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from heartlora.data import ArrayTask, export_task, get_task, list_tasks, register_task
from heartlora.data.base import ImageTooLargeError, open_image, resize_image
from heartlora.data.fewshot import FewShotTask
from heartlora.data.cache import cache_file, cached_arrays
from heartlora.errors import TaskError


@pytest.fixture(autouse=True, scope="module")
def private_cache(tmp_path_factory: pytest.TempPathFactory):
    """Keep the tests' cache files out of the user's cache (one cache for the module: sources decode once)."""
    old = os.environ.get("HEARTLORA_CACHE")
    os.environ["HEARTLORA_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        del os.environ["HEARTLORA_CACHE"]
    else:
        os.environ["HEARTLORA_CACHE"] = old


def fashion_installed() -> bool:
    from heartlora.data.offline import _fashion_mnist_dir

    try:
        _fashion_mnist_dir()  # the Debian files (a cache alone would not rebuild in a fresh cache folder)
    except TaskError:
        return False
    return True


needs_fashion = pytest.mark.skipif(not fashion_installed(), reason="Fashion-MNIST is not installed "
                                   "(sudo apt-get install -y dataset-fashion-mnist)")


def toy_task(calls: list | None = None, cache_key: str | None = None, rgb: bool = True) -> ArrayTask:
    """Three classes of random images, RGB 10×12 (or grayscale), with a test split; counts build() calls."""
    def build():
        if calls is not None:
            calls.append(1)
        rng = np.random.default_rng(1)
        shape = (10, 12, 3) if rgb else (10, 12)

        def split(n):
            return rng.integers(0, 256, (n, *shape), dtype=np.uint8), np.arange(n) % 3

        return {"train800": split(12), "val200": split(6), "test": split(9)}

    return ArrayTask("toy", ["a", "b", "c"], "structured", build, cache_key=cache_key)


def write_vtab(root: Path, lines: dict[str, str], images: dict[str, Image.Image]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for relative, image in images.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / relative)
    for split, text in lines.items():
        (root / f"{split}.txt").write_text(text)
    return root


# Export → VTAB-1K folder → read back ------------------------------------------------------------------------------

@pytest.mark.parametrize("rgb", [True, False])
def test_export_round_trip_is_exact(tmp_path: Path, rgb: bool):
    task = toy_task(rgb=rgb)
    out = export_task(task, tmp_path / "toy")
    back = get_task(f"vtab:{out}")
    assert back.class_names == task.class_names and back.group == "structured"
    assert back.split_sizes() == task.split_sizes()
    for split in task.SPLITS:
        native = np.stack([np.asarray(img) for img in back.native_images(split)])
        expected = np.stack(list(task.native_images(split)))
        np.testing.assert_array_equal(native, expected)
        np.testing.assert_array_equal(back.labels(split), task.labels(split))
        for size in (12, 7):  # native width, and a resize: both go through the same resize path
            assert all(torch.equal(a, b) for a, b in zip(back.load(split, size), task.load(split, size)))
    # train800val200 refers to the train800 and val200 files rather than storing them twice.
    assert len(list((out / "images").rglob("*.png"))) == 12 + 6 + 9


def test_export_resized_and_digits(tmp_path: Path):
    task = get_task("digits")
    out = export_task(task, tmp_path / "digits16", img_size=16)
    back = get_task(f"vtab:{out}")
    for split in ("val200", "test"):
        images, labels = back.load(split, 16)
        expected_images, expected_labels = task.load(split, 16)
        assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)


def test_export_refuses_non_empty_folder(tmp_path: Path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(TaskError, match="not empty"):
        export_task(toy_task(), target)
    assert (target / "keep.txt").read_text() == "mine"
    export_task(toy_task(), target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "test.txt").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind


# VTAB-1K reader ---------------------------------------------------------------------------------------------------

def test_vtab_reader_mixed_images_and_lenient_lists(tmp_path: Path):
    images = {
        "img/a b.png": Image.new("RGB", (30, 20), (255, 0, 0)),
        "img/gray.png": Image.new("L", (8, 8), 100),
        "img/photo.jpg": Image.new("RGB", (50, 40), (0, 0, 255)),
        "img/pal.png": Image.new("P", (5, 5)),
    }
    lists = {"train800": "  img/a b.png   1 \n\nimg/gray.png\t0\n", "val200": "img/photo.jpg 3\n",
             "test": "img/pal.png 2\nimg/gray.png 0\n"}
    task = get_task(f"vtab:{write_vtab(tmp_path / 't', lists, images)}")
    assert task.num_classes == 4 and task.class_names == ["0", "1", "2", "3"] and task.group == "unknown"
    assert task.split_sizes() == {"train800": 2, "val200": 1, "train800val200": 3, "test": 2}
    x, y = task.load("train800val200", 16)
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.uint8 and y.tolist() == [1, 0, 3]
    assert x[0, 0].float().mean() > 250 and x[0, 1:].float().mean() < 5  # red stays red
    assert (x[1] == 100).all()  # grayscale replicated to three channels


def test_vtab_reader_classes_and_group(tmp_path: Path):
    root = write_vtab(tmp_path / "t", {"train800": "a.png 1\n", "val200": "a.png 0\n", "test": "a.png 1\n"},
                      {"a.png": Image.new("L", (4, 4))})
    (root / "classes.txt").write_text("cat\ndog\nbird\n")
    (root / "group.txt").write_text("Specialized\n")
    task = get_task(f"vtab:{root}")
    assert task.class_names == ["cat", "dog", "bird"] and task.group == "specialized"
    (root / "classes.txt").write_text("cat\n")
    with pytest.raises(TaskError, match="classes.txt"):
        get_task(f"vtab:{root}")


def test_vtab_reader_errors(tmp_path: Path):
    good = {"a.png": Image.new("L", (4, 4))}
    with pytest.raises(TaskError, match="does not exist"):
        get_task(f"vtab:{tmp_path / 'nowhere'}")

    root = write_vtab(tmp_path / "missing_list", {"train800": "a.png 0\n", "val200": "a.png 0\n"}, good)
    with pytest.raises(TaskError, match="test.txt"):
        get_task(f"vtab:{root}")

    root = write_vtab(tmp_path / "bad_line", {"train800": "a.png 0\n\na.png cat\n", "val200": "a.png 0\n",
                                               "test": "a.png 0\n"}, good)
    with pytest.raises(TaskError, match=r"train800\.txt:3: bad line"):
        get_task(f"vtab:{root}")

    root = write_vtab(tmp_path / "no_image", {"train800": "a.png 0\n", "val200": "a.png 0\n",
                                               "test": "a.png 0\nlost/b.png 1\n"}, good)
    task = get_task(f"vtab:{root}")
    task.load("train800", 4)  # other splits are unaffected
    with pytest.raises(TaskError, match=r"lost/b\.png does not exist \(test\.txt line 2\)"):
        task.load("test", 4)

    root = write_vtab(tmp_path / "broken", {"train800": "a.png 0\n", "val200": "a.png 0\n",
                                             "test": "c.png 0\n"}, good)
    (root / "c.png").write_bytes(b"not a png")
    with pytest.raises(TaskError, match="cannot read image"):
        get_task(f"vtab:{root}").load("test", 4)


@pytest.mark.parametrize("label, match", [
    ("\u00b2", r"train800\.txt:2: bad line"),              # "²".isdigit() is True, int("²") fails
    ("\u0663", r"train800\.txt:2: bad line"),              # Arabic-Indic three: int() takes it, a list should not
    ("99999999999", r"train800\.txt:2: label 99999999999 is not below 100,000"),
    ("100000", r"train800\.txt:2: label 100000 is not below 100,000"),
    ("7", r"train800\.txt:2: label 7 means at least 8 classes but the lists hold only 4 images"),
])
def test_vtab_labels_out_of_bounds_name_file_and_line(tmp_path: Path, label: str, match: str):
    root = write_vtab(tmp_path / "t", {"train800": f"a.png 0\na.png {label}\n", "val200": "a.png 0\n",
                                       "test": "a.png 1\n"}, {"a.png": Image.new("L", (4, 4))})
    with pytest.raises(TaskError, match=match) as error:
        get_task(f"vtab:{root}")
    assert "\n" not in str(error.value)


def test_vtab_label_beyond_classes_txt_names_file_and_line(tmp_path: Path):
    root = write_vtab(tmp_path / "t", {"train800": "a.png 0\n", "val200": "a.png 0\n", "test": "a.png 0\na.png 5\n"},
                      {"a.png": Image.new("L", (4, 4))})
    (root / "classes.txt").write_text("cat\ndog\n")
    with pytest.raises(TaskError, match=r"test\.txt:2: label 5 but .*classes\.txt names only 2 classes"):
        get_task(f"vtab:{root}")
    # With names for every label, a label above the number of images is fine (classes without images).
    (root / "classes.txt").write_text("\n".join(f"c{i}" for i in range(6)) + "\n")
    assert get_task(f"vtab:{root}").num_classes == 6


def png_bomb(path: Path, side: int = 20000) -> Path:
    """A real, valid 1-bit PNG of side×side black pixels: about 50 MB of zero rows deflated to a few tens of KB."""
    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    deflate = zlib.compressobj(9)
    data = b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    bomb = png_bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 200_000
    with pytest.raises(ImageTooLargeError, match=r"bomb\.png is too large to decode .*MAX_IMAGE_PIXELS"):
        open_image(bomb)  # 4e8 pixels: above twice PIL's limit, where PIL itself raises
    root = write_vtab(tmp_path / "t", {"train800": "a.png 0\n", "val200": "a.png 0\n", "test": "a.png 0\nbomb.png 0\n"},
                      {"a.png": Image.new("L", (4, 4))})
    bomb.rename(root / "bomb.png")
    task = get_task(f"vtab:{root}")
    with pytest.raises(TaskError, match=r"test\.txt line 2: image .*bomb\.png is too large to decode") as error:
        task.load("test", 4)
    assert "\n" not in str(error.value)
    # Between 1x and 2x the limit PIL only warns; refused here all the same, with the size in the message.
    small = tmp_path / "small.png"
    Image.new("RGB", (30, 20)).save(small)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(ImageTooLargeError, match=r"small\.png is 30x20 = 600 pixels, above the limit of 500"):
        open_image(small)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)
    with open_image(small) as image:
        assert image.size == (30, 20) and np.asarray(image).shape == (20, 30, 3)


# Few-shot -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
def test_few_shot_counts_per_class(shots: int):
    source = get_task("digits")
    task = get_task(f"digits@{shots}shot")
    assert task.name == f"digits@{shots}shot" and task.group == "few-shot" and task.num_classes == 10
    images, labels = task.load("train800", 8, seed=3)
    assert images.shape == (10 * shots, 3, 8, 8)
    assert np.bincount(labels.numpy(), minlength=10).tolist() == [shots] * 10
    # The K-shot images are rows of the source's train800, and the final-protocol split is the same set.
    source_images, source_labels = source.load("train800", 8)
    index = torch.from_numpy(task.indices(3))
    assert torch.equal(images, source_images[index]) and torch.equal(labels, source_labels[index])
    assert all(torch.equal(a, b) for a, b in zip(task.load("train800val200", 8, seed=3), (images, labels)))
    for split in ("val200", "test"):
        assert all(torch.equal(a, b) for a, b in zip(task.load(split, 8, seed=3), source.load(split, 8)))
    assert task.split_sizes()["train800"] == 10 * shots


def test_few_shot_is_seeded_and_nested():
    task = get_task("digits@4shot")
    assert np.array_equal(task.indices(0), get_task("digits@4shot").indices(0))
    assert not np.array_equal(task.indices(0), task.indices(1))
    assert not torch.equal(task.load("train800", 8, seed=0)[0], task.load("train800", 8, seed=1)[0])
    assert set(get_task("digits@2shot").indices(5)) <= set(get_task("digits@8shot").indices(5))
    assert np.array_equal(task.labels("train800", seed=2), task.load("train800", 8, seed=2)[1].numpy())


def test_few_shot_too_many_shots_and_bad_names():
    with pytest.raises(TaskError, match=r"use digits@\d+shot or fewer"):
        get_task("digits@500shot").load("train800", 8)
    with pytest.raises(TaskError, match="at least 1 shot"):
        get_task("digits@0shot")
    with pytest.raises(TaskError, match="NAME@Kshot"):
        get_task("digits@4shots")


def test_few_shot_suggests_a_k_that_loads():
    """Classes of 7, 5 and 6 images: asking 7 names the class of 5, and the suggested K then loads."""
    def build():
        labels = np.array([0] * 7 + [1] * 5 + [2] * 6)
        images = np.zeros((len(labels), 4, 4), np.uint8)
        return {"train800": (images, labels), "val200": (images[:3], labels[:3]), "test": (images[:3], labels[:3])}

    source = ArrayTask("uneven", ["a", "b", "c"], "natural", build)
    with pytest.raises(TaskError, match=r"2 of 3 classes have fewer \(the fewest: 5, class 'b'\); use uneven@5shot"
                       ) as error:
        FewShotTask(source, 7).load("train800", 4)
    suggested = int(str(error.value).rsplit("@", 1)[1].split("shot")[0])
    assert np.bincount(FewShotTask(source, suggested).load("train800", 4)[1].numpy()).tolist() == [5, 5, 5]
    with pytest.raises(TaskError, match="the fewest: 5"):
        FewShotTask(source, suggested + 1).load("train800", 4)


# Registry -----------------------------------------------------------------------------------------------------------

def test_unknown_task_suggests_close_names():
    with pytest.raises(TaskError, match=r"did you mean digits\?.*heartlora data list"):
        get_task("digts")
    with pytest.raises(TaskError, match="unknown task 'no_such_thing'; `heartlora data list`"):
        get_task("no_such_thing")


def test_registry_lists_sorted_and_refuses_clashes():
    names = [info.name for info in list_tasks()]
    assert names == sorted(names) and {"digits", "fashion_mnist", "mnist"} <= set(names)
    assert all(info.group in ("natural", "specialized", "structured", "few-shot") for info in list_tasks())
    with pytest.raises(ValueError, match="registered twice"):
        register_task("digits", "another", "natural")(lambda: toy_task())
    with pytest.raises(ValueError, match="reserved"):
        register_task("a@b", "bad", "natural")


# Resize cache -------------------------------------------------------------------------------------------------------

def test_resize_cache_shape_dtype_and_reuse(tmp_path: Path):
    calls: list = []
    task = toy_task(calls, cache_key="toy-cache-test-v1")
    images, labels = task.load("train800", 24)
    assert images.shape == (12, 3, 24, 24) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert task.load("train800", 24)[0] is images  # in memory
    fresh = toy_task(calls, cache_key="toy-cache-test-v1")
    again, _ = fresh.load("train800", 24)  # from disk: the resized file, then the native arrays for sizes
    assert torch.equal(again, images) and len(calls) == 1
    assert fresh.load("train800val200", 24)[0].shape == (18, 3, 24, 24)
    assert toy_task(calls).load("test", 5)[0].shape == (9, 3, 5, 5)


def test_resize_is_antialiased_and_identity_at_native_size():
    stripes = np.zeros((64, 64), np.uint8)
    stripes[:, ::2] = 255
    small = resize_image(stripes, 8)
    assert small.shape == (3, 8, 8) and abs(float(small.mean()) - 127.5) < 10 and small.std() < 10
    rgb = np.random.default_rng(0).integers(0, 256, (9, 9, 3), dtype=np.uint8)
    assert np.array_equal(resize_image(rgb, 9), rgb.transpose(2, 0, 1))


def test_cached_arrays_rebuilds_corrupt_file():
    calls: list = []

    def build():
        calls.append(1)
        return {"x": np.arange(10)}

    assert cached_arrays("corrupt-test", build)["x"].sum() == 45
    path = cache_file("corrupt-test")
    path.write_bytes(path.read_bytes()[:40])  # truncated
    assert cached_arrays("corrupt-test", build)["x"].sum() == 45 and len(calls) == 2
    assert cached_arrays("corrupt-test", build)["x"].sum() == 45 and len(calls) == 2


# Offline sources ---------------------------------------------------------------------------------------------------

@needs_fashion
def test_fashion_mnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    task = get_task("fashion_mnist")
    assert task.class_names[:2] == ["T-shirt/top", "Trouser"] and task.num_classes == 10 and task.group == "natural"
    assert task.split_sizes() == {"train800": 800, "val200": 200, "train800val200": 1000, "test": 2000}
    images, labels = task.load("val200", 28)
    assert images.shape == (200, 3, 28, 28) and labels.min() >= 0 and labels.max() <= 9
    assert len(set(labels.tolist())) == 10 and images.float().mean() > 20
    # a fixed split: built again from the source (an empty cache), it holds the same images and labels
    monkeypatch.setenv("HEARTLORA_CACHE", str(tmp_path / "empty-cache"))
    again_images, again_labels = get_task("fashion_mnist").load("val200", 28)
    assert torch.equal(again_labels, labels) and torch.equal(again_images, images)
    assert list((tmp_path / "empty-cache").rglob("*.npz"))  # it was rebuilt there, not read from the module's cache


def test_fashion_mnist_missing_names_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HEARTLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HEARTLORA_FASHION_MNIST_DIR", str(tmp_path / "nothing"))
    with pytest.raises(TaskError, match="apt-get install -y dataset-fashion-mnist"):
        get_task("fashion_mnist").arrays()


def test_fashion_mnist_trains_from_its_cache_without_the_debian_files(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch):
    # a machine that was handed the cached splits (a GPU box, a cluster node) needs neither the files nor apt
    if not fashion_installed():
        pytest.skip("needs the Debian Fashion-MNIST files to build the cache first")
    monkeypatch.setenv("HEARTLORA_CACHE", str(tmp_path / "cache"))
    labels = get_task("fashion_mnist").load("val200", 8)[1]
    monkeypatch.setenv("HEARTLORA_FASHION_MNIST_DIR", str(tmp_path / "nothing"))
    assert torch.equal(get_task("fashion_mnist").load("val200", 8)[1], labels)


@pytest.mark.parametrize("name, test_size", [("mnist", 2000), ("digits", 797)])
def test_digit_sources(name: str, test_size: int):
    task = get_task(name)
    assert task.split_sizes() == {"train800": 800, "val200": 200, "train800val200": 1000, "test": test_size}
    labels = np.concatenate([task.labels(s) for s in ("train800", "val200", "test")])
    assert set(labels.tolist()) == set(range(10))
    # The test images are held out from the same pool: no image of train800 is in test.
    arrays = task.arrays()
    train = {img.tobytes() for img in arrays["train800"][0]}
    overlap = sum(img.tobytes() in train for img in arrays["test"][0])
    assert overlap == 0


def test_predict_reads_images_through_the_same_bomb_check(tmp_path: Path) -> None:
    from heartlora.engine.inference import read_image

    bomb = png_bomb(tmp_path / "bomb.png")
    with pytest.raises(ImageTooLargeError, match=r"bomb\.png is too large to decode"):
        read_image(bomb, 32)


def test_vtab_16_bit_images_are_scaled_to_8_bits_not_clipped(tmp_path: Path):
    """PIL's convert("L") clips a 16-bit image above 255, so every such image became white."""
    import numpy as np

    wide = np.array([[0, 257, 32768, 65535]] * 4, dtype=np.uint16)
    images = {"w.png": Image.fromarray(wide), "dark.png": Image.fromarray((wide // 64).astype(np.uint16))}
    root = write_vtab(tmp_path / "t", {"train800": "w.png 0\ndark.png 1\n", "val200": "w.png 0\n",
                                       "test": "dark.png 1\n"}, images)
    assert Image.open(root / "w.png").mode.startswith("I")  # the file really is 16-bit
    x, _ = get_task(f"vtab:{root}").load("train800", 4)
    assert x[0, 0, 0].tolist() == [0, 1, 128, 255] and (x[0] == x[0, :1]).all()  # scaled, gray on 3 channels
    assert x[1, 0, 0].tolist() == [0, 0, 2, 4]  # a dark 16-bit image stays dark


def test_vtab_lists_saved_with_a_byte_order_mark_and_other_encodings(tmp_path: Path):
    good = {"a.png": Image.new("L", (4, 4)), "b.png": Image.new("L", (4, 4), 255)}
    root = write_vtab(tmp_path / "t", {"train800": "a.png 0\nb.png 1\n", "val200": "a.png 0\n", "test": "b.png 1\n"},
                      good)
    (root / "train800.txt").write_bytes("a.png 0\r\nb.png 1\r\n".encode("utf-8-sig"))  # Notepad's UTF-8
    (root / "classes.txt").write_bytes("cat\ndog\n".encode("utf-8-sig"))
    task = get_task(f"vtab:{root}")
    assert task.class_names == ["cat", "dog"] and task.load("train800", 4)[1].tolist() == [0, 1]
    (root / "val200.txt").write_bytes("\u00e9t\u00e9.png 0\n".encode("latin-1"))
    with pytest.raises(TaskError, match=r"val200\.txt is not UTF-8 text .*save it as UTF-8"):
        get_task(f"vtab:{root}")


def test_vtab_a_file_instead_of_a_folder_is_named_as_such(tmp_path: Path):
    root = write_vtab(tmp_path / "t", {"train800": "a.png 0\n", "val200": "a.png 0\n", "test": "a.png 0\n"},
                      {"a.png": Image.new("L", (4, 4))})
    with pytest.raises(TaskError, match=r"train800\.txt is a file; pass vtab:/path/to/task, the folder"):
        get_task(f"vtab:{root / 'train800.txt'}")
    with pytest.raises(TaskError, match="does not exist") as error:
        get_task(f"vtab:{tmp_path / 'nowhere'}")
    assert "optional" in str(error.value)


def test_split_paths_must_stay_inside_the_task_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 36: '../../../../etc/passwd 0' was opened, and a real image outside the folder trained with exit 0."""
    elsewhere = tmp_path / "imgs"
    elsewhere.mkdir()
    Image.new("RGB", (8, 8)).save(elsewhere / "i0.png")
    root = tmp_path / "task"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "ok.png")
    (root / "linked.png").symlink_to(elsewhere / "i0.png")
    for split in ("train800", "val200", "test"):
        (root / f"{split}.txt").write_text("ok.png 0\nok.png 1\n")
    monkeypatch.delenv("HEARTLORA_IMAGE_ROOTS", raising=False)
    for bad in ("../../../../etc/passwd", "../imgs/i0.png", str(elsewhere / "i0.png"), "linked.png"):
        (root / "val200.txt").write_text(f"ok.png 0\n{bad} 1\n")
        with pytest.raises(TaskError, match=r"val200\.txt:2: image .* is outside the task folder") as info:
            get_task(f"vtab:{root}")
        assert "\n" not in str(info.value) and "HEARTLORA_IMAGE_ROOTS" in str(info.value)
    monkeypatch.setenv("HEARTLORA_IMAGE_ROOTS", str(elsewhere))  # the user says where the images are
    assert get_task(f"vtab:{root}").load("val200", img_size=8)[1].tolist() == [0, 1]


def test_export_to_an_impossible_folder_names_that_folder(tmp_path: Path) -> None:
    """Issue 36: `data export digits /proc/x` named a temporary staging path instead of the user's folder."""
    (tmp_path / "file").write_text("")
    for out, cause in (("/proc/x", "file system that does not accept new folders"),
                       (str(tmp_path / "file" / "x"), "a part of the path is a file")):
        with pytest.raises(TaskError, match=f"cannot write {out}: .*{cause}") as info:
            export_task("digits", out)
        assert ".export" not in str(info.value)


def test_predict_and_serve_decode_an_image_as_training_does(tmp_path: Path) -> None:
    """16-bit, float, palette, RGBA and CMYK files give `heartlora predict` and the server the pixels training saw
    (they converted with PIL's convert("RGB"), which turns a 16-bit image white and a [0, 1] float one black)."""
    import numpy as np

    from heartlora.engine.inference import read_image
    from heartlora.serve import decode_image

    images = {"w.png": Image.fromarray(np.full((6, 6), 30000, np.uint16)),
              "f.tif": Image.fromarray(np.full((6, 6), 0.5, np.float32)),
              "p.png": Image.new("P", (6, 6), 3), "a.png": Image.new("RGBA", (6, 6), (10, 200, 30, 40)),
              "c.jpg": Image.new("CMYK", (6, 6), (0, 255, 255, 0))}
    names = list(images)
    root = write_vtab(tmp_path / "t", {"train800": "".join(f"{n} 0\n" for n in names), "val200": "w.png 0\n",
                                       "test": "w.png 0\n"}, images)
    trained, _ = get_task(f"vtab:{root}").load("train800", 4)
    assert trained[0, :, 0, 0].tolist() == [117] * 3 and trained[1, :, 0, 0].tolist() == [128] * 3
    for i, name in enumerate(names):
        assert torch.equal(read_image(root / name, 4), trained[i]), name
        served = decode_image((root / name).read_bytes(), 4)
        assert torch.equal((served * 255).round().to(torch.uint8), trained[i]), name


def test_vtab_images_it_cannot_convert_are_named_with_their_line(tmp_path: Path) -> None:
    import numpy as np

    images = {"a.png": Image.new("L", (4, 4)), "lab.tif": Image.new("LAB", (4, 4), (50, 0, 0)),
              "nan.tif": Image.fromarray(np.full((4, 4), np.nan, np.float32))}
    root = write_vtab(tmp_path / "t", {"train800": "a.png 0\nlab.tif 1\n", "val200": "a.png 0\nnan.tif 1\n",
                                       "test": "a.png 0\n"}, images)
    task = get_task(f"vtab:{root}")
    with pytest.raises(TaskError, match=r"train800\.txt line 2 \(lab\.tif\): .*LAB colour space.*save it as RGB"):
        task.load("train800", 4)
    with pytest.raises(TaskError, match=r"val200\.txt line 2 \(nan\.tif\): .*NaN"):
        task.load("val200", 4)


def test_vtab_cache_sees_an_image_rewritten_at_the_same_size_and_mtime(tmp_path: Path, monkeypatch) -> None:
    """Size and mtime alone miss a file rewritten in place with its mtime put back (tar, cp -p) or two same-size
    files swapped by rename; the cache key holds the inode and ctime too, which no program sets."""
    import os

    monkeypatch.setenv("HEARTLORA_CACHE", str(tmp_path / "cache"))
    images = {"a.bmp": Image.new("L", (4, 4), 0), "b.bmp": Image.new("L", (4, 4), 255)}
    root = write_vtab(tmp_path / "t", {"train800": "a.bmp 0\nb.bmp 1\n", "val200": "a.bmp 0\n",
                                       "test": "a.bmp 0\n"}, images)
    first, _ = get_task(f"vtab:{root}").load("train800", 4)
    assert first[:, 0, 0, 0].tolist() == [0, 255]
    os.rename(root / "a.bmp", root / "tmp.bmp")  # swapped: same sizes, same mtimes
    os.rename(root / "b.bmp", root / "a.bmp")
    os.rename(root / "tmp.bmp", root / "b.bmp")
    swapped, _ = get_task(f"vtab:{root}").load("train800", 4)
    assert swapped[:, 0, 0, 0].tolist() == [255, 0]
    st = (root / "a.bmp").stat()
    Image.new("L", (4, 4), 128).save(root / "a.bmp")  # rewritten in place, its times put back
    os.utime(root / "a.bmp", ns=(st.st_atime_ns, st.st_mtime_ns))
    rewritten, _ = get_task(f"vtab:{root}").load("train800", 4)
    assert rewritten[:, 0, 0, 0].tolist() == [128, 0]


def test_vtab_notes_lists_that_disagree(tmp_path: Path) -> None:
    good = {n: Image.new("L", (4, 4), i) for i, n in enumerate(["a.png", "b.png", "c.png", "d.png"])}
    root = write_vtab(tmp_path / "t", {"train800": "a.png 0\nb.png 1\n", "val200": "c.png 1\n",
                                       "test": "d.png 0\n"}, good)
    assert get_task(f"vtab:{root}").notes() == []  # consistent lists: nothing to say
    (root / "train800val200.txt").write_text("a.png 0\nc.png 1\nb.png 1\n")  # another order is the same lines
    assert get_task(f"vtab:{root}").notes() == []
    (root / "train800.txt").write_text("a.png 0\nb.png 0\n")  # a label fixed here, not in the union file
    (root / "test.txt").write_text("d.png 0\na.png 0\n")
    notes = get_task(f"vtab:{root}").notes()
    assert len(notes) == 3
    assert notes[0].startswith("1 list line(s) give an image another label") and "b.png: 0 (train800.txt line 2)" in \
        notes[0] and "1 (train800val200.txt line 3)" in notes[0]
    assert "train800val200.txt is not train800.txt + val200.txt (1 line(s) only in it, 1 of theirs" in notes[1]
    assert notes[2].startswith("1 of test.txt's 2 images are also training images (e.g. a.png, test.txt line 2)")


def test_vtab_classes_txt_with_a_blank_line_inside_is_refused(tmp_path: Path) -> None:
    root = write_vtab(tmp_path / "t", {"train800": "a.png 0\n", "val200": "a.png 0\n", "test": "a.png 00002\n"},
                      {"a.png": Image.new("L", (4, 4))})
    (root / "classes.txt").write_text("cat\ndog\nbird\n\n\n")  # trailing blank lines are fine
    assert get_task(f"vtab:{root}").class_names == ["cat", "dog", "bird"]  # and so is a label's leading zero
    (root / "classes.txt").write_text("cat\n\ndog\nbird\n")  # dropped, "bird" would name label 2
    with pytest.raises(TaskError, match=r"classes\.txt:2: blank line"):
        get_task(f"vtab:{root}")


def test_vtab_a_link_loop_is_named_with_its_line(tmp_path: Path) -> None:
    root = write_vtab(tmp_path / "t", {"train800": "a.png 0\n", "val200": "a.png 0\n", "test": "loop.png 0\n"},
                      {"a.png": Image.new("L", (4, 4))})
    (root / "loop.png").symlink_to("loop.png")
    with pytest.raises(TaskError, match=r"cannot look at image .*loop\.png \(test\.txt line 1\)"):
        get_task(f"vtab:{root}").check("test")


def test_a_cache_that_cannot_be_written_is_skipped_with_a_note(monkeypatch, capsys) -> None:
    import errno

    import numpy as np

    from heartlora.data import cache

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache.np, "savez", full)
    arrays = cache.cached_arrays("test-full-disk-key", lambda: {"x": np.arange(3)})
    assert arrays["x"].tolist() == [0, 1, 2]
    assert "note: could not keep the decoded images in the cache" in capsys.readouterr().err
    assert not cache.cache_file("test-full-disk-key").exists()
