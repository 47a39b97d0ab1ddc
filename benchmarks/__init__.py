"""Speed benchmarks for the generation engine, curation and LoRA training (pytest-benchmark).

Run them with ``make bench`` (full) or ``make bench-check`` (short run compared with the
committed baseline). ``make test`` never collects this package: pytest's ``testpaths`` is
``tests``. See ``benchmarks/README.md`` for workloads, formulas and how to read the table.
"""
