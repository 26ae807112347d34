"""Lay the bundled FSDD out as ``audio_folder`` data, both ways a user's own speech data comes.

    python bench/make_fsdd_audio_folder.py --out runs/fsdd_folders

writes
- ``OUT/classes/{train,test}/{zero..nine}/{digit}_{speaker}_{take}.wav``: the original WAV files
  (byte for byte), official split (takes 0-4 test, 2700/300), word labels. Trains like
  ``data.name: fsdd``:
  ``hf-sparse train recipes/fsdd_gru_dense.yaml --set data.name=audio_folder data.path=OUT/classes``
- ``OUT/ctc/{train,test}/*.wav`` + ``metadata.csv`` (``file_name,transcription``): the connected-digit
  utterances of ``data.name: fsdd_digits`` (same seed, same utterances, 16-bit WAV, lossless) with
  their digits spelled out ("three one four"), for CTC on free text:
  ``hf-sparse train recipes/fsdd_folder_ctc_gru.yaml --set data.path=OUT/ctc``
"""

from __future__ import annotations

import argparse
import csv
import tarfile
from pathlib import Path

from hf_sparse.data import BUNDLED_DATA
from hf_sparse.data.audio_io import write_audio
from hf_sparse.data.fsdd import OFFICIAL_TEST_TAKES, load_fsdd_digits, read_fsdd

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write_classes(out: Path) -> int:
    """The original WAVs in train/<word>/ and test/<word>/ (official split)."""
    recs, _, _ = read_fsdd()
    by_file = {r.file: r for r in recs}
    archive = next((BUNDLED_DATA / "fsdd").glob("*.tar.gz"))
    n = 0
    with tarfile.open(archive) as tf:
        for member in tf:
            if not (member.isfile() and member.name in by_file):
                continue
            r = by_file[member.name]
            split = "test" if r.take in OFFICIAL_TEST_TAKES else "train"
            target = out / split / WORDS[r.digit] / Path(member.name).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tf.extractfile(member).read())
            n += 1
    return n


def write_ctc(out: Path, num_train: int, num_test: int, seed: int) -> int:
    """fsdd_digits' utterances as WAVs with spelled-out transcripts, one metadata.csv per split."""
    _, _, rate = read_fsdd()
    dd = load_fsdd_digits(num_train=num_train, num_test=num_test, seed=seed)
    n = 0
    for split, ds in dd.items():
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for i, ex in enumerate(ds.with_format("numpy")):
            name = f"{split}_{i:05d}.wav"
            write_audio(folder / name, ex["audio"], rate)
            rows.append({"file_name": name, "transcription": " ".join(WORDS[int(d)] for d in str(ex["text"]))})
            n += 1
        with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["file_name", "transcription"])
            writer.writeheader()
            writer.writerows(rows)
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/fsdd_folders", help="output folder")
    parser.add_argument("--num-train", type=int, default=3000, help="connected-digit training utterances")
    parser.add_argument("--num-test", type=int, default=500, help="connected-digit test utterances")
    parser.add_argument("--seed", type=int, default=0, help="fsdd_digits' data.seed")
    args = parser.parse_args()
    out = Path(args.out)
    print(f"{write_classes(out / 'classes')} files in {out / 'classes'}")
    print(f"{write_ctc(out / 'ctc', args.num_train, args.num_test, args.seed)} utterances in {out / 'ctc'}")


if __name__ == "__main__":
    main()
