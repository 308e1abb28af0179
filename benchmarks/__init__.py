"""Benchmarks of post_response against the bare app and its peers (issue 5).

Run everything and write `docs/benchmarks.md` and `docs/benchmarks.png`:

    python -m benchmarks            # the full run, about 6 to 10 minutes
    python -m benchmarks --quick    # a smoke run, well under a minute
    python -m benchmarks.profile    # where our hot path spends its time

Every comparison interleaves the systems (A B C A B C ...) over several rounds, so the
drift of a shared, noisy machine falls on all of them alike; ratios are taken within a
round, and the report gives their median.
"""

from __future__ import annotations
