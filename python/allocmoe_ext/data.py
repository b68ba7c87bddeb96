"""Offline, deterministic text for the reference model: training, calibration and evaluation.

Every machine with Python has real text on disk: Python source files. We use them so that the
reference model can be trained and evaluated with no download:

- training text: the ``.py`` files of the installed third-party packages (site-packages), with
  the standard library excluded (also vendored copies of stdlib files, found by content hash);
- calibration and evaluation text: the ``.py`` files of the local standard library
  (``sysconfig.get_paths()["stdlib"]``), split into two disjoint halves by a hash of each
  file's path relative to the stdlib root.

Selection is deterministic: files are ordered by the SHA-256 of their relative POSIX path (a
stable pseudo-random order that mixes packages and directories), each file contributes at most
``max_file_bytes`` from its start, and files are taken in that order until ``max_bytes`` is
reached. The same installation therefore always gives the same bytes. Different installations
(Python 3.11 here, 3.12 on the GPU machine, other packages) give different text; the model card
(docs/REFERENCE_MODEL.md) records what the shipped model was trained on.

Tokenisation is byte-level: token id = byte value (vocabulary 256), so no tokenizer needs to be
trained or downloaded. Files are joined with a NUL byte (id 0) as document separator; files that
contain NUL or are not valid UTF-8 are skipped, so 0 never occurs inside a document.

This module imports only the standard library and torch, and can be loaded by file path (the
training script does so on machines where the compiled extension does not match the Python).
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

import torch

VOCAB_SIZE = 256
DOC_SEPARATOR = 0  # byte id placed between documents

# Defaults sized for the CPU demo; the full quality table passes larger values.
DEFAULT_FILE_BYTES = 8192


def _path_key(relpath: str) -> bytes:
    return hashlib.sha256(relpath.encode("utf-8")).digest()


def _read_text_file(path: Path, max_file_bytes: int) -> bytes | None:
    """First ``max_file_bytes`` of a UTF-8 source file cut at a line end, or None if unusable."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if not raw or b"\x00" in raw:
        return None
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if len(raw) > max_file_bytes:
        # Cut at the last newline inside the cap so documents end on whole lines.
        cut = raw.rfind(b"\n", 0, max_file_bytes)
        raw = raw[: cut + 1] if cut > 0 else raw[:max_file_bytes]
    return raw


def _python_files(root: Path, exclude_dirs: tuple[Path, ...] = ()) -> list[tuple[str, Path]]:
    """All ``*.py`` files under ``root`` as (relative posix path, absolute path), unsorted."""
    out = []
    excluded = {p.resolve() for p in exclude_dirs}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        # Prune excluded trees and caches; sort for a stable walk (order is re-set by hash anyway).
        dirnames[:] = sorted(
            d for d in dirnames if d != "__pycache__" and (here / d).resolve() not in excluded
        )
        for name in filenames:
            if name.endswith(".py"):
                full = here / name
                out.append((full.relative_to(root).as_posix(), full))
    return out


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def site_packages_roots() -> list[Path]:
    """Installed third-party package directories (purelib/platlib), never inside the stdlib."""
    paths = sysconfig.get_paths()
    roots = []
    for key in ("purelib", "platlib"):
        p = Path(paths[key]).resolve()
        if p.is_dir() and p not in roots:
            roots.append(p)
    return roots


def _take(files: list[tuple[str, Path]], max_bytes: int, max_file_bytes: int,
          skip_hashes: frozenset[bytes] = frozenset()) -> tuple[bytes, list[str]]:
    """Concatenate files in hash-of-path order until ``max_bytes``; returns (text, used paths)."""
    chunks, used, total = [], [], 0
    for rel, full in sorted(files, key=lambda f: (_path_key(f[0]), f[0])):
        if total >= max_bytes:
            break
        text = _read_text_file(full, max_file_bytes)
        if text is None:
            continue
        if skip_hashes and hashlib.sha256(full.read_bytes()).digest() in skip_hashes:
            continue
        text = text[: max_bytes - total]
        chunks.append(text)
        used.append(rel)
        total += len(text) + 1
    return bytes([DOC_SEPARATOR]).join(chunks), used


