"""`python -m tests.skewed SECONDS ARGS...`: the `jobwire ARGS...` command on a host whose
clock is SECONDS off. Every clock read in jobwire is `jobwire.model.now`: it is replaced
before the rest of jobwire is imported, and in the modules that already hold it."""

from __future__ import annotations

import sys

import jobwire.model

real = jobwire.model.now
skew = float(sys.argv[1])


def skewed() -> float:
    return real() + skew


for module in list(sys.modules.values()):
    if getattr(module, "now", None) is real:
        module.now = skewed  # type: ignore[attr-defined]

from jobwire.cli import main  # noqa: E402  (after the clock is skewed)

main(sys.argv[2:])
