"""GPU acceptance benchmark: `python -m zsbir.bench gpu [--out DIR] [--budget-s 480] [--dry-run]`.

One prepared command that measures every GPU goal of docs/benchmarks.md ("GPU acceptance")
within a fixed wall-clock budget. `plan.py` lists the sections and their goals, `runner.py`
runs each measurement in its own process under a time cap and rewrites the JSON and
Markdown reports after every step, `measure.py` holds the measurements themselves.
"""
