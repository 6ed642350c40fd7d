"""lewm_fast benchmarks (shipped as ``lewm_fast.bench``): one ``bench_<op>.py`` per op or
feature on the shared harness in :mod:`.harness`; run them all with ``python -m bench``."""