def _stdlib_files() -> list[tuple[str, Path]]:
    root = stdlib_root()
    # A venv-less Python keeps site-packages (and a venv may keep more) inside the stdlib tree.
    inner = tuple(p for p in site_packages_roots() if root in p.parents) + (root / "site-packages",)
    return _python_files(root, exclude_dirs=inner)


def _split_of(relpath: str) -> str:
    """Stdlib file -> 'calibration' or 'evaluation', by the parity of its path hash."""
    return "calibration" if _path_key("split:" + relpath)[0] % 2 == 0 else "evaluation"


def stdlib_split_files(split: str) -> list[tuple[str, Path]]:
    if split not in ("calibration", "evaluation"):
        raise ValueError(f"split must be 'calibration' or 'evaluation', got {split!r}")
    return [f for f in _stdlib_files() if _split_of(f[0]) == split]


def stdlib_text(split: str, max_bytes: int, max_file_bytes: int = DEFAULT_FILE_BYTES) -> bytes:
    """Calibration or evaluation text from the local standard library (disjoint by file)."""
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    text, _ = _take(stdlib_split_files(split), max_bytes, max_file_bytes)
    return text


def training_text(max_bytes: int, max_file_bytes: int = 65536) -> tuple[bytes, dict]:
    """Training text from site-packages sources, stdlib (and copies of stdlib files) excluded.

    Returns the bytes and a summary (roots, file count, byte count) for the training log.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    stdlib = stdlib_root()
    files = []
    for root in site_packages_roots():
        if root == stdlib or root in stdlib.parents:
            raise RuntimeError(f"site-packages root {root} contains the stdlib {stdlib}")
        prefix = root.as_posix() + "::"
        files += [(prefix + rel, full) for rel, full in _python_files(root)]
    stdlib_hashes = frozenset(
        hashlib.sha256(full.read_bytes()).digest() for _, full in _stdlib_files()
    )
    # Hash the path relative to its root so the order does not depend on where Python lives.
    keyed = [(rel.split("::", 1)[1], full) for rel, full in files]
    text, used = _take(keyed, max_bytes, max_file_bytes, skip_hashes=stdlib_hashes)
    summary = {
        "roots": [r.as_posix() for r in site_packages_roots()],
        "files_available": len(files),
        "files_used": len(used),
        "bytes": len(text),
        "max_file_bytes": max_file_bytes,
    }
    return text, summary


def encode(text: str | bytes) -> torch.Tensor:
    """Byte-level tokens (int64) of a string (UTF-8) or bytes."""
    if isinstance(text, str):
        text = text.encode("utf-8")
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).to(torch.long)


def decode(ids) -> str:
    """Inverse of ``encode`` (invalid UTF-8 sequences, from sampling, are replaced)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def to_sequences(text: bytes, seq_len: int, max_sequences: int | None = None) -> torch.Tensor:
    """Cut text into non-overlapping ``[N, seq_len]`` token rows (the tail that does not fill a
    row is dropped)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    ids = encode(text)
    n = ids.numel() // seq_len
    if max_sequences is not None:
        n = min(n, max_sequences)
    if n == 0:
        raise ValueError(f"text of {ids.numel()} bytes is shorter than one sequence of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


def calibration_batches(num_sequences: int, seq_len: int, batch_size: int,
                        max_file_bytes: int = DEFAULT_FILE_BYTES) -> list[torch.Tensor]:
    """Calibration token batches ``[B, seq_len]`` from the stdlib calibration split."""
    return _batches("calibration", num_sequences, seq_len, batch_size, max_file_bytes)


def evaluation_batches(num_sequences: int, seq_len: int, batch_size: int,
                       max_file_bytes: int = DEFAULT_FILE_BYTES) -> list[torch.Tensor]:
    """Evaluation token batches ``[B, seq_len]`` from the stdlib evaluation split."""
    return _batches("evaluation", num_sequences, seq_len, batch_size, max_file_bytes)


def _batches(split, num_sequences, seq_len, batch_size, max_file_bytes):
    if num_sequences <= 0 or batch_size <= 0:
        raise ValueError(
            f"num_sequences and batch_size must be positive, got {num_sequences}, {batch_size}")
    # One row of slack: separators and the cut of the last file may shorten the text a little.
    text = stdlib_text(split, (num_sequences + 1) * seq_len, max_file_bytes)
    seqs = to_sequences(text, seq_len, num_sequences)
    return list(seqs.split(batch_size))
