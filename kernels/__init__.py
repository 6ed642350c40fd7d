"""Triton kernels of lewm_fast, shipped as ``lewm_fast.kernels`` (one fused op per file).

Each ``<op>.py`` holds ``_<op>_fwd_kernel`` / ``_<op>_bwd_kernel``, the launchers
``<op>_fwd`` / ``<op>_bwd`` (tensors in, tensors out) and the ``torch.library`` ops
``lewm_fast::<op>`` / ``lewm_fast::<op>_bwd`` (Python objects ``<op>_op`` / ``<op>_bwd_op``)
that carry the autograd formula (``block_step.py``, planning's whole predictor block step,
is forward only: no ``_bwd``); the public functions and modules in ``lewm_fast`` choose
the backend and call the ops. Nothing here touches the GPU at import.
"""
