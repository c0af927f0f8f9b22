"""Dataset readers on tiny copies of each dataset's real on-disk layout, built in tmp_path.

Every image is 40×30 (W×H) with a red object on a green background at a known place, so a reader's
box and mask can be checked against the pixels it returns. The index files are written in the formats
the datasets distribute: CUB's space-separated text files and soft PNG masks, Stanford Dogs' VOC XML
files without extension and MATLAB v5 lists (N×1 cells of char arrays, uint8 labels), Stanford Cars'
MATLAB v5 1×N struct arrays with uint8/uint16 1×1 fields and 1×K cells of class names, Human3.6M's
MATLAB v7.3 (HDF5) mask files.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
import torch
from PIL import Image

from foba_core.data import open_dataset
from foba_core.data.cars import StanfordCars
from foba_core.data.cub import CUB200
from foba_core.data.dogs import StanfordDogs
from foba_core.data.h36m import Human36M, main
from foba_core.data.h36m_prepare import person_crop, prepare_h36m

W, H = 40, 30
RED, GREEN = (220, 20, 20), (0, 160, 0)


def scene(boxes, width=W, height=H) -> np.ndarray:
    """A green (height, width, 3) uint8 image with a red rectangle per box (x1, y1, x2, y2, exclusive end)."""
    img = np.zeros((height, width, 3), np.uint8)
    img[:] = GREEN
    for x1, y1, x2, y2 in boxes:
        img[y1:y2, x1:x2] = RED
    return img


def box_mask(box, width=W, height=H) -> np.ndarray:
    m = np.zeros((height, width), bool)
    x1, y1, x2, y2 = box
    m[y1:y2, x1:x2] = True
    return m


def assert_red_inside(image: torch.Tensor, box) -> None:
    """The box's inner pixels are red in the returned image and the pixels just outside are not."""
    x1, y1, x2, y2 = (int(v) for v in box)
    inner = image[:, y1 + 1:y2 - 1, x1 + 1:x2 - 1]
    assert inner[0].mean() > 0.7 and inner[1].mean() < 0.3
    if x1 >= 2:
        assert image[0, (y1 + y2) // 2, x1 - 2] < 0.3  # green left of the box


def cell(strings) -> np.ndarray:
    """A MATLAB cell column (N×1) of char arrays, as MATLAB saves a cellstr (and lists.tar holds them)."""
    out = np.empty((len(strings), 1), dtype=object)
    for i, s in enumerate(strings):
        out[i, 0] = np.array([s])
    return out


def assert_box_on_object(item, box) -> None:
    """The item's only box is ``box`` and the returned pixels there are the red object."""
    assert item["boxes"].tolist() == [list(box)]
    assert_red_inside(item["image"], box)


# ---------------------------------------------------------------- CUB-200-2011

CUB_ITEMS = [  # image_id, name, class_id, is_training_image, object box, JPEG mode
    (1, "001.Black_footed_Albatross/Black_Footed_Albatross_0001_11.jpg", 1, 1, (10, 8, 25, 20), "RGB"),
    (2, "001.Black_footed_Albatross/Black_Footed_Albatross_0002_12.jpg", 1, 0, (5, 5, 20, 15), "L"),
    (3, "002.Laysan_Albatross/Laysan_Albatross_0003_13.jpg", 2, 1, (20, 10, 35, 25), "RGB"),
]


def make_cub(parent: Path) -> Path:
    """CUB_200_2011/ (index files, images) and segmentations/ beside it, as the two archives extract."""
    base = parent / "CUB_200_2011"
    for image_id, name, _, _, box, mode in CUB_ITEMS:
        path = base / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene([box])).convert(mode).save(path, quality=95)
        soft = np.zeros((H, W), np.uint8)  # soft mask: 2 of 5 annotators around the bird, all 5 on it
        x1, y1, x2, y2 = box
        soft[max(y1 - 2, 0):y2 + 2, max(x1 - 2, 0):x2 + 2] = 102
        soft[y1:y2, x1:x2] = 255
        seg = (parent / "segmentations" / name).with_suffix(".png")
        seg.parent.mkdir(parents=True, exist_ok=True)
        seg_image = Image.fromarray(soft)
        (seg_image.convert("LA") if image_id == 3 else seg_image).save(seg)  # a few CUB masks are 'LA'
    (base / "images.txt").write_text("".join(f"{i} {n}\n" for i, n, *_ in CUB_ITEMS))
    (base / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, _, t, *_ in CUB_ITEMS))
    (base / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c, *_ in CUB_ITEMS))
    (base / "classes.txt").write_text("1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n")
    (base / "bounding_boxes.txt").write_text(
        "".join(f"{i} {b[0]:.1f} {b[1]:.1f} {b[2] - b[0]:.1f} {b[3] - b[1]:.1f}\n" for i, _, _, _, b, _ in CUB_ITEMS))
    return base


