"""Human3.6M: build the paper's subset (random person-centred 256×256 frames) from a local copy, and read it.

:class:`Human36M` (``open_dataset("h36m", root)``) reads a subset prepared by
:func:`foba_core.data.h36m_prepare.prepare_h36m`, whose module docstring describes the source and the
prepared layouts; given the raw copy as ``root`` it prepares the subset once, beside it
(:func:`foba_core.data.h36m_prepare.prepared_index`). ``python -m foba_core.data.h36m prepare`` is the
command line of the preparation.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from foba_core.data._io import RecordDataset, check_split, require_file
from foba_core.data.h36m_prepare import INDEX_COLUMNS, is_raw_copy, prepare_h36m, prepared_index
from foba_core.prompts import object_prompt


class Human36M(RecordDataset):
    """A prepared Human3.6M subset (see :func:`prepare_h36m`) as dataset items with the person's ``box``
    (and ``mask`` where the copy had background-subtraction masks).

    ``root`` is a prepared subset (it holds index.csv) or a raw local copy (``S1/MySegmentsMat/…``), whose
    subset is then prepared once by :func:`prepared_index` (``prepared_dir`` and the other keyword arguments
    are passed to it).
    """

    dataset_name = "Human3.6M subset"
    class_word = "human"  # the object word of y_f = "a photo of a human" (paper Sec. 3)

    def __init__(self, root: str | Path, split: str = "test", prepared_dir: str | Path | None = None, **prepare):
        split = check_split(split)
        root = Path(root)
        if not (root / "index.csv").is_file() and is_raw_copy(root):
            root = prepared_index(root, split, out=prepared_dir, **prepare).parent
        index = require_file(root / "index.csv", "the index of a prepared Human3.6M subset; make it with "
                             f"`python -m foba_core.data.h36m prepare --src <Human3.6M copy> --out {root}` "
                             "(or point root at the copy itself: S1/MySegmentsMat/..., S1/Videos/...)")
        try:
            table = pd.read_csv(index, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            raise ValueError(f"{index} is not a CSV file with the columns {INDEX_COLUMNS} ({err})") from err
        missing = [c for c in INDEX_COLUMNS if c not in table.columns]
        if missing:
            raise ValueError(f"{index} lacks the columns {missing}; expected {INDEX_COLUMNS}")
        for column in ("x1", "y1", "x2", "y2", "frame"):
            bad = ~np.isfinite(pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=np.float64))  # nan or inf
            if bad.any():
                line = int(np.flatnonzero(bad)[0]) + 2  # + the header line, 1-based
                raise ValueError(f"{index}, line {line}: {column} = {table[column][bad].iloc[0]!r} is not a finite "
                                 "number")
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
                "subject": row.subject, "action": row.action, "camera": row.camera, "frame": int(float(row.frame)),
            })
        super().__init__(records, caption=object_prompt(self.class_word))


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
