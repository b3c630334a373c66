"""Benchmarks, one script per figure in docs/benchmarks.md; run each from the repository root as a module,
``python -m bench.NAME``, so the shared test fixtures (``tests.byte_tokenizer``) import without path tricks."""