def test_cub_splits_pixels_masks_and_boxes(tmp_path):
    base = make_cub(tmp_path)
    assert [len(CUB200(tmp_path, split=s)) for s in ("train", "test", "all")] == [2, 1, 3]
    data = CUB200(base, split="all")  # root may also be CUB_200_2011/ itself; segmentations/ is beside it
    for item, (_, name, _, _, box, _) in zip(data, CUB_ITEMS, strict=True):
        assert item["image"].shape == (3, H, W) and item["image"].dtype == torch.float32  # original size, RGB
        assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
        assert torch.equal(item["mask"], torch.from_numpy(box_mask(box)))  # the 2-of-5 halo is background
        assert item["boxes"].tolist() == [list(box)] and item["boxes"].dtype == torch.int64
        if item["id"] != "Black_Footed_Albatross_0002_12":  # the grayscale JPEG has no red
            assert_red_inside(item["image"], box)
        assert item["caption"] == "a photo of a bird" and item["path"].endswith(name)
    gray = data[1]["image"]  # stored as a grayscale JPEG: three equal channels
    assert torch.allclose(gray[0], gray[1]) and torch.allclose(gray[1], gray[2])
    assert data[2]["label"] == "Laysan Albatross" and data[0]["id"] == "Black_Footed_Albatross_0001_11"


def test_cub_missing_and_inconsistent_files_are_named(tmp_path):
    base = make_cub(tmp_path)
    lines = (base / "bounding_boxes.txt").read_text().splitlines()
    (base / "bounding_boxes.txt").write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(ValueError, match=r"images\.txt.*bounding_boxes\.txt"):
        CUB200(tmp_path)
    (base / "bounding_boxes.txt").write_text("\n".join(lines) + "\n")
    (base / "images" / CUB_ITEMS[1][1]).unlink()
    with pytest.raises(FileNotFoundError, match="Black_Footed_Albatross_0002_12.jpg"):
        CUB200(tmp_path, split="test")[0]
    (tmp_path / "segmentations").rename(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="segmentations"):
        CUB200(tmp_path)
    assert "mask" not in CUB200(tmp_path, split="train", masks=False)[0]
    (base / "images.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"images\.txt"):
        CUB200(tmp_path)


# ---------------------------------------------------------------- Stanford Dogs

DOG_ITEMS = [  # folder, file stem, label, split, dog boxes (0-based, exclusive end)
    ("n02085620-Chihuahua", "n02085620_7", 1, "train", [(10, 8, 25, 20)]),
    ("n02085620-Chihuahua", "n02085620_9", 1, "test", [(2, 3, 14, 27), (24, 5, 38, 22)]),  # two dogs
    ("n02116738-African_hunting_dog", "n02116738_4", 2, "train", [(20, 10, 35, 25)]),
]


def voc_xml(stem: str, breed: str, boxes, width: int = W, height: int = H) -> bytes:
    """A Stanford Dogs annotation as annotation.tar holds it: tab-indented VOC XML, 1-based inclusive <bndbox>."""
    objects = "".join(
        f"\t<object>\n\t\t<name>{breed}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n"
        f"\t\t<difficult>0</difficult>\n\t\t<bndbox>\n\t\t\t<xmin>{x1 + 1}</xmin>\n\t\t\t<ymin>{y1 + 1}</ymin>\n"
        f"\t\t\t<xmax>{x2}</xmax>\n\t\t\t<ymax>{y2}</ymax>\n\t\t</bndbox>\n\t</object>\n"
        for x1, y1, x2, y2 in boxes)
    return (f"<annotation>\n\t<folder>{stem.split('_')[0][1:]}</folder>\n\t<filename>{stem}</filename>\n"
            "\t<source>\n\t\t<database>ImageNet database</database>\n\t</source>\n"
            f"\t<size>\n\t\t<width>{width}</width>\n\t\t<height>{height}</height>\n\t\t<depth>3</depth>\n\t</size>\n"
            f"\t<segment>0</segment>\n{objects}</annotation>").encode()


def make_dogs(root: Path) -> Path:
    for folder, stem, _, _, boxes in DOG_ITEMS:
        (root / "Images" / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene(boxes)).save(root / "Images" / folder / f"{stem}.jpg", quality=95)
        (root / "Annotation" / folder).mkdir(parents=True, exist_ok=True)
        (root / "Annotation" / folder / stem).write_bytes(voc_xml(stem, folder.split("-", 1)[1], boxes))
    for split in ("train", "test"):
        rows = [r for r in DOG_ITEMS if r[3] == split]
        scipy.io.savemat(root / f"{split}_list.mat", {  # as lists.tar: N×1 cells of char arrays, N×1 uint8 labels
            "file_list": cell([f"{f}/{s}.jpg" for f, s, *_ in rows]),
            "annotation_list": cell([f"{f}/{s}" for f, s, *_ in rows]),
            "labels": np.array([[r[2]] for r in rows], dtype=np.uint8),
        })
    return root


def test_dogs_splits_and_all_boxes(tmp_path):
    root = make_dogs(tmp_path)
    assert [len(StanfordDogs(root, split=s)) for s in ("train", "test", "all")] == [2, 1, 3]
    test = StanfordDogs(root, split="test")[0]
    assert test["boxes"].shape == (2, 4) and test["boxes"].tolist() == [list(b) for b in DOG_ITEMS[1][4]]
    for box in DOG_ITEMS[1][4]:
        assert_red_inside(test["image"], box)
    train = StanfordDogs(root, split="train")
    assert [item["id"] for item in train] == ["n02085620_7", "n02116738_4"]
    assert train[1]["label"] == "African hunting dog" and train[1]["caption"] == "a photo of a dog"
    assert train[0]["image"].shape == (3, H, W) and "mask" not in train[0]


def test_dogs_missing_files_are_named(tmp_path):
    root = make_dogs(tmp_path)
    (root / "Annotation" / "n02085620-Chihuahua" / "n02085620_9").unlink()
    with pytest.raises(FileNotFoundError, match="n02085620_9"):
        StanfordDogs(root, split="test")[0]
    (root / "test_list.mat").unlink()
    with pytest.raises(FileNotFoundError, match="test_list.mat"):
        StanfordDogs(root, split="test")


# ---------------------------------------------------------------- Stanford Cars

CAR_NAMES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]
CAR_ITEMS = {  # split -> (file name, 1-based class, box 0-based exclusive)
    "train": [("00001.jpg", 2, (10, 8, 25, 20)), ("00002.jpg", 1, (3, 4, 38, 28))],
    "test": [("00001.jpg", 1, (20, 10, 35, 25))],
}


