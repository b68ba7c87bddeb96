"""The torch-free kernel harnesses in bench/ include the library's CUDA headers directly, so a
change to a kernel header can break them without touching the extension build. Compile both
(no GPU needed) wherever nvcc exists; skipped without it. The split harness also with its ring-wait
counters (ALLOCMOE_STREAM_WAITS, macro code in experts_stream.cuh that no library build compiles)."""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
HARNESSES = [
    ("route_kernel_harness.cu", []),
    ("stream_kernel_harness.cu", []),
    ("split_kernel_harness.cu", []),
    ("split_kernel_harness.cu", ["-DALLOCMOE_STREAM_WAITS"]),
    ("read_floor_harness.cu", []),
]


@pytest.mark.parametrize("name,flags", HARNESSES)
def test_harness_compiles(name, flags, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    cmd = [nvcc, "-std=c++20", "-O1", "--expt-relaxed-constexpr", "-gencode=arch=compute_90a,code=sm_90a",
           *flags, "-I", str(ROOT / "csrc" / "cuda"), "-o", str(tmp_path / "harness"), str(ROOT / "bench" / name)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"
    assert (tmp_path / "harness").stat().st_size > 0
