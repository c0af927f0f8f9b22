"""Human3.6M preparation: the paper's subset (random person-centred 256×256 frames) drawn from a local copy.

The paper (Sec. 4) takes "a subset of 6000 randomly chosen images centred around the human and
cropped to 256×256 pixels from the training dataset". :func:`prepare_h36m` draws such frames from a
local copy and writes a small folder that :class:`foba_core.data.h36m.Human36M` reads
(``python -m foba_core.data.h36m prepare`` is its command line).

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
``h5py`` (files re-saved as MATLAB v5 are read with scipy), decoding videos needs ``av`` (PyAV); the
prepared subset needs neither. :func:`prepared_index` prepares the subset of a raw copy once, beside it.

Prepared subset (``out``)::

    index.csv        id, subject, action, camera, frame (0-based), split, x1, y1, x2, y2 (person box in
                     crop pixels, exclusive end), image, mask (paths relative to out; mask may be empty)
    images/<id>.jpg  the crops;  masks/<id>.png  the background-subtraction masks (0/255) if available
"""

from __future__ import annotations

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

from foba_core.data._io import require_file
from foba_core.io import atomic_write

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
    """The per-frame masks of a Human3.6M mask file: ``len()`` frames, ``[i]`` a (H, W) bool mask.

    Human3.6M ships MATLAB v7.3 (HDF5) files with a cell array ``Masks`` (read with ``h5py``: each cell is a
    reference to a column-major (W, H) array); a copy re-saved as MATLAB v5 (``scipy.io.loadmat``: a cell of
    (H, W) arrays) is read as well.
    """

    def __init__(self, path: Path):
        self.path = require_file(path, "a Human3.6M mask file (MATLAB v7.3, cell array 'Masks': one mask per frame)")
        self.file, self.cells = None, None
        with open(path, "rb") as f:
            head = f.read(128)
        if head.startswith(b"MATLAB 5.0 MAT-file"):  # the v5 header; v7.3 files say "MATLAB 7.3 MAT-file"
            self._open_v5(path)
        else:
            self._open_hdf5(path)

    def _open_hdf5(self, path: Path) -> None:
        h5py = _require_module("h5py", "reading Human3.6M's MATLAB v7.3 mask files")
        try:
            self.file = h5py.File(path, "r")
        except OSError as err:
            raise ValueError(f"{path} is not a MATLAB v7.3 (HDF5) file as Human3.6M distributes them: {err}") from err
        if "Masks" not in self.file:
            self.file.close()
            raise ValueError(f"{path} has no 'Masks' cell array; expected one mask per frame")
        self.refs = np.asarray(self.file["Masks"]).ravel()  # MATLAB 1×N cell -> HDF5 (N, 1) object refs

    def _open_v5(self, path: Path) -> None:
        import scipy.io

        try:
            mat = scipy.io.loadmat(path)
        except Exception as err:  # noqa: BLE001 - scipy raises several types on a broken file
            raise ValueError(f"{path} is neither a MATLAB v7.3 (HDF5) nor a v5 file ({err}); expected a Human3.6M "
                             "mask file with a cell array 'Masks'") from err
        if "Masks" not in mat:
            raise ValueError(f"{path} has no 'Masks' cell array; expected one mask per frame")
        cells = np.asarray(mat["Masks"])
        self.cells = list(cells.ravel()) if cells.dtype == object else [cells]

    def __len__(self) -> int:
        return len(self.refs) if self.cells is None else len(self.cells)

    def __getitem__(self, frame: int) -> np.ndarray:
        if self.cells is not None:
            return np.asarray(self.cells[frame]) > 0
        return np.asarray(self.file[self.refs[frame]]).T > 0  # HDF5 holds MATLAB's column-major (W, H)

    def __enter__(self) -> "MatMasks":
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
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


def is_raw_copy(root: str | Path) -> bool:
    """Whether ``root`` looks like a local Human3.6M copy (some ``S<n>/MySegmentsMat``) rather than a prepared subset."""
    root = Path(root)
    return any((root / subject / "MySegmentsMat").is_dir() for subjects in SUBJECTS.values() for subject in subjects)


def prepared_index(src: str | Path, split: str, out: str | Path | None = None, n_frames: int = 6000,
                   n_test_frames: int = 1000, size: int = 256, seed: int = 0,
                   metadata: str | Path | None = None) -> Path:
    """Return the index.csv of the subset prepared from the raw copy ``src``, preparing it on first use.

    The subset goes to ``out`` (default ``src/foba_subset_<size>px_seed<seed>_<n_frames>_<n_test_frames>``) and is
    reused when its index.csv exists. Only the parts whose subjects the copy holds are drawn (training subjects
    S1, S5-S8; test subjects S9, S11); asking for a split whose subjects are absent is an error.
    """
    src = Path(src)
    present = {part: [s for s in subjects if (src / s / "MySegmentsMat").is_dir()] for part, subjects in SUBJECTS.items()}
    needed = ("train", "test") if split == "all" else (split,)
    absent = [part for part in needed if not present[part]]
    if absent:
        part = absent[0]
        raise FileNotFoundError(
            f"no Human3.6M {part} subject under {src}: expected {src}/{SUBJECTS[part][0]}/MySegmentsMat/ground_truth_bb/"
            f"<Action>.<camera>.mat (subjects {', '.join(SUBJECTS[part])}) with their videos or frames")
    n_train = n_frames if present["train"] else 0
    n_test = n_test_frames if present["test"] else 0
    out = Path(out) if out is not None else src / f"foba_subset_{size}px_seed{seed}_{n_train}_{n_test}"
    index = out / "index.csv"
    if index.is_file():
        return index
    logger.info("Human3.6M: preparing the subset of %s in %s (once)", src, out)
    try:
        return prepare_h36m(src, out, n_frames=n_train, size=size, seed=seed, n_test_frames=n_test, metadata=metadata)
    except PermissionError as err:
        raise PermissionError(f"cannot write the prepared Human3.6M subset to {out} ({err}): pass prepared_dir=<a "
                              f"writable folder>, or run `python -m foba_core.data.h36m prepare --src {src} --out DIR` "
                              "and open DIR") from err
