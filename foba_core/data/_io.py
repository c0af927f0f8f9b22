"""Shared pieces of the dataset readers: the record-backed dataset, image/mask decoding, MATLAB helpers.

A reader parses its dataset's index files into *records* (one dict per image) and hands them to
:class:`RecordDataset`, which loads pixels lazily and builds the item dictionaries of the project:
``image`` (3, H, W) float in [0, 1] at original resolution, ``mask`` (H, W) bool where the dataset
has masks, ``boxes`` (N, 4) int64 ``x1 y1 x2 y2`` with exclusive end, ``caption``, ``id``, ``label``,
``path``, plus the record's extra keys.

Orientation: the annotations of CUB, Stanford Dogs and Stanford Cars were drawn on the pixels as
stored in the files (MATLAB ``imread`` and the annotation tools of the time ignore the EXIF
orientation tag), so images are returned as stored and their tag is ignored — with one exception:
when the annotation records the image size it was made on (a Dogs XML ``<size>``, a CUB mask) and
that size is the one of the EXIF-rotated image only (a 90° tag, 5-8), the image is rotated by its tag
so that boxes and masks stay on the object.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

SPLITS = ("train", "test", "all")
EXIF_ORIENTATION = 0x0112  # the EXIF tag; values 5-8 swap width and height


def check_option(value: str, options: tuple[str, ...], what: str) -> str:
    """Return ``value`` if it is one of ``options``; raise a ValueError listing them (with a did-you-mean)."""
    if value in options:
        return value
    close = difflib.get_close_matches(str(value), options, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"{what} {value!r} is not one of {', '.join(options)}.{hint}")


def check_split(split: str) -> str:
    """Return ``split`` if it is one of train, test, all; raise a did-you-mean error otherwise."""
    return check_option(split, SPLITS, "split")


def require_file(path: Path, what: str) -> Path:
    """Return ``path`` if it is a file; otherwise raise FileNotFoundError naming it and what it should hold."""
    path = Path(path)
    if not path.is_file():
        kind = " (it is a folder)" if path.is_dir() else ""
        raise FileNotFoundError(f"missing {path}{kind}: expected {what}")
    return path


# ---------------------------------------------------------------- pixels

def _uint8(im: Image.Image) -> Image.Image:
    """``im`` with 16-bit / 32-bit integer or float grey scaled to 8 bits (PIL's own convert clips them at 255)."""
    if im.mode not in ("I", "F") and not im.mode.startswith("I;16"):
        return im
    a = np.asarray(im).astype(np.float64)
    if im.mode == "F":
        scale = 1.0 if a.size and np.nanmax(a) <= 1.0 else 255.0
    else:  # 16-bit, or 32-bit holding 8- or 16-bit values
        scale = 65535.0 if a.size and a.max() > 255 else 255.0
    return Image.fromarray(np.clip(np.nan_to_num(a) / scale * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")


def open_image(path: Path, what: str) -> Image.Image:
    """Return the decoded image at ``path`` (pixels loaded); errors name the file and what it should be."""
    require_file(path, what)
    try:
        with Image.open(path) as im:
            im.load()
            return im
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"{path}: cannot decode {what} ({err}); expected an image file (JPEG or PNG)") from err


def exif_orientation(im: Image.Image) -> int:
    """Return the EXIF orientation tag of ``im`` (1 when absent or unreadable)."""
    try:
        return int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except Exception:  # a broken EXIF block is no reason to fail reading pixels
        return 1


def orient_to(im: Image.Image, size: tuple[int, int] | None) -> Image.Image:
    """Return ``im`` rotated by its EXIF tag when ``size`` (width, height of the annotated image) is the rotated size
    and not the stored one; otherwise ``im`` as stored (see the module docstring)."""
    if size is None or tuple(size) == im.size or exif_orientation(im) not in (5, 6, 7, 8):
        return im
    if tuple(size) == (im.height, im.width):
        return ImageOps.exif_transpose(im)
    return im


def to_tensor(im: Image.Image) -> torch.Tensor:
    """Return ``im`` as a (3, H, W) float tensor in [0, 1]; grey, grey + alpha, palette, CMYK, RGBA, 16-bit become RGB."""
    arr = np.array(_uint8(im).convert("RGB"), dtype=np.uint8)  # (H, W, 3), a writable copy
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


def mask_array(im: Image.Image) -> np.ndarray:
    """Return a mask image as (H, W) uint8 grey values; grey + alpha, palette and RGB masks drop to their grey."""
    return np.asarray(_uint8(im).convert("L"), dtype=np.uint8)


def finite_boxes(boxes, where: str) -> np.ndarray:
    """Return ``boxes`` as float (N, 4); a box with an inf or nan coordinate raises a ValueError naming ``where``
    (the annotation file or item) and the box."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    bad = np.flatnonzero(~np.isfinite(boxes).all(axis=1))
    if bad.size:
        raise ValueError(f"{where}: box {bad[0] + 1} of {len(boxes)} {boxes[bad[0]].tolist()} has a coordinate that "
                         "is not finite (inf or nan); expected pixel coordinates")
    return boxes


def boxes_to_pixels(boxes: np.ndarray, height: int, width: int) -> torch.Tensor:
    """Return float boxes (N, 4) as int64 pixel boxes: x1, y1 floored, x2, y2 ceiled, clipped to the image."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = np.empty(boxes.shape, dtype=np.int64)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        out[i] = (min(max(math.floor(x1), 0), width), min(max(math.floor(y1), 0), height),
                  min(max(math.ceil(x2), 0), width), min(max(math.ceil(y2), 0), height))
    return torch.from_numpy(out)


# ---------------------------------------------------------------- MATLAB v5 files (scipy.io.loadmat)

def load_mat(path: Path, what: str, variables: tuple[str, ...]) -> dict:
    """Return the variables of a MATLAB v5 file (scipy.io.loadmat, unsqueezed); errors name the file."""
    import scipy.io

    require_file(path, what)
    try:
        mat = scipy.io.loadmat(path)
    except NotImplementedError as err:  # scipy says so for v7.3 (HDF5) files
        raise ValueError(f"{path} is a MATLAB v7.3 (HDF5) file; expected {what} as the dataset distributes it "
                         "(MATLAB v5, readable by scipy.io.loadmat)") from err
    except Exception as err:  # noqa: BLE001 - scipy raises ValueError, TypeError, OSError... on broken files
        raise ValueError(f"{path} is not a readable MATLAB file ({err}); expected {what}") from err
    missing = [v for v in variables if v not in mat]
    if missing:
        present = sorted(k for k in mat if not k.startswith("__"))
        raise ValueError(f"{path} lacks the variables {missing} (it has {present}); expected {what}")
    return mat


def mat_string(value) -> str:
    """Return the one string inside a MATLAB value as loaded by scipy: a str, a char array, or cells wrapping one."""
    while True:
        if isinstance(value, (str, np.str_)):
            return str(value).strip()
        if isinstance(value, bytes):
            return value.decode().strip()
        a = np.asarray(value)
        if a.dtype.kind == "U":
            return "".join(a.ravel().tolist()).strip() if a.size != 1 else str(a.ravel()[0]).strip()
        if a.dtype == object and a.size == 1:
            value = a.ravel()[0]
            continue
        raise ValueError(f"expected one string, got an array of shape {a.shape} and dtype {a.dtype}")


def mat_strings(value) -> list[str]:
    """Return the strings of a MATLAB cell array (any nesting) or char matrix (rows, trailing blanks stripped)."""
    a = np.asarray(value)
    if a.dtype.kind == "U":
        return [str(s).strip() for s in a.ravel()]
    if a.dtype == object:
        return [mat_string(v) for v in a.ravel()]
    raise ValueError(f"expected a cell array of strings or a char matrix, got dtype {a.dtype}")


def mat_number(value) -> float:
    """Return the one number inside a MATLAB value (a scalar, a 1×1 matrix, or cells wrapping one)."""
    a = np.asarray(value)
    while a.dtype == object and a.size == 1:
        a = np.asarray(a.ravel()[0])
    if a.size != 1 or a.dtype.kind not in "biuf":
        raise ValueError(f"expected one number, got an array of shape {a.shape} and dtype {a.dtype}")
    return float(a.ravel()[0])


def mat_numbers(value) -> np.ndarray:
    """Return the numbers of a MATLAB numeric vector or cell array of scalars as a flat float array."""
    a = np.asarray(value)
    if a.dtype == object:
        return np.array([mat_number(v) for v in a.ravel()], dtype=np.float64)
    if a.dtype.kind not in "biuf":
        raise ValueError(f"expected numbers, got dtype {a.dtype}")
    return a.astype(np.float64).ravel()


def mat_struct_rows(value, fields: tuple[str, ...], path: Path, variable: str) -> list[dict]:
    """Return the elements of a MATLAB struct array as dicts of the raw field values; errors name the file.

    The distributed layout is a 1×N struct array. A cell array of 1×1 structs and a single struct whose
    fields are all vectors of one length N (one column per field) are read as N rows too.
    """
    a = np.asarray(value)
    if a.dtype == object and a.size and all(np.asarray(e).dtype.names for e in a.ravel()):
        elements = [np.asarray(e) for e in a.ravel()]  # a cell array of structs
        names = tuple(dict.fromkeys(n for e in elements for n in e.dtype.names))
        rows = [{f: e[f] for f in e.dtype.names} for element in elements for e in element.ravel()]
    else:
        names = a.dtype.names or ()
        rows = [{f: element[f] for f in names} for element in a.ravel()]
    missing = [f for f in fields if f not in names]
    if missing:
        raise ValueError(f"{path}: '{variable}' lacks the fields {missing} (it has {list(names)}); "
                         f"expected a struct array with {list(fields)}")
    if len(rows) == 1:  # a struct of columns?
        columns = {f: np.asarray(rows[0][f]) for f in names}
        lengths = {f: (c.size if c.dtype.kind != "U" else len(mat_strings(c))) for f, c in columns.items()}
        n = lengths[fields[0]]
        if n > 1 and all(lengths[f] == n for f in fields):
            flat = {f: (mat_strings(c) if c.dtype.kind == "U" or (c.dtype == object and _holds_strings(c))
                        else list(c.ravel())) for f, c in columns.items() if lengths[f] == n}
            return [{f: values[i] for f, values in flat.items()} for i in range(n)]
    return rows


def _holds_strings(a: np.ndarray) -> bool:
    """Whether an object array's elements are strings (char arrays, possibly wrapped in cells)."""
    try:
        mat_strings(a)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------- the dataset

class RecordDataset(torch.utils.data.Dataset):
    """A sized sequence of dataset items built lazily from parsed index records.

    Each record is a dict with ``path`` (image file), ``id``, ``label``, optional ``boxes`` (float
    (N, 4), 0-based, exclusive end), optional ``mask_path``, and any extra keys, which are copied
    into the item. Subclasses may override :meth:`record_annotation` to parse boxes lazily.
    """

    dataset_name = "dataset"
    _private = ("path", "boxes", "mask_path")

    def __init__(self, records: list[dict], caption: str, mask_threshold: int = 127):
        self.records = records
        self.caption = caption
        self.mask_threshold = int(mask_threshold)

    def __len__(self) -> int:
        return len(self.records)

    def record_annotation(self, record: dict) -> tuple[np.ndarray | None, tuple[int, int] | None]:
        """Return the record's boxes as float (N, 4) ``x1 y1 x2 y2`` (0-based, exclusive end) or None, and the
        (width, height) of the image the annotation was made on, when the annotation says so (else None)."""
        return record.get("boxes"), None

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a {self.dataset_name} split of {len(self)} items")
        record = self.records[index]
        im = open_image(record["path"], f"a {self.dataset_name} image")
        boxes, annotated_size = self.record_annotation(record)
        mask = None
        if record.get("mask_path") is not None:
            mask_im = open_image(record["mask_path"], f"a {self.dataset_name} mask")
            mask = torch.from_numpy(mask_array(mask_im) > self.mask_threshold)
            annotated_size = annotated_size or mask_im.size
        im = orient_to(im, annotated_size)
        image = to_tensor(im)
        _, height, width = image.shape
        item = {key: value for key, value in record.items() if key not in self._private}
        item.update(image=image, caption=self.caption, path=str(record["path"]))
        if boxes is not None:
            item["boxes"] = boxes_to_pixels(boxes, height, width)
        if mask is not None:
            if tuple(mask.shape) != (height, width):
                raise ValueError(f"mask {record['mask_path']} is {tuple(mask.shape)} (H, W) but image {record['path']} "
                                 f"is {(height, width)}: the mask must match its image pixel for pixel")
            item["mask"] = mask
        return item
