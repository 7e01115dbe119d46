"""The options of one call, as they travel through the engine and through autograd."""

from __future__ import annotations

from dataclasses import dataclass

# Bytes of fp32 logits per chunk of the one-pass kernel: a few MiB keeps a chunk and its gradient
# in the L2/L3 caches of current CPUs while making each torch call long enough that its fixed
# cost (~10 µs) is noise. Measured with `xent bench ce` on a 2-core AMD EPYC (AVX-512): 1–8 MiB
# were within 5 % of each other; 64 KiB was 1.8× slower.
CHUNK_BYTES = 4 << 20


@dataclass(frozen=True)
class CEParams:
    """Options of one cross-entropy call; travels through autograd unchanged.

    ``class_start`` and ``num_classes`` describe a slice of the vocabulary (vocabulary
    parallelism): the logits handed to a row kernel are classes ``[class_start, class_start +
    width)`` of ``num_classes``, the class weights cover all ``num_classes``. Single-process
    calls leave them at 0 and None (the logits hold every class).
    """

    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    chunk_rows: int | None = None
    impl: str = "torch"  # a resolved backend: "torch" or "triton" (xent._engine.dispatch)
    class_start: int = 0
    num_classes: int | None = None

    def options(self) -> list[float]:
        """The numeric options as a flat list, the form ``torch.library`` operators accept."""
        return [
            float(self.ignore_index),
            self.label_smoothing,
            self.z_loss,
            0.0 if self.softcap is None else self.softcap,
            0.0 if self.chunk_rows is None else float(self.chunk_rows),
        ]

    @classmethod
    def from_options(cls, reduction: str, impl: str, options: list[float]) -> CEParams:
        """Inverse of :meth:`options`."""
        ignore_index, eps, zeta, cap, rows = options
        return cls(int(ignore_index), reduction, eps, zeta, cap or None, int(rows) or None, impl)

    def rows_per_chunk(self, num_classes: int) -> int:
        """Rows per chunk of the one-pass kernel: ``chunk_rows``, else ~:data:`CHUNK_BYTES`."""
        if self.chunk_rows is not None:
            return max(1, int(self.chunk_rows))
        return max(1, CHUNK_BYTES // (4 * max(num_classes, 1)))

    @property
    def sliced(self) -> bool:
        """Whether the logits are a slice of the vocabulary (see the class docstring)."""
        return self.num_classes is not None


@dataclass(frozen=True)
class Transform:
    """``u = s·tanh(a·x / s) / T`` with ``a = scale`` and ``s = softcap`` (no cap when None)."""

    scale: float = 1.0
    softcap: float | None = None


@dataclass(frozen=True)
class LogProbParams:
    """Options of one log-probability call."""

    transform: Transform = Transform()
    ignore_index: int = -100
    entropy: bool = False
    top1: bool = False
    block_rows: int | None = None  # rows per block; None: logprob_rows.BLOCK_BYTES of fp32
    impl: str = "torch"  # a resolved backend (xent._engine.dispatch)


@dataclass(frozen=True)
class PolicyParams:
    """Options of one clipped policy-gradient loss: its log-probability options (``entropy``
    True when the entropy is in the loss or asked for), the ratio's clip range
    ``[1 - clip_low, 1 + clip_high]``, the entropy bonus and whether the loss is off-policy
    (old log-probabilities given; else ``r = 1``)."""

    log_probs: LogProbParams = LogProbParams()
    clip_low: float = 0.2
    clip_high: float = 0.2
    entropy_coef: float = 0.0
    off_policy: bool = False


@dataclass(frozen=True)
class DivergenceParams:
    """Options of one divergence call: each model's transform and the mixture weight β."""

    student: Transform = Transform()
    teacher: Transform = Transform()
    beta: float = 0.0
    block_rows: int | None = None
    impl: str = "torch"
