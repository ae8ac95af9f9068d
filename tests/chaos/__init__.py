"""The chaos suite: real processes killed, stopped, flooded and starved on purpose.

Each scenario (R1 ... R12, as numbered in docs/up.md) is bounded in time and
prints one line such as ``R1: 1500 passed, 0 failed``. The normal ``pytest`` run includes
the short versions; ``ANYSERVE_CHAOS=long pytest tests/chaos`` runs the long ones (30 s of
load where the short ones take a few); ``pytest -m "not chaos"`` leaves them out.
"""
