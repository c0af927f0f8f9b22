"""Human3.6M: build the paper's subset (random person-centred 256×256 frames) from a local copy, and read it.

The paper (Sec. 4) takes "a subset of 6000 randomly chosen images centred around the human and
cropped to 256×256 pixels from the training dataset". :func:`prepare_h36m` draws such frames from a
local copy and writes a small folder that :class:`Human36M` reads.

Source layout, as the per-subject archives of the official site extract (``S1`` … ``S11``)::

    S1/Videos/<Action>.<camera>.mp4                        e.g. "Walking 1.54138969.mp4"
    S1/MySegmentsMat/ground_truth_bb/<Action>.<camera>.mat   MATLAB v7.3 (HDF5): 'Masks', a cell array
                                                            with one mask per frame, 1 inside the
                                                            person's bounding box
    S1/MySegmentsMat/ground_truth_bs/<Action>.<camera>.mat   optional, same format: the person's
                                                            background-subtraction mask per frame

Instead of a video, frames already extracted by the h36m-fetch scripts are read from
``S1/<ActionName>-<subaction>/imageSequence/<camera>/img_000001.jpg`` (1-based frame numbers); their
folder names map to the file names above through the ``metadata.xml`` of the Human3.6M software
(shipped with h36m-fetch), looked for at ``<src>/metadata.xml`` unless given.

Training subjects are S1, S5, S6, S7, S8; test subjects S9, S11. Reading the .mat files needs
``h5py``, decoding videos needs ``av`` (PyAV); the prepared subset needs neither.

Prepared subset (``out``)::

    index.csv        id, subject, action, camera, frame (0-based), split, x1, y1, x2, y2 (person box in
                     crop pixels, exclusive end), image, mask (paths relative to out; mask may be empty)
    images/<id>.jpg  the crops;  masks/<id>.png  the background-subtraction masks (0/255) if available
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import re
import xml.etree.ElementTree as ET
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
from PIL import Image

from foba_core.data._io import RecordDataset, check_split, require_file
from foba_core.io import atomic_write
from foba_core.toy.world import object_prompt

logger = logging.getLogger(__name__)

SUBJECTS = {"train": ("S1", "S5", "S6", "S7", "S8"), "test": ("S9", "S11")}
# Crop side / longer side of the person box. The authors' Human3.6M loader crops 200 * (box height / 170)
# around the box centre; the longer side keeps people who lie or stretch sideways inside the crop.
CROP_SCALE = 200 / 170
INDEX_COLUMNS = ["id", "subject", "action", "camera", "frame", "split", "x1", "y1", "x2", "y2", "image", "mask"]
_FRAME_FILE = re.compile(r"img_(\d+)\.jpg$")


def _require_module(name: str, purpose: str):
    """Import an optional dependency or explain how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(f"{purpose} needs the '{name}' package: pip install {name}") from err


class MatMasks:
    """The per-frame masks of a Human3.6M MATLAB v7.3 file: ``len()`` frames, ``[i]`` a (H, W) bool mask."""

    def __init__(self, path: Path):
        h5py = _require_module("h5py", "reading Human3.6M's MATLAB v7.3 mask files")
        self.path = require_file(path, "a Human3.6M MATLAB v7.3 mask file ('Masks': one mask per frame)")
        try:
            self.file = h5py.File(path, "r")
        except OSError as err:
            raise ValueError(f"{path} is not a MATLAB v7.3 (HDF5) file as Human3.6M distributes them: {err}") from err
        if "Masks" not in self.file:
            self.file.close()
            raise ValueError(f"{path} has no 'Masks' cell array; expected one mask per frame")
        self.refs = np.asarray(self.file["Masks"]).ravel()  # MATLAB 1×N cell -> HDF5 (N, 1) object refs

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, frame: int) -> np.ndarray:
        return np.asarray(self.file[self.refs[frame]]).T > 0  # HDF5 holds MATLAB's column-major (W, H)

    def __enter__(self) -> "MatMasks":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def read_fetch_metadata(path: Path) -> dict[tuple[str, str], str]:
    """Return {(subject, file prefix): h36m-fetch frame folder} from the Human3.6M software's metadata.xml."""
    require_file(path, "the Human3.6M metadata.xml (mapping of sequence files to actions; shipped with h36m-fetch)")
    root = ET.parse(path).getroot()
    mapping, names = root.find("mapping"), root.find("actionnames")
    if mapping is None or names is None:
        raise ValueError(f"{path} lacks <mapping> or <actionnames>; expected the Human3.6M software's metadata.xml")
    rows = [[td.text or "" for td in tr] for tr in mapping]
    subjects, action_names = rows[0][2:], [e.text for e in names]
    folders = {}
    for row in rows[1:]:
        if not row[0].isdigit():  # the (action, subaction) rows end where the per-subject tables begin
            break
        action, subaction = int(row[0]), row[1]
        for subject, prefix in zip(subjects, row[2:], strict=False):
            folders[(subject, prefix)] = f"{action_names[action - 1]}-{subaction}"
    return folders


