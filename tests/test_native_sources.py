"""Guards on the native sources that CI can check without a GPU.

Formatting an error message through std::ostringstream (what TORCH_CHECK / c10::str do with
several message parts) segfaulted the process on the CUDA image we target instead of raising
(see csrc/common/check.h). Native code therefore raises through ALLOCMOE_CHECK only.
"""
import pathlib
import re

CSRC = pathlib.Path(__file__).resolve().parents[1] / "csrc"
FORBIDDEN = {
    r"\bTORCH_CHECK\s*\(": "use ALLOCMOE_CHECK (csrc/common/check.h)",
    r"\bTORCH_INTERNAL_ASSERT\s*\(": "use ALLOCMOE_CHECK (csrc/common/check.h)",
    r"\bc10::str\s*\(": "c10::str formats through std::ostringstream",
    r"\bostringstream\b": "std::ostringstream crashes in extension code on the CUDA image",
    r"\bstd::cout\b|\bstd::cerr\b": "no stream output from the ops",
}


def _code_lines(path):
    for number, line in enumerate(path.read_text().splitlines(), 1):
        code = line.split("//", 1)[0]
        if code.strip():
            yield number, code


def test_native_sources_raise_through_allocmoe_check():
    sources = [p for p in CSRC.rglob("*") if p.suffix in {".cpp", ".cu", ".cuh", ".h"}]
    assert len(sources) >= 8, "expected the native sources under csrc/"
    offences = []
    for path in sources:
        if path.name == "check.h":  # defines the macro on top of c10's const char* path
            continue
        for number, code in _code_lines(path):
            for pattern, why in FORBIDDEN.items():
                if re.search(pattern, code):
                    offences.append(f"{path.relative_to(CSRC)}:{number}: {why}: {code.strip()}")
    assert not offences, "\n".join(offences)