def annotations_struct(rows) -> np.ndarray:
    """The devkit's 1×N struct array 'annotations' as MATLAB saved it: 1-based inclusive bbox fields held as
    1×1 uint8/uint16 matrices, class a 1×1 uint8, fname a char array."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    out = np.empty((1, len(rows)), dtype=[(f, object) for f in fields])
    for i, (fname, cls, (x1, y1, x2, y2)) in enumerate(rows):
        out[0, i] = (np.array([[x1 + 1]], np.uint8), np.array([[y1 + 1]], np.uint16), np.array([[x2]], np.uint16),
                     np.array([[y2]], np.uint8), np.array([[cls]], np.uint8), np.array([fname]))
    return out


def make_cars(root: Path, labels_in_devkit: bool = False) -> Path:
    (root / "devkit").mkdir(parents=True)
    for split, rows in CAR_ITEMS.items():
        (root / f"cars_{split}").mkdir()
        for fname, _, box in rows:
            Image.fromarray(scene([box])).save(root / f"cars_{split}" / fname, quality=95)
    names = cell(CAR_NAMES).T  # 1×K cell
    scipy.io.savemat(root / "devkit" / "cars_meta.mat", {"class_names": names})
    scipy.io.savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": annotations_struct(CAR_ITEMS["train"])})
    test_file = root / ("devkit" if labels_in_devkit else "") / "cars_test_annos_withlabels.mat"
    scipy.io.savemat(test_file, {"annotations": annotations_struct(CAR_ITEMS["test"])})
    return root


@pytest.mark.parametrize("labels_in_devkit", [False, True])
def test_cars_splits_boxes_and_ids(tmp_path, labels_in_devkit):
    root = make_cars(tmp_path, labels_in_devkit)
    assert [len(StanfordCars(root, split=s)) for s in ("train", "test", "all")] == [2, 1, 3]
    data = StanfordCars(root, split="all")
    assert [item["id"] for item in data] == ["train_00001", "train_00002", "test_00001"]  # same file names, distinct ids
    for item, (_, cls, box) in zip(data, CAR_ITEMS["train"] + CAR_ITEMS["test"], strict=True):
        assert item["image"].shape == (3, H, W)
        assert item["boxes"].tolist() == [list(box)]
        assert_red_inside(item["image"], box)
        assert item["label"] == CAR_NAMES[cls - 1] and item["class_id"] == cls
        assert item["caption"] == "a photo of a car"


def test_cars_missing_test_labels_are_named(tmp_path):
    root = make_cars(tmp_path)
    (root / "cars_test_annos_withlabels.mat").unlink()
    assert len(StanfordCars(root, split="train")) == 2
    with pytest.raises(FileNotFoundError, match="cars_test_annos_withlabels.mat"):
        StanfordCars(root, split="test")
    (root / "devkit" / "cars_meta.mat").unlink()
    with pytest.raises(FileNotFoundError, match="cars_meta.mat"):
        StanfordCars(root, split="train")


# ---------------------------------------------------------------- Human3.6M

VW, VH = 48, 40  # video frames (even sizes for the codec)


def person_box(frame: int) -> tuple[int, int, int, int]:
    """The fake person's box in frame ``frame``: 12×24 pixels walking right."""
    return (8 + 3 * frame, 8, 20 + 3 * frame, 32)


def write_mat_masks(path: Path, masks) -> None:
    """A MATLAB v7.3 file as Human3.6M ships them: HDF5 with a 1×N cell 'Masks' of logical (W, H) arrays."""
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w", userblock_size=512) as f:
        group, refs = f.create_group("#refs#"), []
        for i, mask in enumerate(masks):
            ds = group.create_dataset(f"m{i}", data=np.ascontiguousarray(mask.T).astype(np.uint8))
            ds.attrs["MATLAB_class"] = np.bytes_("logical")
            refs.append(ds.ref)
        cells = f.create_dataset("Masks", data=np.array(refs, dtype=h5py.ref_dtype).reshape(-1, 1))
        cells.attrs["MATLAB_class"] = np.bytes_("cell")


def frames_and_masks(n: int, empty: tuple[int, ...] = ()):
    frames = [scene([person_box(i)], VW, VH) for i in range(n)]
    boxes = [box_mask(person_box(i), VW, VH) & (i not in empty) for i in range(n)]
    return frames, boxes


def make_h36m_video_subject(src: Path, n: int = 6, empty: tuple[int, ...] = (5,)) -> None:
    """S1 with a video and its box masks; frames listed in ``empty`` have no person box."""
    import av

    frames, boxes = frames_and_masks(n, empty)
    name = "Walking 1.54138969"
    (src / "S1" / "Videos").mkdir(parents=True)
    with av.open(str(src / "S1" / "Videos" / f"{name}.mp4"), "w") as container:
        stream = container.add_stream("mpeg4", rate=50)
        stream.width, stream.height, stream.pix_fmt = VW, VH, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    write_mat_masks(src / "S1" / "MySegmentsMat" / "ground_truth_bb" / f"{name}.mat", boxes)


