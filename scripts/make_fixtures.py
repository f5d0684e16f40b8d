#!/usr/bin/env python3
"""Generate tiny random-weight Stable Diffusion 3 and SDXL fixtures plus diffusers reference outputs.

Usage:
    python scripts/make_fixtures.py [--out tests/fixtures]

A thin entry point: the generator is the package scripts/r2f_fixtures/ (one module per model
family; its docstring lists what each fixture holds).  Everything is float32 on CPU and
deterministic: two runs give byte-identical files.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from r2f_fixtures.main import main  # noqa: E402  (sets the tokenizers env before importing it)

if __name__ == "__main__":
    main()
