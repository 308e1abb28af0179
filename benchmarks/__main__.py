"""`python -m benchmarks [--quick] [--check] [--out DIR] [--only a,b,...]`: see `benchmarks.cli`."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
