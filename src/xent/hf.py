"""Hugging Face transformers models trained with xent: the loss from hidden states, no logits.

Every ``*ForCausalLM`` of transformers forms the ``(batch, seq, V)`` logits with ``lm_head`` and
hands them to ``ForCausalLMLoss``; for V = 128k those logits and their gradient are the largest
tensors of a training step. :func:`patch` gives one model instance a forward that, in training
with labels, runs the backbone and computes the same loss with :func:`xent.linear_cross_entropy`
straight from the last hidden states and the head's weight:

    >>> import torch, transformers, xent.hf
    >>> config = transformers.LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=1, num_attention_heads=2, pad_token_id=0)
    >>> model = xent.hf.patch(transformers.LlamaForCausalLM(config).train())
    >>> out = model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]]))
    >>> out.logits is None, out.loss.dtype
    (True, torch.float32)
    >>> _ = xent.hf.unpatch(model)

Outside training (or without labels) the model's own forward runs, so evaluation with logits
and ``generate()`` are untouched. :func:`causal_lm_loss` is the same loss as a function, for
custom training loops.

Each supported class is listed in :data:`SUPPORTED` with the transform its stock forward applies
to the logits (a multiplier, a divisor, a soft-cap); that table is explicit, and any other class
is refused rather than trained with a silently different loss.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import types
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from xent.fused import linear_cross_entropy
from xent.posttrain import linear_log_probs

__all__ = ["SUPPORTED", "causal_lm_loss", "is_patched", "patch", "unpatch"]

When = Literal["train", "always"]
_IMPLS = ("auto", "torch", "triton", "reference")
_STATE = "_xent_hf_patch"


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


def _shifted(labels: torch.Tensor, ignore_index: int | float) -> torch.Tensor:
    """``labels[..., 1:]`` padded on the right with ``ignore_index`` (ForCausalLMLoss's shift)."""
    return nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _head_tensors(lm_head: nn.Module | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(lm_head, torch.Tensor):
        return lm_head, None
    weight = getattr(lm_head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(
            f"lm_head must be a (V, H) weight tensor or a linear module with a (V, H) weight, "
            f"got {type(lm_head).__name__}"
        )
    bias = getattr(lm_head, "bias", None)
    return weight, bias if isinstance(bias, torch.Tensor) else None


def _is_fsdp(module: nn.Module | torch.Tensor) -> bool:
    """Whether ``module`` is an FSDP2 module, whose parameters are sharded outside its forward."""
    if not isinstance(module, nn.Module) or not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _through_module(module: nn.Module, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` run as ``module``'s forward, inside its hooks.

    FSDP2 gathers a sharded module's parameters in its forward pre-hook, frees them in its
    post-hook and arranges the gradients' reduce-scatter around the autograd graph of that
    call; running the loss as the head's forward lets FSDP do all of that unchanged.
    """
    own = module.__dict__.get("forward")  # an instance-level forward someone else installed
    module.forward = fn
    try:
        return module(*args)
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


def _normalizer(num_items_in_batch: Any, device: torch.device) -> torch.Tensor | None:
    if num_items_in_batch is None:
        return None
    # A tensor stays where its value is (never read on the host); a number becomes a tensor, so
    # that 0 gives ForCausalLMLoss's 0 / 0 rather than an error.
    return torch.as_tensor(num_items_in_batch, device=device).reshape(())


def _prepare(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    logit_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The hidden states, weight and bias that ``linear_cross_entropy`` sees.

    A logit multiplier ``s`` moves onto the hidden states (and the bias): ``s (W h + b) =
    W (s h) + s b``, so nothing ``V``-sized is scaled. Half-precision models are computed in
    fp32 (a copy of the head's weight), so that the loss comes back in fp32 as transformers'
    ``logits.float()`` returns it; the gradients flow back to the half-precision tensors.
    """
    x = hidden_states
    # Hidden states and weight may differ in dtype (a float32 head after a backbone that ran
    # under autocast); both then take the wider one, and half precision becomes float32.
    dtype = torch.promote_types(x.dtype, weight.dtype)
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    x, weight = x.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    if logit_scale != 1.0:
        x = x * logit_scale
        bias = None if bias is None else bias * logit_scale
    return x, weight, bias


def causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head: nn.Module | torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    token_weight: torch.Tensor | None = None,
    chunk_size: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """transformers' causal-LM loss, computed from hidden states without forming the logits.

    With the logits ``z_t = cap·tanh(s (W h_t + b) / cap)`` (no cap when ``softcap`` is None)
    and the next-token targets ``y_t = labels[..., t + 1]`` (``ignore_index`` after the last
    position; ``shift_labels`` taken as they are when given),

    .. math::

        L = \\frac{1}{D} \\sum_{t:\\, y_t \\ne \\text{ignore}} w_t\\, \\ell(z_t, y_t), \\qquad
        D = \\texttt{num\\_items\\_in\\_batch} \\text{ or } \\sum_{t:\\, y_t \\ne
        \\text{ignore}} w_t,

    where ``ℓ`` is cross-entropy (with label smoothing ``ε`` and z-loss ``ζ`` as in
    :func:`xent.linear_cross_entropy`) and ``w_t`` the token weight (1 without
    ``token_weight``). ``num_items_in_batch`` is what the ``Trainer`` passes under gradient
    accumulation: the target count of the whole accumulated step, so that micro-batch losses
    add up to the step's mean exactly.

    Equals transformers' ``ForCausalLMLoss(logits, labels, V, num_items_in_batch, ignore_index,
    shift_labels)`` with ``logits = lm_head(hidden_states)`` (then scaled and capped) for the
    options it has. Deliberate difference: a float64 model gets a float64 loss, where
    ``ForCausalLMLoss``'s ``logits.float()`` rounds it to float32; float32, bfloat16 and
    float16 models get a float32 loss, as there.

    Args:
        hidden_states: ``(..., T, H)`` last hidden states (after the final norm).
        lm_head: the output layer (a linear module, FSDP2-sharded or not) or its ``(V, H)``
            weight. A tensor-parallel (``Shard(0)`` DTensor) weight is passed to
            :func:`xent.linear_cross_entropy` as it is, which takes its vocabulary-parallel
            path.
        labels: ``(..., T)`` token ids, shifted here; or None when ``shift_labels`` is given.
        shift_labels: ``(..., T)`` targets already aligned with ``hidden_states``.
        num_items_in_batch: denominator of the mean (tensor or number), else the count of
            non-ignored targets (weighted by ``token_weight``).
        ignore_index: label value that takes no part in the loss.
        logit_scale: ``s``, a multiplier of the logits (Cohere's ``logit_scale``, ``1 /
            logits_scaling`` for Granite).
        softcap: ``cap``, the final soft-cap (Gemma 2 and 3's ``final_logit_softcapping``).
        label_smoothing, z_loss, chunk_size, impl: as in :func:`xent.linear_cross_entropy`.
        token_weight: ``(..., T)`` weights, aligned with ``labels`` (shifted with them) or, with
            ``shift_labels``, with those.

    Returns:
        The scalar loss: float32 (float64 for float64 hidden states).

    Under ``torch.autocast`` the loss runs with autocast off, in the weight's own dtype.

    Example:
        >>> import torch, xent.hf
        >>> head = torch.nn.Linear(3, 5, bias=False)
        >>> h, labels = torch.randn(2, 4, 3), torch.tensor([[1, 2, 3, 4], [0, 1, -100, 2]])
        >>> loss = xent.hf.causal_lm_loss(h, head, labels)
        >>> ref = torch.nn.functional.cross_entropy(head(h)[:, :-1].flatten(0, 1),
        ...                                         labels[:, 1:].flatten())
        >>> torch.allclose(loss, ref)
        True
    """
    if shift_labels is None:
        if labels is None:
            raise ValueError("causal_lm_loss needs labels or shift_labels, got neither")
        target = _shifted(labels, ignore_index)
        if token_weight is not None:
            token_weight = _shifted(token_weight, 0)
    else:
        target = shift_labels
    if tuple(target.shape) != tuple(hidden_states.shape[:-1]):
        raise ValueError(
            f"labels must have the hidden states' shape without H, "
            f"{tuple(hidden_states.shape[:-1])}, got {tuple(target.shape)}"
        )
    device = hidden_states.device
    target = target.to(device)
    token_weight = None if token_weight is None else token_weight.to(device)
    normalizer = _normalizer(num_items_in_batch, device)

    def loss_of(h: torch.Tensor) -> torch.Tensor:
        weight, bias = _head_tensors(lm_head)
        x, w, b = _prepare(h, weight, bias, logit_scale)
        with torch.autocast(device.type, enabled=False):
            return linear_cross_entropy(
                x,
                w,
                target,
                linear_bias=b,
                ignore_index=ignore_index,
                label_smoothing=label_smoothing,
                z_loss=z_loss,
                softcap=softcap,
                normalizer=normalizer,
                token_weight=token_weight,
                chunk_size=chunk_size,
                impl=impl,
            )

    if _is_fsdp(lm_head):
        return _through_module(lm_head, loss_of, hidden_states)
    return loss_of(hidden_states)


# --------------------------------------------------------------------------------------------
# The registry: each supported class and the transform its stock forward applies to the logits
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Family:
    """How one ``*ForCausalLM`` class forms its logits and loss.

    ``logit_scale(model)`` is the multiplier of ``lm_head``'s output (1.0 when there is none),
    ``softcap(model)`` the final soft-cap (None when there is none). ``moe``: the loss gains
    ``router_aux_loss_coef × load_balancing_loss`` when router logits are requested.
    ``multimodal``: the backbone also takes the labels and ``return_dict=True`` (Gemma 3's
    conditional-generation class). ``output``: the name of the stock output class.
    """

    logit_scale: Callable[[nn.Module], float] = lambda model: 1.0
    softcap: Callable[[nn.Module], float | None] = lambda model: None
    moe: bool = False
    multimodal: bool = False
    output: str = "CausalLMOutputWithPast"


_PLAIN = Family()
_MOE = Family(moe=True, output="MoeCausalLMOutputWithPast")
_GEMMA_CAP = Family(softcap=lambda model: model.config.final_logit_softcapping)

#: Every class :func:`patch` accepts, by name, with its output transform (read from each
#: family's modeling code in transformers 5.23).
SUPPORTED: dict[str, Family] = {
    "LlamaForCausalLM": _PLAIN,
    "MistralForCausalLM": _PLAIN,
    "MixtralForCausalLM": _MOE,
    "Qwen2ForCausalLM": _PLAIN,
    "Qwen3ForCausalLM": _PLAIN,
    "Qwen3MoeForCausalLM": _MOE,
    "GemmaForCausalLM": _PLAIN,
    # logits = cap · tanh(lm_head(h) / cap) with cap = config.final_logit_softcapping.
    "Gemma2ForCausalLM": _GEMMA_CAP,
    "Gemma3ForCausalLM": _GEMMA_CAP,
    # The multimodal class applies no soft-cap, whatever its text config says.
    "Gemma3ForConditionalGeneration": Family(
        multimodal=True, output="Gemma3CausalLMOutputWithPast"
    ),
    "Phi3ForCausalLM": _PLAIN,
    "PhiForCausalLM": _PLAIN,  # lm_head has a bias: read from the head itself
    # logits = lm_head(h) * model.logit_scale
    "CohereForCausalLM": Family(logit_scale=lambda model: float(model.logit_scale)),
    # logits = lm_head(h) / config.logits_scaling
    "GraniteForCausalLM": Family(logit_scale=lambda model: 1.0 / model.config.logits_scaling),
    "Olmo2ForCausalLM": _PLAIN,
}


def _registered_class(model: nn.Module) -> type:
    """The supported transformers class whose forward ``model`` runs, or a TypeError."""
    for cls in type(model).__mro__:
        if cls.__name__ in SUPPORTED and cls.__module__.startswith("transformers.models."):
            if type(model).forward is not cls.forward:
                raise TypeError(
                    f"{type(model).__name__} overrides the forward of {cls.__name__}; xent.hf "
                    f"cannot know what it computes, so it does not patch it"
                )
            return cls
    raise TypeError(
        f"xent.hf does not support {type(model).__name__}; supported classes: "
        f"{', '.join(SUPPORTED)}"
    )


# --------------------------------------------------------------------------------------------
# patch / unpatch
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Patch:
    cls: type
    family: Family
    when: When
    options: dict[str, Any]
    previous: Any  # the instance's own forward before patching (e.g. TRL's), or None
    trl_head: dict[str, Any] | None  # the options of a TRL fused head that was replaced


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`patch` has given ``model`` xent's forward."""
    return _STATE in model.__dict__


def _trl_head_options(forward: Any) -> dict[str, Any] | None:
    """The options of TRL's ``add_fused_lm_head`` if ``forward`` is the one it installed."""
    func = getattr(forward, "__func__", None)
    if func is None or func.__code__.co_name != "_fused_forward":
        return None
    names = inspect.getclosurevars(func).nonlocals
    return {k: names.get(k) for k in ("temperature", "outputs", "cast_lm_head_to_fp32")}


def patch(
    model: nn.Module,
    *,
    when: When = "train",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    chunk_size: int | None = None,
    impl: str = "auto",
) -> nn.Module:
    """Give ``model`` a forward that computes its loss with xent, without forming the logits.

    Called with labels while ``model.training`` (or always, with ``when="always"``), the new
    forward runs the backbone, applies the class's output transform (see :data:`SUPPORTED`) and
    returns the stock output class with ``loss`` (float32; float64 for a float64 model) from
    :func:`causal_lm_loss` and ``logits=None``. Everything else follows the stock forward:
    ``attention_mask``, ``position_ids``, ``past_key_values``, ``logits_to_keep`` and the
    loss keywords ``num_items_in_batch``, ``shift_labels``, ``ignore_index``; mixture-of-experts
    classes add ``router_aux_loss_coef × aux_loss`` when ``output_router_logits`` (argument or
    config) is set; ``return_dict=False`` gives a tuple (without the logits). A keyword
    ``token_weight`` (the labels' shape) weights each token's loss. Without labels, or in
    evaluation under ``when="train"``, the original forward runs (logits, ``generate()``).

    Only the instance changes (its ``forward`` attribute): the class, other instances, the
    state dict and the parameters are untouched; tied embeddings, a frozen head (no weight
    gradient is formed), gradient checkpointing and an FSDP2-sharded head work as they do
    for the stock forward. TRL: patch after building an ``SFTTrainer``; its fused-head calls
    (``fused_lm_head=True``) are then answered by xent (see the README).

    Args:
        model: an instance of a class in :data:`SUPPORTED` (or of a subclass that keeps its
            forward); any other raises ``TypeError`` naming the supported classes.
        when: ``"train"`` (the fused loss only while ``model.training``) or ``"always"``.
        label_smoothing, z_loss, chunk_size, impl: as in :func:`xent.linear_cross_entropy`;
            use ``label_smoothing`` here instead of the Trainer's ``label_smoothing_factor``,
            which needs the logits.

    Returns:
        ``model`` itself. Patching a patched model replaces the options.
    """
    cls = _registered_class(model)
    if when not in ("train", "always"):
        raise ValueError(f"when must be 'train' or 'always', got {when!r}")
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, _IMPLS))}, got {impl!r}")
    # Check the options once now, on a 1-token problem, rather than at the first step.
    linear_cross_entropy(
        torch.zeros(1, 1),
        torch.zeros(1, 1),
        torch.zeros(1, dtype=torch.long),
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        chunk_size=chunk_size,
    )
    if is_patched(model):
        unpatch(model)
    previous = model.__dict__.get("forward")
    state = _Patch(
        cls,
        SUPPORTED[cls.__name__],
        when,
        {
            "label_smoothing": label_smoothing,
            "z_loss": z_loss,
            "chunk_size": chunk_size,
            "impl": impl,
        },
        previous,
        _trl_head_options(previous),
    )
    signature = inspect.signature(cls.forward)
    var_kw = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    # `generate()` and the Trainer read the forward's signature: keep the stock one.
    @functools.wraps(cls.forward)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        fused_lm_head = kwargs.pop("fused_lm_head", False)
        token_weight = kwargs.pop("token_weight", None)
        arguments = signature.bind(self, *args, **kwargs).arguments
        labels = arguments.get("labels")
        if fused_lm_head:
            return _trl_forward(self, state, arguments, var_kw)
        if labels is None or not (self.training or state.when == "always"):
            if token_weight is not None:
                raise ValueError(
                    "token_weight is only used by xent's loss: give labels, and train the model "
                    "or patch it with when='always'"
                )
            original = state.previous or types.MethodType(cls.forward, self)
            return original(*args, **kwargs)
        return _loss_forward(self, state, arguments, var_kw, token_weight)

    model.forward = types.MethodType(forward, model)
    model.__dict__[_STATE] = state
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: ``model`` runs the forward it had before. Returns ``model``."""
    state: _Patch | None = model.__dict__.pop(_STATE, None)
    if state is None:
        raise ValueError(f"this {type(model).__name__} is not patched by xent.hf")
    if state.previous is not None:
        model.forward = state.previous
    else:
        del model.forward
    return model


# --------------------------------------------------------------------------------------------
# The patched forward
# --------------------------------------------------------------------------------------------


def _split(
    model: nn.Module, state: _Patch, arguments: dict[str, Any], var_kw: str | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The backbone's keyword arguments, and the loss's, from the stock forward's arguments."""
    named = {k: v for k, v in arguments.items() if k not in ("self", var_kw)}
    extra = dict(arguments.get(var_kw, {})) if var_kw else {}
    loss_kw = {
        "labels": named.pop("labels", None),
        "logits_to_keep": named.pop("logits_to_keep", 0),
        "return_dict": extra.pop("return_dict", None),
        "shift_labels": extra.pop("shift_labels", None),
        "num_items_in_batch": extra.pop("num_items_in_batch", None),
        "ignore_index": extra.pop("ignore_index", -100),
    }
    if state.family.moe:
        if named.get("output_router_logits") is None:
            named["output_router_logits"] = model.config.output_router_logits
    if state.family.multimodal:
        named["labels"] = loss_kw["labels"]
        named["return_dict"] = True
    return {**named, **extra}, loss_kw


def _keep(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The positions the stock forward projects (its ``slice_logits_to_keep``)."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:  # transformers < 5.10 sliced in each forward
        index = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden[:, index, :]
    return slice_logits_to_keep(hidden, logits_to_keep)


def _aux_loss(model: nn.Module, state: _Patch, outputs: Any, attention_mask: Any) -> Any:
    """The load-balancing loss as the stock MoE forward computes it."""
    balance = sys.modules[state.cls.__module__].load_balancing_loss_func
    return balance(
        outputs.router_logits, model.num_experts, model.num_experts_per_tok, attention_mask
    )


def _output(state: _Patch, outputs: Any, return_dict: bool | None, model: nn.Module, **fields):
    out_cls = getattr(sys.modules[state.cls.__module__], state.family.output)
    names = {f.name for f in dataclasses.fields(out_cls)}
    for name in names - set(fields) - {"logits"}:
        fields[name] = getattr(outputs, name, None)
    out = out_cls(**fields)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    return out if return_dict else out.to_tuple()


def _loss_forward(
    model: nn.Module,
    state: _Patch,
    arguments: dict[str, Any],
    var_kw: str | None,
    token_weight: torch.Tensor | None,
) -> Any:
    backbone_kw, loss_kw = _split(model, state, arguments, var_kw)
    outputs = model.base_model(**backbone_kw)
    hidden = _keep(outputs[0], loss_kw["logits_to_keep"])
    loss = causal_lm_loss(
        hidden,
        model.get_output_embeddings(),
        loss_kw["labels"],
        shift_labels=loss_kw["shift_labels"],
        num_items_in_batch=loss_kw["num_items_in_batch"],
        ignore_index=loss_kw["ignore_index"],
        logit_scale=state.family.logit_scale(model),
        softcap=state.family.softcap(model),
        token_weight=token_weight,
        **state.options,
    )
    fields: dict[str, Any] = {"loss": loss}
    if state.family.moe and backbone_kw.get("output_router_logits"):
        aux = _aux_loss(model, state, outputs, backbone_kw.get("attention_mask"))
        fields["aux_loss"] = aux
        fields["loss"] = loss + model.router_aux_loss_coef * aux.to(loss.device)
    return _output(state, outputs, loss_kw["return_dict"], model, **fields)


# --------------------------------------------------------------------------------------------
# TRL's fused-head protocol: model(..., labels=labels, fused_lm_head=True)
# --------------------------------------------------------------------------------------------


def _trl_forward(
    model: nn.Module, state: _Patch, arguments: dict[str, Any], var_kw: str | None
) -> Any:
    """TRL's ``FusedCausalLMOutput`` fields, computed by xent.

    TRL's trainers call ``model(..., labels=labels, fused_lm_head=True)`` and build their loss
    from ``log_probs`` (zero on ignored positions), ``label_mask`` and the metrics ``entropy``
    and ``is_top1``, all from :func:`xent.linear_log_probs` (with TRL's temperature after the
    model's own logit transform): exact, with their gradients, no logits stored.
    """
    head_opts = state.trl_head or {}
    temperature = head_opts.get("temperature") or 1.0
    wanted = set(head_opts.get("outputs") or ("log_probs", "entropy", "is_top1"))
    if wanted - {"log_probs", "entropy", "is_top1"}:
        raise NotImplementedError(
            f"xent.hf answers TRL's fused head for log_probs, entropy and is_top1, not "
            f"{sorted(wanted - {'log_probs', 'entropy', 'is_top1'})}"
        )
    if state.options["label_smoothing"] or state.options["z_loss"]:
        raise ValueError(
            "TRL builds its loss from the log-probabilities, so label_smoothing and z_loss "
            "would not apply: patch without them for TRL trainers"
        )
    backbone_kw, loss_kw = _split(model, state, arguments, var_kw)
    backbone_kw["use_cache"] = False
    outputs = model.base_model(**backbone_kw)
    hidden = outputs[0]
    labels, shift_labels = loss_kw["labels"], loss_kw["shift_labels"]
    if shift_labels is None:
        hidden, target = hidden[:, :-1], labels[:, 1:]
    else:
        target = shift_labels
    target = target.to(hidden.device)
    mask = target != -100
    cap = state.family.softcap(model)
    scale = state.family.logit_scale(model)
    head = model.get_output_embeddings()

    def per_token(h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        weight, bias = _head_tensors(head)
        x, w, b = _prepare(h, weight, bias, 1.0)
        with torch.autocast(h.device.type, enabled=False):
            # z = cap·tanh(s·(W h + b)/cap) / T: the model's own transform, then TRL's temperature.
            out = linear_log_probs(
                x,
                w,
                target,
                bias=b,
                temperature=temperature,
                logit_scale=scale,
                softcap=cap,
                return_entropy=True,
                return_top1=True,
                chunk_size=state.options["chunk_size"],
                impl=state.options["impl"],
            )
        return out.log_probs, out.entropy, out.top1

    if _is_fsdp(head):
        log_probs, entropy, top1 = _through_module(head, per_token, hidden)
    else:
        log_probs, entropy, top1 = per_token(hidden)
    num = loss_kw["num_items_in_batch"]
    loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num is None else num)
    aux = None
    if state.family.moe and backbone_kw.get("output_router_logits"):
        aux = _aux_loss(model, state, outputs, backbone_kw.get("attention_mask"))
        loss = loss + model.router_aux_loss_coef * aux
    from trl.trainer.utils import FusedCausalLMOutput

    return FusedCausalLMOutput(
        loss=loss,
        log_probs=log_probs,
        entropy=entropy.masked_fill(~mask, 0) if "entropy" in wanted else None,
        is_top1=(top1 & mask) if "is_top1" in wanted else None,
        label_mask=mask,
        aux_loss=aux,
    )
