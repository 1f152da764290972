"""Swap every norm for DyT, Derf or SeeDNorm, initialised from activation statistics, then distill.

Python API::

    from normscope.swap import SwapOptions, run, swap_train_options
    result = run(lm, train_sample, eval_sample, SwapOptions(target="dyt", train=swap_train_options(steps=100)))
"""

from normscope.swap.functions import REFUSED, TARGETS, Derf, DyT, SeeDNorm
from normscope.swap.pipeline import SwapOptions, check, check_target, run, swap_train_options

__all__ = ["REFUSED", "TARGETS", "Derf", "DyT", "SeeDNorm", "SwapOptions", "check", "check_target", "run",
           "swap_train_options"]
