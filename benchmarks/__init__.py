"""Benchmarks of post_response against the bare app and its peers (issues 5 and 12).

Install what they need (not an extra of the library), then run everything and write
`docs/benchmarks.md` and `docs/benchmarks.png`, headed by the goals of issue 12:

    pip install -e . -r benchmarks/requirements.txt
    python -m benchmarks            # the full run, about 15 minutes
    python -m benchmarks --quick    # a smoke run, about 2 minutes
    python -m benchmarks --check    # exit 1 when a goal is missed by more than 10%
    python -m benchmarks.profile    # where our hot path spends its time

Every comparison interleaves the systems (A B C A B C ...) over several rounds, so the
drift of a shared, noisy machine falls on all of them alike; ratios are taken within a
round, and the report gives their median.
"""

from __future__ import annotations
