"""Exact weight surgery on pretrained models: transforms that change the architecture but not the function.

* :mod:`normscope.surgery.rewrite`: Pre-LN -> Pre-RMSNorm (and Pre-CRMSNorm), Jiang et al. 2023, pure
  functions on a transformers model;
* :mod:`normscope.surgery.verify`: the check on the model's own logits and on the residual mean at every norm;
* :mod:`normscope.surgery.export`: the checkpoint folder and the loader that rebuilds it;
* :mod:`normscope.surgery.pipeline`: load -> rewrite -> verify -> export -> :class:`~normscope.report.Result`.
"""
