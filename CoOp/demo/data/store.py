"""Writing a dataset folder: PNGs, split files, SHA256SUMS + manifest, verification, atomic install."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from dassl.utils.tools import atomic_write_json, atomic_write_text, sha256_file

UNLISTED = ("manifest.json", "SHA256SUMS")


def save_png(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "RGB").save(path, format="PNG", compress_level=6)


def write_json(obj: Any, path: Path) -> None:
    atomic_write_json(str(path), obj)


def read_manifest(folder: Path) -> Optional[dict]:
    try:
        return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_sums(folder: Path) -> tuple[str, str, int]:
    """Write SHA256SUMS (sha256sum format) for every file below folder except the manifest and the sums
    file; return (sha256 of SHA256SUMS, combined digest of the image lines, number of images)."""
    lines, img_lines = [], []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if not p.is_file() or rel in UNLISTED:
            continue
        line = f"{sha256_file(str(p))}  {rel}\n"
        lines.append(line)
        if rel.startswith("images/"):
            img_lines.append(line)
    atomic_write_text(str(folder / "SHA256SUMS"), "".join(lines))
    images_digest = hashlib.sha256("".join(img_lines).encode()).hexdigest()
    return sha256_file(str(folder / "SHA256SUMS")), images_digest, len(img_lines)


def verify_folder(folder: Path) -> bool:
    """True when folder/SHA256SUMS matches the manifest and every listed file (and no other file)."""
    folder = Path(folder)
    manifest, sums_p = read_manifest(folder), folder / "SHA256SUMS"
    if manifest is None or not sums_p.is_file():
        return False
    if manifest.get("sha256sums_sha256") != sha256_file(str(sums_p)):
        return False
    listed = dict(reversed(line.split("  ", 1)) for line in sums_p.read_text(encoding="utf-8").splitlines())
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - set(UNLISTED)
    if present != set(listed):
        return False
    return all(sha256_file(str(folder / rel)) == digest for rel, digest in listed.items())


def manifest_matches(folder: Path, params: dict) -> bool:
    """The folder was built with these parameters and is intact."""
    manifest = read_manifest(folder)
    return manifest is not None and manifest.get("params") == params and verify_folder(folder)


def install(tmp: Path, final: Path) -> None:
    """Replace final by tmp (same file system) with renames only."""
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def fresh_tmp(root: Path, name: str) -> Path:
    """An empty staging folder next to the final one."""
    tmp = root / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def split_counts(n: int, fractions: tuple[float, ...]) -> list[int]:
    """Split n items into len(fractions) parts; later parts get round(f * n), at least one each while n
    allows it; the first part gets the rest."""
    counts, left = [0] * len(fractions), n
    for i in range(len(fractions) - 1, 0, -1):
        k = int(round(fractions[i] * n))
        if k == 0 and left > 1:
            k = 1
        k = min(k, left - 1) if left > 1 else 0
        counts[i] = k
        left -= k
    counts[0] = left
    return counts


def split_of(order: np.ndarray, counts: list[int], names: tuple[str, ...]) -> dict[int, str]:
    """{item index: part name}: the first counts[0] of ``order`` go to names[0], and so on."""
    bounds = np.cumsum(counts)
    return {int(j): names[int(np.searchsorted(bounds, k, side="right"))] for k, j in enumerate(order)}
