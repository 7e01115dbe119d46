"""xent: exact, fast classification losses for PyTorch.

Every function is a drop-in for its ``torch.nn.functional`` namesake (or scikit-learn's
``log_loss``), computed by xent's own code from elementary tensor operations with closed-form
gradients. See ``xent.nn`` for the module wrappers.
"""

from xent.activation import log_softmax, logsumexp, softmax
from xent.classification import cross_entropy, nll_loss

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "cross_entropy",
    "log_softmax",
    "logsumexp",
    "nll_loss",
    "softmax",
]
