"""The corpus: the King James Bible (Debian packages, public domain) or the user's
text, split into training and held-out documents.

``fetch_kjv`` downloads Debian's ``bible-kjv-text`` and ``bible-kjv`` with
``apt-get download`` (no root needed), unpacks them with ``dpkg-deb -x`` and
prints the whole Bible with their ``bible`` program: one verse per line, a blank
line between chapters, i.e. one document per chapter for
``tools/preprocess_data.py``. Offline, the Genesis excerpt shipped in
``examples/data`` is used instead.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from ders_megatron.io.atomic import write_text_atomic
from ders_megatron.pipeline.launch import EXCERPT

KJV_PACKAGES = ("bible-kjv-text", "bible-kjv")


def fetch_kjv(cache: Path, timeout: float = 120) -> Path | None:
    """The King James Bible as text, cached in ``cache``; None when it cannot be fetched."""
    target = cache / "kjv.txt"
    if target.is_file():
        return target
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(["apt-get", "download", *KJV_PACKAGES], cwd=tmp, check=True,
                           capture_output=True, timeout=timeout)
            root = Path(tmp) / "root"
            for deb in Path(tmp).glob("*.deb"):
                subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, capture_output=True)
            text = subprocess.run([str(root / "usr/bin/bible"), "-f", "-p", str(root / "usr/lib"),
                                   "gen1:1-rev22:21"], check=True, capture_output=True, text=True,
                                  timeout=timeout).stdout
        except (OSError, subprocess.SubprocessError):
            return None
    cache.mkdir(parents=True, exist_ok=True)
    write_text_atomic(target, _chapters(text))
    return target


def _chapters(verses: str) -> str:
    """``Ge1:1 In the beginning...`` lines -> verse text, a blank line between chapters."""
    out, previous = [], None
    for line in verses.splitlines():
        ref, _, text = line.partition(" ")
        chapter = ref.split(":")[0]
        if previous is not None and chapter != previous:
            out.append("")
        out.append(text)
        previous = chapter
    return "\n".join(out) + "\n"


def find_text(cache: Path, download: bool) -> Path:
    """The KJV when it can be had (``download``), else the shipped Genesis excerpt."""
    return (fetch_kjv(cache) if download else None) or EXCERPT


def split_heldout(source: Path, out_dir: Path, fraction: float) -> dict:
    """Documents of ``source`` (blank-line separated ``.txt``, or ``.jsonl`` with
    ``text``) into ``train.jsonl`` and ``heldout.jsonl``: every ``round(1/fraction)``-th
    document is held out, spread over the whole text. Returns the counts."""
    from ders_megatron.training.data import read_documents

    docs = list(read_documents(source))
    if len(docs) < 2:
        raise ValueError(f"--text {source} has {len(docs)} document(s); the held-out split needs at "
                         "least 2 (documents are separated by blank lines)")
    every = max(2, min(len(docs), round(1 / fraction)))
    held = set(range(every // 2, len(docs), every))
    train = [d for i, d in enumerate(docs) if i not in held]
    heldout = [docs[i] for i in sorted(held)]
    for name, part in (("heldout", heldout), ("train", train)):  # train last: it marks the step done
        write_text_atomic(out_dir / f"{name}.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in part))
    return {"source": str(source), "documents": len(docs), "train_documents": len(train),
            "heldout_documents": len(heldout), "heldout_every": every}