def make_h36m_frames_subject(src: Path) -> None:
    """S9 as h36m-fetch leaves it: some extracted frames, plus box and background-subtraction masks
    and a metadata.xml that maps the folder 'Walking-1' to the files 'Walking 1.<camera>'."""
    frames, boxes = frames_and_masks(6)
    folder = src / "S9" / "Walking-1" / "imageSequence" / "54138969"
    folder.mkdir(parents=True)
    for i in (0, 2, 4):
        Image.fromarray(frames[i]).save(folder / f"img_{i + 1:06d}.jpg", quality=95)
    write_mat_masks(src / "S9" / "MySegmentsMat" / "ground_truth_bb" / "Walking 1.54138969.mat", boxes)
    people = [box_mask((x1 + 2, y1 + 2, x2 - 2, y2 - 2), VW, VH) for x1, y1, x2, y2 in map(person_box, range(6))]
    write_mat_masks(src / "S9" / "MySegmentsMat" / "ground_truth_bs" / "Walking 1.54138969.mat", people)
    root = ET.Element("a")
    mapping = ET.SubElement(root, "mapping")
    for row in (["Action", "subaction", "S9"], ["14", "1", "Walking 1"], ["14", "2", "Walking"]):
        tr = ET.SubElement(mapping, "tr")
        for text in row:
            ET.SubElement(tr, "td").text = text
    names = ET.SubElement(root, "actionnames")
    for i in range(16):
        ET.SubElement(names, "n").text = "Walking" if i == 13 else f"Action{i}"
    (src / "metadata.xml").write_bytes(ET.tostring(root))


def test_person_crop_centres_and_scales_the_box():
    image = Image.fromarray(scene([(30, 10, 50, 90)], 100, 100))
    crop, window, box = person_crop(image, (30, 10, 50, 90), size=64)
    assert crop.size == (64, 64) and window[2] - window[0] == window[3] - window[1] == 94  # 80 × 200/170
    assert abs((box[0] + box[2]) / 2 - 32) <= 1 and abs((box[1] + box[3]) / 2 - 32) <= 1
    assert 53 <= box[3] - box[1] <= 56  # the person fills 170/200 of the crop height
    assert np.asarray(crop)[32, 32, 0] > 150  # red person at the centre


def test_h36m_prepare_cli_from_extracted_frames_and_read(tmp_path):
    pytest.importorskip("h5py")
    src, out = tmp_path / "h36m", tmp_path / "subset"
    make_h36m_frames_subject(src)
    main(["prepare", "--src", str(src), "--out", str(out), "--n_frames", "0", "--n_test_frames", "3", "--size", "32"])
    table = pd.read_csv(out / "index.csv", dtype=str, keep_default_na=False)
    assert sorted(table["frame"].astype(int)) == [0, 2, 4] and set(table["split"]) == {"test"}
    assert set(table["action"]) == {"Walking 1"} and set(table["camera"]) == {"54138969"}
    data = Human36M(out, split="test")
    assert len(data) == 3 and len(Human36M(out, split="train")) == 0
    for item in data:
        assert item["image"].shape == (3, 32, 32) and item["caption"] == "a photo of a human"
        assert_red_inside(item["image"], item["boxes"][0].tolist())
        assert item["mask"].shape == (32, 32) and item["mask"].any()
        assert item["image"][0][item["mask"]].mean() > 0.7  # the person mask lies on the red person
        assert item["label"] == "Walking" and item["subject"] == "S9"
    loaded = open_dataset("h36m", out, split="all")
    assert [i["id"] for i in loaded] == [i["id"] for i in data]


def test_h36m_prepare_from_video_skips_frames_without_a_person(tmp_path):
    pytest.importorskip("h5py")
    pytest.importorskip("av")
    src = tmp_path / "h36m"
    make_h36m_video_subject(src)
    index = prepare_h36m(src, tmp_path / "a", n_frames=5, n_test_frames=0, size=32, seed=0)
    table = pd.read_csv(index, dtype=str, keep_default_na=False)
    assert sorted(table["frame"].astype(int)) == [0, 1, 2, 3, 4]  # frame 5 has no box: never kept
    assert (table["mask"] == "").all() and table["id"].iloc[0].startswith("S1_Walking-1_54138969_")
    item = Human36M(tmp_path / "a", split="train")[0]
    assert item["image"].shape == (3, 32, 32) and "mask" not in item
    assert_red_inside(item["image"], item["boxes"][0].tolist())
    again = [prepare_h36m(src, tmp_path / d, n_frames=2, n_test_frames=0, size=32, seed=7) for d in ("b", "c")]
    assert again[0].read_text() == again[1].read_text()  # same seed, same frames