@dataclass
class _Sequence:
    subject: str
    split: str
    name: str  # "<Action>.<camera>", the stem shared by the video and the .mat files
    boxes_file: Path
    masks_file: Path | None
    video: Path | None
    frames_dir: Path | None
    frames: np.ndarray  # candidate 0-based frame indices

    @property
    def action(self) -> str:
        return self.name.rpartition(".")[0]

    @property
    def camera(self) -> str:
        return self.name.rpartition(".")[2]


def _video_frame_count(path: Path) -> int:
    """Frames in a video according to its container, 0 when the container does not say."""
    av = _require_module("av", "decoding Human3.6M videos")
    with av.open(str(path)) as container:
        return int(container.streams.video[0].frames)


def _find_sequences(src: Path, split: str, folders: dict | None) -> list[_Sequence]:
    """All sequences of the split's subjects that have person boxes and frames (a video or extracted JPGs)."""
    sequences, frameless = [], []
    for subject in SUBJECTS[split]:
        segments = src / subject / "MySegmentsMat"
        for boxes_file in sorted((segments / "ground_truth_bb").glob("*.mat")):
            name = boxes_file.stem
            action, _, camera = name.rpartition(".")
            video = src / subject / "Videos" / f"{name}.mp4"
            folder = folders.get((subject, action)) if folders else None
            frames_dir = src / subject / folder / "imageSequence" / camera if folder else None
            with MatMasks(boxes_file) as masks:
                n_masks = len(masks)
            if video.is_file():
                frames, frames_dir = np.arange(min(n_masks, _video_frame_count(video) or n_masks)), None
            elif frames_dir is not None and frames_dir.is_dir():
                found = [int(m.group(1)) - 1 for p in frames_dir.iterdir() if (m := _FRAME_FILE.match(p.name))]
                frames, video = np.array(sorted(f for f in found if f < n_masks)), None
            else:
                frameless.append(f"{subject}/{name}")
                continue
            bs = segments / "ground_truth_bs" / boxes_file.name
            sequences.append(_Sequence(subject, split, name, boxes_file, bs if bs.is_file() else None,
                                       video, frames_dir, frames.astype(np.int64)))
    if frameless:
        logger.warning("Human3.6M: %d sequences have boxes but neither a video nor extracted frames, skipped: %s",
                       len(frameless), ", ".join(frameless[:5]) + (" …" if len(frameless) > 5 else ""))
    return sequences


