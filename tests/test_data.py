"""Offline text splits and byte-level tokenisation (allocmoe_ext.data)."""
import hashlib

import pytest
import torch

from allocmoe_ext import data


def test_encode_decode_roundtrip_bytes_and_unicode():
    text = "def f(x):\n    return 'héllo ✓'\n"
    ids = data.encode(text)
    assert ids.dtype == torch.long
    assert ids.tolist() == list(text.encode("utf-8"))
    assert data.decode(ids) == text
    assert int(ids.max()) < data.VOCAB_SIZE


def test_to_sequences_drops_tail_and_checks_arguments():
    seqs = data.to_sequences(bytes(range(1, 101)), 16)
    assert seqs.shape == (6, 16)
    assert seqs[1, 0].item() == 17
    assert data.to_sequences(bytes(range(1, 101)), 16, max_sequences=2).shape == (2, 16)
    with pytest.raises(ValueError, match="seq_len"):
        data.to_sequences(b"abc", 1)
    with pytest.raises(ValueError, match="shorter than one sequence"):
        data.to_sequences(b"abc", 16)


def test_stdlib_splits_are_disjoint_deterministic_and_cover_the_stdlib():
    calib = data.stdlib_split_files("calibration")
    evals = data.stdlib_split_files("evaluation")
    calib_paths = {r for r, _ in calib}
    eval_paths = {r for r, _ in evals}
    assert len(calib_paths) > 100 and len(eval_paths) > 100
    assert not calib_paths & eval_paths
    assert {r for r, _ in data.stdlib_split_files("calibration")} == calib_paths
    # Every file lies under the stdlib root, none in an installed-packages tree.
    root = data.stdlib_root()
    for _, full in calib[:50] + evals[:50]:
        assert root in full.parents and "site-packages" not in full.parts
    with pytest.raises(ValueError, match="split"):
        data.stdlib_split_files("train")


def test_stdlib_text_is_capped_repeatable_and_made_of_split_files():
    a = data.stdlib_text("evaluation", 20000)
    assert a == data.stdlib_text("evaluation", 20000)
    assert 0 < len(a) <= 20000
    assert a != data.stdlib_text("calibration", 20000)
    # Each document is the start of some evaluation file (cut at a line end) and of no
    # calibration file.
    docs = a.split(bytes([data.DOC_SEPARATOR]))
    eval_heads = {full.read_bytes()[:200] for _, full in data.stdlib_split_files("evaluation")}
    first = docs[0]
    assert any(h.startswith(first[:200]) or first.startswith(h) for h in eval_heads)
    with pytest.raises(ValueError, match="max_bytes"):
        data.stdlib_text("evaluation", 0)


def test_batches_have_the_requested_shape():
    batches = data.evaluation_batches(5, 64, 2)
    assert [tuple(b.shape) for b in batches] == [(2, 64), (2, 64), (1, 64)]
    assert all(b.dtype == torch.long and int(b.max()) < 256 for b in batches)
    c = data.calibration_batches(3, 32, 8)
    assert len(c) == 1 and c[0].shape == (3, 32)
    with pytest.raises(ValueError, match="num_sequences"):
        data.calibration_batches(0, 32, 8)


@pytest.fixture
def fake_python(tmp_path, monkeypatch):
    """A fake stdlib and site-packages: the training selection must skip a vendored copy of a
    stdlib file, files with NUL bytes and files that are not UTF-8."""
    stdlib = tmp_path / "lib" / "python3.x"
    site = tmp_path / "venv" / "site-packages"
    (stdlib / "json").mkdir(parents=True)
    (site / "pkg" / "_vendor").mkdir(parents=True)
    stdlib_src = b"import os\n\ndef stdlib_function():\n    return 1\n"
    (stdlib / "json" / "decoder.py").write_bytes(stdlib_src)
    (stdlib / "other.py").write_bytes(b"x = 1\n")
    (site / "pkg" / "_vendor" / "decoder.py").write_bytes(stdlib_src)  # vendored stdlib copy
    (site / "pkg" / "core.py").write_bytes(b"".join(b"line %d = %d\n" % (i, i) for i in range(400)))
    (site / "pkg" / "binary.py").write_bytes(b"a = 1\x00\n")
    (site / "pkg" / "latin.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    (site / "pkg" / "small.py").write_bytes(b"def small():\n    pass\n")
    monkeypatch.setattr(data, "stdlib_root", lambda: stdlib.resolve())
    monkeypatch.setattr(data, "site_packages_roots", lambda: [site.resolve()])
    return stdlib, site


def test_training_text_excludes_stdlib_copies_and_unusable_files(fake_python):
    text, summary = data.training_text(100_000, max_file_bytes=1000)
    assert summary["files_available"] == 5
    assert summary["files_used"] == 2  # core.py (cut) and small.py
    docs = text.split(bytes([data.DOC_SEPARATOR]))
    assert b"stdlib_function" not in text
    assert b"caf" not in text and b"a = 1" not in text
    assert any(d.startswith(b"def small()") for d in docs)
    core = next(d for d in docs if d.startswith(b"line 0"))
    assert len(core) <= 1000 and core.endswith(b"\n")  # capped at a line end
    assert data.training_text(100_000, max_file_bytes=1000)[0] == text
    small, _ = data.training_text(50, max_file_bytes=1000)
    assert len(small) <= 50
    with pytest.raises(ValueError, match="max_bytes"):
        data.training_text(0)


def test_split_is_a_function_of_the_relative_path_only(fake_python):
    stdlib, _ = fake_python
    splits = {rel: data._split_of(rel) for rel, _ in data._stdlib_files()}
    assert set(splits) == {"json/decoder.py", "other.py"}
    expected = {rel: ("calibration" if hashlib.sha256(("split:" + rel).encode()).digest()[0] % 2 == 0
                      else "evaluation") for rel in splits}
    assert splits == expected
