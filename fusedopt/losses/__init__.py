"""The fused losses, one module (or launcher + module) per op family, as ``fusedopt.optim`` holds
the optimizers; ``fusedopt.functional`` and ``fusedopt.nn`` are their public faces.

* :mod:`.pointwise`: the mean and the regression losses (MSE, L1, smooth L1, Huber);
* :mod:`.cross_entropy` (launcher :mod:`._cross_entropy_launch`, compiled ops
  :mod:`._cross_entropy_ops`): cross-entropy over logits;
* :mod:`.linear_cross_entropy` (launcher :mod:`._linear_cross_entropy_launch`): the output
  projection and the cross-entropy without the logits;
* :mod:`.linear_distillation` (launcher :mod:`._linear_distillation_launch`): a divergence
  between a student's and a teacher's heads on that engine, neither's logits held whole;
* :mod:`.linear_log_probs` (launcher :mod:`._linear_log_probs_launch`): per-token log-probs and
  entropy of the same head, on the linear cross-entropy's token chunks;
* :mod:`._common`: the grid rule, the custom-op registration and the backward forms they share.
"""