def _read_frames(seq: _Sequence, frames: list[int]) -> Iterator[tuple[int, Image.Image]]:
    """Yield (frame, RGB image) for the requested frames, in increasing order, that the source holds."""
    if seq.video is None:
        for frame in frames:
            path = seq.frames_dir / f"img_{frame + 1:06d}.jpg"
            with Image.open(path) as im:
                yield frame, im.convert("RGB")
        return
    av = _require_module("av", "decoding Human3.6M videos")
    wanted, last = set(frames), max(frames)
    with av.open(str(seq.video)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, decoded in enumerate(container.decode(stream)):  # sequential: mp4 seeking is keyframe-coarse
            if index in wanted:
                yield index, decoded.to_image()
            if index >= last:
                break


def person_crop(image: Image.Image, box: tuple[int, int, int, int], size: int,
                scale: float = CROP_SCALE) -> tuple[Image.Image, tuple[int, int, int, int], tuple[int, int, int, int]]:
    """Return the square crop centred on the person box (side ``scale`` × longer box side) resized to ``size``,
    the crop window in the frame (left, top, right, bottom; may reach outside, padded black) and the box in
    crop pixels (x1, y1, x2, y2, exclusive end)."""
    x1, y1, x2, y2 = box
    side = max(1, round(scale * max(x2 - x1, y2 - y1)))
    left, top = round((x1 + x2 - side) / 2), round((y1 + y2 - side) / 2)
    window = (left, top, left + side, top + side)
    crop = image.crop(window).resize((size, size), Image.LANCZOS)
    f = size / side
    crop_box = (max(0, math.floor((x1 - left) * f)), max(0, math.floor((y1 - top) * f)),
                min(size, math.ceil((x2 - left) * f)), min(size, math.ceil((y2 - top) * f)))
    return crop, window, crop_box


def _sequence_id(seq: _Sequence, frame: int) -> str:
    return f"{seq.subject}_{seq.action.replace(' ', '-')}_{seq.camera}_{frame:06d}"


def _extract(seq: _Sequence, frames: list[int], out: Path, size: int) -> list[dict]:
    """Crop the requested frames of one sequence around its person box; return their index rows."""
    rows = []
    with MatMasks(seq.boxes_file) as boxes, (MatMasks(seq.masks_file) if seq.masks_file else nullcontext()) as fg:
        for frame, image in _read_frames(seq, sorted(frames)):
            ys, xs = np.nonzero(boxes[frame])
            if len(xs) == 0:  # no person box in this frame: let another frame take its place
                continue
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            crop, window, crop_box = person_crop(image, box, size)
            uid = _sequence_id(seq, frame)
            atomic_write(out / "images" / f"{uid}.jpg", lambda tmp, im=crop: im.save(tmp, format="JPEG", quality=95))
            mask_rel = ""
            if fg is not None and frame < len(fg):
                person = Image.fromarray(fg[frame].astype(np.uint8) * 255)
                person = person.crop(window).resize((size, size), Image.NEAREST)  # nearest: masks stay binary
                mask_rel = f"masks/{uid}.png"
                atomic_write(out / mask_rel, lambda tmp, im=person: im.save(tmp, format="PNG"))
            rows.append({"id": uid, "subject": seq.subject, "action": seq.action, "camera": seq.camera,
                         "frame": frame, "split": seq.split, "x1": crop_box[0], "y1": crop_box[1],
                         "x2": crop_box[2], "y2": crop_box[3], "image": f"images/{uid}.jpg", "mask": mask_rel})
    return rows


def _sample(sequences: list[_Sequence], n: int, rng: np.random.Generator, out: Path, size: int) -> list[dict]:
    """Draw ``n`` frames uniformly without replacement over all candidate frames; replace unusable ones."""
    offsets = np.cumsum([0] + [len(s.frames) for s in sequences])
    order = rng.permutation(offsets[-1])
    rows, pos = [], 0
    while len(rows) < n and pos < len(order):
        batch = order[pos: pos + n - len(rows)]
        pos += len(batch)
        owner = np.searchsorted(offsets, batch, side="right") - 1
        for done, s in enumerate(np.unique(owner), start=1):  # one pass over each video for all of its drawn frames
            seq = sequences[s]
            rows += _extract(seq, seq.frames[batch[owner == s] - offsets[s]].tolist(), out, size)
            if done % 25 == 0:
                logger.info("Human3.6M %s: %d / %d frames", seq.split, len(rows), n)
    if len(rows) < n:
        logger.warning("Human3.6M %s: only %d usable frames, fewer than the %d asked for", sequences[0].split, len(rows), n)
    return rows


def prepare_h36m(src: str | Path, out: str | Path, n_frames: int = 6000, size: int = 256, seed: int = 0,
                 n_test_frames: int = 1000, metadata: str | Path | None = None) -> Path:
    """Return the index.csv of a prepared subset: ``n_frames`` random training frames (and ``n_test_frames``
    from the test subjects) cropped to ``size``×``size`` around the person, as in the paper's Human3.6M setup."""
    src, out = Path(src), Path(out)
    if n_frames < 0 or n_test_frames < 0 or size < 1:
        raise ValueError(f"n_frames ({n_frames}) and n_test_frames ({n_test_frames}) must be >= 0 and size ({size}) >= 1")
    meta_path = Path(metadata) if metadata is not None else src / "metadata.xml"
    folders = read_fetch_metadata(meta_path) if metadata is not None or meta_path.is_file() else None
    rows = []
    for split_index, (split, n) in enumerate((("train", n_frames), ("test", n_test_frames))):
        if n == 0:
            continue
        sequences = _find_sequences(src, split, folders)
        if not sequences:
            first = SUBJECTS[split][0]
            raise FileNotFoundError(
                f"no Human3.6M {split} sequences under {src} for subjects {', '.join(SUBJECTS[split])}: expected "
                f"{src}/{first}/MySegmentsMat/ground_truth_bb/<Action>.<camera>.mat with "
                f"{src}/{first}/Videos/<Action>.<camera>.mp4 "
                "(or h36m-fetch frames plus metadata.xml)" + ("; pass n_test_frames=0 to prepare training frames only"
                                                            if split == "test" else ""))
        rng = np.random.default_rng(np.random.SeedSequence([seed, split_index]))
        rows += _sample(sequences, n, rng, out, size)
    table = pd.DataFrame(rows, columns=INDEX_COLUMNS).sort_values(["split", "id"], kind="stable")
    index = out / "index.csv"
    atomic_write(index, lambda tmp: table.to_csv(tmp, index=False))
    return index


class Human36M(RecordDataset):
    """A prepared Human3.6M subset (see :func:`prepare_h36m`) as dataset items with the person's ``box``
    (and ``mask`` where the copy had background-subtraction masks)."""

    dataset_name = "Human3.6M subset"

    def __init__(self, root: str | Path, split: str = "test"):
        split = check_split(split)
        root = Path(root)
        index = require_file(root / "index.csv", "the index of a prepared Human3.6M subset; make it with "
                             f"`python -m foba_core.data.h36m prepare --src <Human3.6M copy> --out {root}`")
        table = pd.read_csv(index, dtype=str, keep_default_na=False)
        missing = [c for c in INDEX_COLUMNS if c not in table.columns]
        if missing:
            raise ValueError(f"{index} lacks the columns {missing}; expected {INDEX_COLUMNS}")
        if split != "all":
            table = table[table["split"] == split]
        records = []
        for row in table.itertuples(index=False):
            records.append({
                "path": root / row.image,
                "id": row.id,
                "label": re.sub(r"[ _-]?\d+$", "", row.action),  # action without its subaction number
                "boxes": np.array([[float(row.x1), float(row.y1), float(row.x2), float(row.y2)]]),
                "mask_path": root / row.mask if row.mask else None,
                "subject": row.subject, "action": row.action, "camera": row.camera, "frame": int(row.frame),
            })
        super().__init__(records, caption=object_prompt("human"))


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m foba_core.data.h36m prepare --src DIR --out DIR [--n_frames N] [--seed S]``."""
    parser = argparse.ArgumentParser(prog="python -m foba_core.data.h36m", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="crop a random person-centred subset from a local Human3.6M copy")
    prepare.add_argument("--src", required=True, help="folder holding S1 … S11 as extracted from the official archives")
    prepare.add_argument("--out", required=True, help="folder for index.csv, images/ and masks/")
    prepare.add_argument("--n_frames", type=int, default=6000, help="training frames (S1, S5-S8); paper: 6000")
    prepare.add_argument("--n_test_frames", type=int, default=1000, help="test frames (S9, S11); 0 to skip")
    prepare.add_argument("--size", type=int, default=256, help="crop side in pixels; paper: 256")
    prepare.add_argument("--seed", type=int, default=0)
    prepare.add_argument("--metadata", default=None,
                         help="metadata.xml mapping h36m-fetch frame folders (default: <src>/metadata.xml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    index = prepare_h36m(args.src, args.out, n_frames=args.n_frames, size=args.size, seed=args.seed,
                         n_test_frames=args.n_test_frames, metadata=args.metadata)
    print(f"wrote {index}")


if __name__ == "__main__":
    main()