def test_h36m_reader_on_a_prepared_subset(tmp_path):
    (tmp_path / "images").mkdir()
    rows = []
    for i, (split, box) in enumerate([("train", (4, 6, 20, 28)), ("test", (10, 2, 30, 30)), ("train", (0, 0, 16, 16))]):
        uid = f"S1_Walking-1_54138969_{i:06d}"
        Image.fromarray(scene([box], 32, 32)).save(tmp_path / "images" / f"{uid}.jpg", quality=95)
        rows.append({"id": uid, "subject": "S1", "action": "Walking 1", "camera": "54138969", "frame": i,
                     "split": split, "x1": box[0], "y1": box[1], "x2": box[2], "y2": box[3],
                     "image": f"images/{uid}.jpg", "mask": ""})
    pd.DataFrame(rows).to_csv(tmp_path / "index.csv", index=False)
    assert [len(Human36M(tmp_path, split=s)) for s in ("train", "test", "all")] == [2, 1, 3]
    item = Human36M(tmp_path, split="test")[0]
    assert item["boxes"].tolist() == [[10, 2, 30, 30]] and item["frame"] == 1 and "mask" not in item
    assert_red_inside(item["image"], (10, 2, 30, 30))


def test_h36m_missing_inputs_are_named(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"index\.csv.*prepare"):
        Human36M(tmp_path)
    with pytest.raises(FileNotFoundError, match="ground_truth_bb"):
        prepare_h36m(tmp_path, tmp_path / "out", n_frames=2, n_test_frames=0)
    boxes = tmp_path / "S1" / "MySegmentsMat" / "ground_truth_bb" / "Walking 1.54138969.mat"
    boxes.parent.mkdir(parents=True)
    boxes.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "h5py", None)  # as if h5py were not installed
    with pytest.raises(ImportError, match="pip install h5py"):
        prepare_h36m(tmp_path, tmp_path / "out", n_frames=2, n_test_frames=0)


# ---------------------------------------------------------------- open_dataset

def test_open_dataset_dispatches_and_names_the_options(tmp_path):
    make_cub(tmp_path)
    assert isinstance(open_dataset("cub", tmp_path, split="train"), CUB200)
    assert len(open_dataset("toy", None, split="test", size=2)) == 2
    with pytest.raises(ValueError, match="cub"):
        open_dataset("birds", tmp_path)
    with pytest.raises(ValueError, match="root"):
        open_dataset("dogs", None)
    with pytest.raises(ValueError, match="test"):
        open_dataset("cub", tmp_path, split="tset")


def test_each_reader_captions_its_items_with_its_class_word(tmp_path):
    """y_f of every item is object_prompt(reader.class_word); the toy world has no class word (each item's label)."""
    from foba_core.prompts import object_prompt
    from foba_core.toy.world import ToyWorld

    make_cub(tmp_path / "cub")
    (tmp_path / "h36m" / "images").mkdir(parents=True)
    Image.fromarray(scene([(4, 6, 20, 28)], 32, 32)).save(tmp_path / "h36m" / "images" / "a.jpg", quality=95)
    pd.DataFrame([{"id": "a", "subject": "S1", "action": "Walking 1", "camera": "54138969", "frame": 0,
                   "split": "test", "x1": 4, "y1": 6, "x2": 20, "y2": 28, "image": "images/a.jpg",
                   "mask": ""}]).to_csv(tmp_path / "h36m" / "index.csv", index=False)
    readers = {CUB200: (tmp_path / "cub", "bird"), StanfordDogs: (make_dogs(tmp_path / "dogs"), "dog"),
               StanfordCars: (make_cars(tmp_path / "cars"), "car"), Human36M: (tmp_path / "h36m", "human")}
    for reader, (root, word) in readers.items():
        assert reader.class_word == word
        captions = {item["caption"] for item in reader(root, split="test")}
        assert captions == {object_prompt(word)} == {f"a photo of a {word}"}
    assert ToyWorld.class_word is None
    toy = ToyWorld("test", size=4)
    assert all(item["caption"] == object_prompt(item["label"]) for item in toy)


# ---------------------------------------------------------------- image formats and orientation (all readers)

def rotated_for_exif(displayed: np.ndarray, tag: int = 6) -> tuple[Image.Image, bytes]:
    """The stored pixels and EXIF block of a camera JPEG whose EXIF orientation ``tag`` turns them into ``displayed``."""
    assert tag == 6
    stored = Image.fromarray(displayed).transpose(Image.Transpose.ROTATE_90)  # exif_transpose undoes it (ROTATE_270)
    exif = Image.Exif()
    exif[0x0112] = tag
    return stored, exif.tobytes()


def test_cub_odd_image_modes_come_back_as_rgb_on_the_object(tmp_path):
    base = make_cub(tmp_path)
    _, name, _, _, box, _ = CUB_ITEMS[0]
    path = base / "images" / name
    for mode, save in (("CMYK", {"format": "JPEG", "quality": 95}), ("P", {"format": "PNG"}),
                       ("RGBA", {"format": "PNG"}), ("LA", {"format": "PNG"})):
        Image.fromarray(scene([box])).convert(mode).save(path, **save)  # PNG behind a .jpg name, as in ImageNet
        item = CUB200(tmp_path, split="train")[0]
        assert item["image"].shape == (3, H, W), mode
        if mode != "LA":
            assert_red_inside(item["image"], box)
        assert item["mask"][box[1]:box[3], box[0]:box[2]].all()


