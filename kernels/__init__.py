"""Triton kernels of lewm_fast, shipped as ``lewm_fast.kernels`` (one fused op per file).

Each ``<op>.py`` holds ``_<op>_fwd_kernel`` / ``_<op>_bwd_kernel``, the launchers
``<op>_fwd`` / ``<op>_bwd`` and an autograd ``<Op>Function``; the public modules in
``lewm_fast`` choose the backend and call them. Nothing here touches the GPU at import.
"""
