"""xent: exact, fast classification losses for PyTorch.

Every function is a drop-in for its ``torch.nn.functional`` namesake (or scikit-learn's
``log_loss``), computed by xent's own code from elementary tensor operations with closed-form
gradients. ``xent.nn`` holds the module wrappers; ``xent.linear_cross_entropy`` fuses an output
layer with its cross-entropy without storing the logits.
"""

from xent import distributed, nn, reference
from xent.activation import log_softmax, logsumexp, softmax
from xent.binary import binary_cross_entropy, binary_cross_entropy_with_logits
from xent.classification import cross_entropy, nll_loss
from xent.divergence import entropy, kl_div
from xent.fused import linear_cross_entropy
from xent.metrics import log_loss
from xent.posttrain import (
    LogProbs,
    PolicyLoss,
    distill_divergence,
    linear_distill_divergence,
    linear_log_probs,
    linear_policy_loss,
    log_probs,
)
from xent.reference import linear_cross_entropy_reference
from xent.regression import huber_loss

__version__ = "0.1.0"

__all__ = [
    "LogProbs",
    "PolicyLoss",
    "__version__",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "distill_divergence",
    "distributed",
    "entropy",
    "huber_loss",
    "kl_div",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "linear_distill_divergence",
    "linear_log_probs",
    "linear_policy_loss",
    "log_loss",
    "log_probs",
    "log_softmax",
    "logsumexp",
    "nll_loss",
    "nn",
    "reference",
    "softmax",
]
