"""`python -m r2f_fixtures [--out DIR]` (run from scripts/): same as scripts/make_fixtures.py."""

from .main import main

main()
