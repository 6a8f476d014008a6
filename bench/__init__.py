"""Benchmark harness for peft_ops: ``python -m bench`` from the repository root.

Layout (read in this order):
- ``cases.py``: what is measured (ops, modes, shape sets) and the nominal FLOP / byte counts;
- ``providers.py``: the implementations compared, each registered once with ``@provider``;
- ``timing.py``: GPU timing with ``triton.testing.do_bench``, CPU timing with interleaved
  ``time.perf_counter`` rounds;
- ``memory.py``: saved-for-backward bytes (SPEC §7), also runnable as ``python -m bench.memory``;
- ``suite.py``: runs cases x providers, writes the long-format CSV, prints the summary;
- ``plot.py``: PNG plots made from the CSV alone (``python -m bench.plot RESULTS.csv``).
"""
