"""C++/CUDA sources of lewm_fast, shipped as package data of ``lewm_fast.csrc``.

Nothing here is imported for its code: ``lewm_fast._csrc`` finds the sources next to this
file (in the repository or in an installed wheel) and builds them on first use.
"""