def test_cub_exif_orientation_follows_the_annotation(tmp_path):
    base = make_cub(tmp_path)
    _, name, _, _, box, _ = CUB_ITEMS[0]
    stored, exif = rotated_for_exif(scene([box]))
    # a tag the annotators did not see: the mask (W × H) matches the displayed image -> rotate the pixels to it
    stored.save(base / "images" / name, exif=exif, quality=95)
    item = CUB200(tmp_path, split="train")[0]
    assert item["image"].shape == (3, H, W) and item["boxes"].tolist() == [list(box)]
    assert_red_inside(item["image"], box)
    assert item["image"][0][item["mask"]].mean() > 0.7  # the mask lies on the red bird
    # the tag on pixels that were annotated as stored (mask of the stored size): the pixels stay as stored
    raw = scene([box])
    Image.fromarray(raw).save(base / "images" / name, exif=exif, quality=95)
    item = CUB200(tmp_path, split="train")[0]
    assert item["image"].shape == (3, H, W)
    assert_red_inside(item["image"], box)


def test_cub_mask_threshold_is_a_strict_majority(tmp_path):
    make_cub(tmp_path)
    _, name, _, _, box, _ = CUB_ITEMS[0]
    soft = np.zeros((H, W), np.uint8)
    soft[:, :10], soft[:, 10:20], soft[:, 20:30], soft[:, 30:] = 102, 127, 128, 153  # 2/5, <0.5, >0.5, 3/5
    Image.fromarray(soft).save((tmp_path / "segmentations" / name).with_suffix(".png"))
    mask = CUB200(tmp_path, split="train")[0]["mask"]
    assert not mask[:, :20].any() and mask[:, 20:].all()


def test_cub_wrong_index_files_name_the_file_and_line(tmp_path):
    base = make_cub(tmp_path)
    good = (base / "bounding_boxes.txt").read_text()
    (base / "bounding_boxes.txt").write_text(good.replace("10.0 8.0", "ten 8.0"))
    with pytest.raises(ValueError, match=r"bounding_boxes\.txt, line 1.*'ten'"):
        CUB200(tmp_path)
    (base / "bounding_boxes.txt").write_text(good)
    (base / "train_test_split.txt").write_text("1 1\n2 0\n3 yes\n")
    with pytest.raises(ValueError, match=r"train_test_split\.txt.*'yes'"):
        CUB200(tmp_path)
    (base / "train_test_split.txt").write_text("1 1\n2 0\n3 1\n")
    (base / "images" / CUB_ITEMS[0][1]).write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="Black_Footed_Albatross_0001_11.jpg.*cannot decode"):
        CUB200(tmp_path, split="train")[0]
    mask = (tmp_path / "segmentations" / CUB_ITEMS[2][1]).with_suffix(".png")
    Image.fromarray(np.zeros((H + 1, W), np.uint8)).save(mask)
    with pytest.raises(ValueError, match="Laysan_Albatross_0003_13.png"):
        CUB200(tmp_path, split="train")[1]
    mask.unlink()
    with pytest.raises(FileNotFoundError, match="Laysan_Albatross_0003_13.png"):
        CUB200(tmp_path, split="train")[1]


def test_non_finite_box_coordinates_name_the_file_and_the_line_or_item(tmp_path):
    base = make_cub(tmp_path / "cub")
    good = (base / "bounding_boxes.txt").read_text()
    (base / "bounding_boxes.txt").write_text(good.replace("5.0 5.0", "5.0 inf"))
    with pytest.raises(ValueError, match=r"bounding_boxes\.txt, line 2: 'inf' is not a finite number"):
        CUB200(base.parent)
    dogs = make_dogs(tmp_path / "dogs")
    folder, stem, _, _, boxes = DOG_ITEMS[1]
    xml = voc_xml(stem, "Chihuahua", boxes).decode().replace("<xmax>38</xmax>", "<xmax>inf</xmax>")
    (dogs / "Annotation" / folder / stem).write_text(xml)
    with pytest.raises(ValueError, match=rf"{stem}: box 2 of 2 \[25.0, 6.0, inf, 22.0\] has a coordinate that is not"):
        StanfordDogs(dogs, split="test")[0]
    cars = make_cars(tmp_path / "cars")
    annotations = annotations_struct(CAR_ITEMS["train"])
    annotations[0, 1]["bbox_y2"] = np.array([[np.nan]])
    scipy.io.savemat(cars / "devkit" / "cars_train_annos.mat", {"annotations": annotations})
    with pytest.raises(ValueError, match=r"cars_train_annos\.mat: 00002\.jpg: box 1 of 1 \[4.0, 5.0, 38.0, nan\]"):
        StanfordCars(cars, split="train")
    h36m = tmp_path / "h36m"
    h36m.mkdir()
    row = {"id": "S1_Walking-1_54138969_000000", "subject": "S1", "action": "Walking 1", "camera": "54138969",
           "frame": 0, "split": "test", "x1": 4, "y1": 6, "x2": "inf", "y2": 28, "image": "images/a.jpg", "mask": ""}
    pd.DataFrame([row]).to_csv(h36m / "index.csv", index=False)
    with pytest.raises(ValueError, match=r"index\.csv, line 2: x2 = 'inf' is not a finite number"):
        Human36M(h36m)


def test_cub_boxes_are_clipped_and_segmentations_may_sit_inside(tmp_path):
    base = make_cub(tmp_path)
    (tmp_path / "segmentations").rename(base / "segmentations")
    (base / "bounding_boxes.txt").write_text("1 -1.5 2.2 50.0 40.0\n2 5.0 5.0 15.0 10.0\n3 20.0 10.0 15.0 15.0\n")
    item = CUB200(tmp_path, split="train")[0]
    assert item["boxes"].tolist() == [[0, 2, W, H]] and "mask" in item


