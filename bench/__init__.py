"""fastflow's benchmark: ``python -m bench`` (see bench/__main__.py and bench/harness.py).

Not part of the installed package; run it from the repository root.
"""