# ---------------------------------------------------------------- Stanford Dogs: more of the real format

def test_dogs_lists_in_other_matlab_cell_shapes(tmp_path):
    root = make_dogs(tmp_path)
    rows = [r for r in DOG_ITEMS if r[3] == "train"]
    names = [f"{f}/{s}.jpg" for f, s, *_ in rows]
    nested = np.empty((len(rows), 1), dtype=object)  # cells of 1×1 cells
    for i, n in enumerate(names):
        inner = np.empty((1, 1), dtype=object)
        inner[0, 0] = np.array([n])
        nested[i, 0] = inner
    scipy.io.savemat(root / "train_list.mat", {"file_list": nested,  # and a char matrix, padded with blanks
                                               "annotation_list": np.array([n[:-4] for n in names]),
                                               "labels": np.array([r[2] for r in rows], dtype=np.float64)})
    train = StanfordDogs(root, split="train")
    assert [item["id"] for item in train] == ["n02085620_7", "n02116738_4"]
    for item, row in zip(train, rows, strict=True):
        assert_box_on_object(item, row[4][0])
        assert item["class_id"] == row[2]


def test_dogs_odd_images_exif_and_wrong_annotations(tmp_path):
    root = make_dogs(tmp_path)
    folder, stem, _, _, boxes = DOG_ITEMS[1]
    image, annotation = root / "Images" / folder / f"{stem}.jpg", root / "Annotation" / folder / stem
    Image.fromarray(scene(boxes)).convert("CMYK").save(image, quality=95)
    item = StanfordDogs(root, split="test")[0]
    assert item["image"].shape == (3, H, W)
    for box in boxes:
        assert_red_inside(item["image"], box)
    # a camera image annotated as displayed (<size> 40×30) while stored rotated (30×40 + EXIF tag 6)
    stored, exif = rotated_for_exif(scene(boxes))
    stored.save(image, exif=exif, quality=95)
    item = StanfordDogs(root, split="test")[0]
    assert item["image"].shape == (3, H, W) and item["boxes"].tolist() == [list(b) for b in boxes]
    for box in boxes:
        assert_red_inside(item["image"], box)
    annotation.write_text("<annotation><size><width>40</width><height>30</height></size></annotation>")
    with pytest.raises(ValueError, match=f"{stem}.*no <object>"):
        StanfordDogs(root, split="test")[0]
    annotation.write_text("<annotation><object><bndbox><xmin>3")
    with pytest.raises(ValueError, match=f"{stem}.*VOC-style XML"):
        StanfordDogs(root, split="test")[0]
    (root / "test_list.mat").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    with pytest.raises(ValueError, match="test_list.mat"):
        StanfordDogs(root, split="test")
    scipy.io.savemat(root / "test_list.mat", {"file_list": cell(["a/b.jpg"])})
    with pytest.raises(ValueError, match=r"test_list\.mat lacks the variables \['annotation_list', 'labels'\]"):
        StanfordDogs(root, split="test")


def test_dogs_box_beyond_the_image_is_clipped(tmp_path):
    root = make_dogs(tmp_path)
    folder, stem, _, _, _ = DOG_ITEMS[0]
    (root / "Annotation" / folder / stem).write_bytes(voc_xml(stem, "Chihuahua", [(10, 8, W + 5, H + 3)]))
    item = StanfordDogs(root, split="train")[0]
    assert item["boxes"].tolist() == [[10, 8, W, H]]


# ---------------------------------------------------------------- Stanford Cars: more of the real formats

def test_cars_single_image_split_char_matrix_names_and_nested_folders(tmp_path):
    root = make_cars(tmp_path)
    scipy.io.savemat(root / "devkit" / "cars_meta.mat", {"class_names": np.array(CAR_NAMES)})  # blank-padded rows
    (root / "cars_test").rename(root / "cars_test_inner")
    (root / "cars_test").mkdir()
    (root / "cars_test_inner").rename(root / "cars_test" / "cars_test")  # as some mirrors extract it
    test = StanfordCars(root, split="test")
    assert len(test) == 1
    fname, cls, box = CAR_ITEMS["test"][0]
    assert_box_on_object(test[0], box)
    assert test[0]["label"] == CAR_NAMES[cls - 1] and test[0]["id"] == "test_00001"


def test_cars_annos_mat_distribution(tmp_path):
    """car_ims/ + cars_annos.mat (relative_im_path, bbox_*, class, test; class_names) - the single-archive copy."""
    rows = [("car_ims/000001.jpg", 2, 0, (10, 8, 25, 20)), ("car_ims/000002.jpg", 1, 1, (3, 4, 38, 28)),
            ("car_ims/000003.jpg", 1, 0, (20, 10, 35, 25))]
    (tmp_path / "car_ims").mkdir()
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    annotations = np.empty((1, len(rows)), dtype=[(f, object) for f in fields])
    for i, (rel, cls, test, (x1, y1, x2, y2)) in enumerate(rows):
        Image.fromarray(scene([(x1, y1, x2, y2)])).save(tmp_path / rel, quality=95)
        annotations[0, i] = (np.array([rel]), *(np.array([[v]], np.uint16) for v in (x1 + 1, y1 + 1, x2, y2)),
                             np.array([[cls]], np.uint8), np.array([[test]], np.uint8))
    scipy.io.savemat(tmp_path / "cars_annos.mat", {"annotations": annotations, "class_names": cell(CAR_NAMES).T})
    assert [len(open_dataset("cars", tmp_path, split=s)) for s in ("train", "test", "all")] == [2, 1, 3]
    train = open_dataset("cars", tmp_path, split="train")
    assert [item["id"] for item in train] == ["000001", "000003"]
    for item, (_, cls, _, box) in zip(train, [rows[0], rows[2]], strict=True):
        assert_box_on_object(item, box)
        assert item["label"] == CAR_NAMES[cls - 1] and item["caption"] == "a photo of a car"
    (tmp_path / "car_ims" / "000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="000002.jpg"):
        open_dataset("cars", tmp_path, split="test")[0]


def test_cars_wrong_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cars_meta\.mat.*cars_annos\.mat"):
        StanfordCars(tmp_path)
    root = make_cars(tmp_path)
    from numpy.lib.recfunctions import repack_fields

    no_class = repack_fields(annotations_struct(CAR_ITEMS["test"])[["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "fname"]])
    scipy.io.savemat(root / "cars_test_annos_withlabels.mat", {"annotations": no_class})  # as cars_test_annos.mat
    with pytest.raises(ValueError, match=r"cars_test_annos_withlabels\.mat.*no field 'class'"):
        StanfordCars(root, split="test")
    scipy.io.savemat(root / "devkit" / "cars_train_annos.mat", {"boxes": np.zeros((1, 4))})
    with pytest.raises(ValueError, match=r"cars_train_annos\.mat lacks the variables \['annotations'\]"):
        StanfordCars(root, split="train")
    (root / "devkit" / "cars_meta.mat").write_text("not a MATLAB file")
    with pytest.raises(ValueError, match=r"cars_meta\.mat"):
        StanfordCars(root, split="train")


# ---------------------------------------------------------------- Human3.6M: more sources

def test_h36m_v5_mask_files_and_raw_copy_through_open_dataset(tmp_path):
    pytest.importorskip("h5py")
    from foba_core.data.h36m_prepare import MatMasks

    src = tmp_path / "h36m"
    make_h36m_frames_subject(src)
    bb = src / "S9" / "MySegmentsMat" / "ground_truth_bb" / "Walking 1.54138969.mat"
    _, boxes = frames_and_masks(6)
    masks = np.empty((1, len(boxes)), dtype=object)  # the same masks re-saved as MATLAB v5 (H, W) cells
    for i, m in enumerate(boxes):
        masks[0, i] = m.astype(np.uint8)
    scipy.io.savemat(bb, {"Masks": masks})
    with MatMasks(bb) as loaded:
        assert len(loaded) == 6 and np.array_equal(loaded[3], boxes[3])
    data = open_dataset("h36m", src, split="test", size=32)  # a raw copy: the subset is prepared once, beside it
    assert len(data) == 3 and (src / "foba_subset_32px_seed0_0_1000" / "index.csv").is_file()
    for item in data:
        assert item["image"].shape == (3, 32, 32) and item["caption"] == "a photo of a human"
        assert_red_inside(item["image"], item["boxes"][0].tolist())
        assert item["image"][0][item["mask"]].mean() > 0.7
    assert [i["id"] for i in open_dataset("h36m", src, split="test", size=32)] == [i["id"] for i in data]  # reused
    with pytest.raises(FileNotFoundError, match="no Human3.6M train subject.*S1/MySegmentsMat"):
        open_dataset("h36m", src, split="train")


# ---------------------------------------------------------------- open_images

def test_open_images_takes_subsets_of_stored_data_and_sizes_of_generated_data(tmp_path):
    from foba_core.data import open_images

    make_dogs(tmp_path)
    assert len(open_images("dogs", tmp_path, "all", 2)) == 2 and len(open_images("toy", None, "test", 3)) == 3
    with pytest.raises(ValueError, match="--dataset_dir"):
        open_images("dogs", None, "all")
    with pytest.raises(ValueError, match="Did you mean 'dogs'"):
        open_images("dog", tmp_path, "all")


def test_cars_annotations_saved_in_other_struct_shapes(tmp_path):
    """The same devkit files written as a 1-D record array (numpy fromarrays), a cell of 1×1 structs (a list of
    dicts) or one struct of columns: the rows, boxes and classes come out the same."""
    root = make_cars(tmp_path)
    rows = CAR_ITEMS["train"]
    columns = {"bbox_x1": [b[0] + 1 for _, _, b in rows], "bbox_y1": [b[1] + 1 for _, _, b in rows],
               "bbox_x2": [b[2] for _, _, b in rows], "bbox_y2": [b[3] for _, _, b in rows],
               "class": [c for _, c, _ in rows], "fname": [f for f, _, _ in rows]}
    record = np.rec.fromarrays([np.array(v) for v in columns.values()], names=list(columns))
    dicts = [{k: v[i] for k, v in columns.items()} for i in range(len(rows))]
    struct_of_columns = {k: (np.array(v, dtype=object) if k == "fname" else np.array(v)) for k, v in columns.items()}
    for layout in (record, dicts, struct_of_columns):
        scipy.io.savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": layout})
        train = StanfordCars(root, split="train")
        assert [item["id"] for item in train] == ["train_00001", "train_00002"]
        for item, (_, cls, box) in zip(train, rows, strict=True):
            assert_box_on_object(item, box)
            assert item["class_id"] == cls
