"""Whole-model conversion: :func:`optimize_model`.

One call converts the building blocks of a model the library knows, in place, keeping every trained
parameter (the replacement modules hold the very same ``Parameter`` objects, so the ``state_dict``
keys and values, devices, dtypes, ``requires_grad`` flags and any optimizer references are unchanged):

* **RMSNorm**: ``torch.nn.RMSNorm`` anywhere, and any Hugging Face-style ``*RMSNorm`` module (a 1-D
  ``weight`` and an ``eps`` / ``variance_epsilon`` attribute) become
  :class:`~rotalabs_accel.kernels.normalization.TritonRMSNorm`. The Gemma form ``x_hat * (1 + w)`` and
  the casting convention (Llama: normalise in fp32, cast, multiply; Gemma: everything in fp32) are
  measured on the module itself, not guessed from its name.
* **SwiGLU MLPs**: a module with ``gate_proj`` / ``up_proj`` / ``down_proj`` linears and a SiLU
  activation becomes :class:`~rotalabs_accel.kernels.activations.SwiGLU`; the Phi-3 form with one fused
  ``gate_up_proj`` keeps its layout and its ``state_dict`` keys (:class:`FusedGateUpSwiGLU`). MLPs
  gated by another activation (Gemma's GELU-tanh) are left alone and reported.
* **Rotary embeddings**: Hugging Face applies RoPE through a module-level function
  ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`` in each modeling file. That function is
  replaced, for the whole Python module (so for every model of that family in the process), by an
  adapter that calls :func:`~rotalabs_accel.functional.apply_rope`. :func:`revert_rope_patches` undoes it.
* **Residual add + RMSNorm**: in a pre-norm decoder layer whose ``forward`` has the Llama structure
  (checked on its source), ``residual + attn_out`` followed by ``post_attention_layernorm`` runs as one
  :func:`~rotalabs_accel.functional.rmsnorm_residual_fused` call.
* **Causal-LM loss**: a Hugging Face model whose ``loss_function`` is ``ForCausalLMLoss`` (its loss
  type is ``ForCausalLM`` or ``ForConditionalGeneration``) gets
  :func:`~rotalabs_accel.functional.loss.causal_lm_loss` as the loss function of that instance (the
  ``loss_function`` setter of ``PreTrainedModel``; other models of the class are untouched): the same
  loss without Hugging Face's fp32 copy of the logits.
* **Packed-sequence check**: without an attention mask or a cache, transformers' mask creation asks
  whether the position ids describe several sequences packed into one row, which reads a value back
  from the GPU (a host-device synchronization in every forward: the GPU then idles while the host
  queues the forward's first kernels). A Hugging Face base model of the families above whose forward
  builds its causal mask (``LlamaModel``, ``MistralModel``, ``Qwen2Model``, ``Qwen3Model``,
  ``GemmaModel``, ``Phi3Model`` and their MoE siblings) skips that question when the caller passed no
  ``position_ids``: the model then derives them itself as ``arange(seq)``, never packed, so the answer
  is known. Called with ``position_ids``, the check runs as before. (transformers'
  ``find_packed_sequence_indices`` is wrapped for the whole process; outside an optimized model's
  forward the wrapper calls the original.)
* **INT8** (``quantize="int8"``): the remaining ``nn.Linear`` layers, minus ``skip``, go through
  :func:`~rotalabs_accel.quantization.symmetric.quantize_model`.

Before a replacement is kept it is checked: the old and the new module run on a small random input
(from a private generator: the global RNG is untouched) and must agree to within the dtype's rounding.
A module that fails the check stays as it was, with a line in the report saying why. (The loss
function is checked the same way, on small random logits and labels, loss and gradient.)
"""

from __future__ import annotations

import ast
import contextvars
import functools
import inspect
import logging
import sys
import textwrap
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._backend import use_backend
from .functional.activations import swiglu_fused
from .functional.embedding import embedding as embedding_lookup
from .functional.loss import causal_lm_loss
from .functional.rope import apply_rope
from .kernels.activations import SwiGLU
from .kernels.embedding import TritonEmbedding
from .kernels.normalization import TritonRMSNorm

__all__ = [
    "optimize_model",
    "OptimizationReport",
    "ReportEntry",
    "FusedGateUpSwiGLU",
    "revert_rope_patches",
    "revert_patches",
]

logger = logging.getLogger(__name__)

# Relative error allowed between a module and its replacement on the check input. A correct
# replacement differs by rounding only (about the dtype's unit roundoff, a few times over for a GEMM);
# a wrong one (a missing offset, swapped gate/up, another activation) is off by order 1.
_CHECK_TOL = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}

_ROPE_FN_NAME = "apply_rotary_pos_emb"
_ORIGINAL_ATTR = "_rotalabs_accel_original"
_FUSION_ATTR = "_rotalabs_accel_fusion"

# Original ``apply_rotary_pos_emb`` of every Python module patched in this process, by module name.
_ROPE_PATCHES: dict[str, Callable] = {}


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportEntry:
    """One line of an :class:`OptimizationReport`.

    Attributes:
        name: the module's qualified name in the model (``"model.layers.0.mlp"``; ``"<root>"`` for the
            model itself), or the Python module whose ``apply_rotary_pos_emb`` was patched.
        kind: ``"rmsnorm"``, ``"mlp"``, ``"rope"``, ``"residual_norm"``, ``"loss"``,
            ``"embedding_backward"`` (an ``nn.Embedding`` made a ``TritonEmbedding``), ``"packed_check"``
            (transformers' packed-sequence check skipped), ``"linear"`` or ``"embedding"``
            (quantized, ``quantize_options={"embeddings": True}``).
        action: ``"replaced"``, ``"patched"``, ``"fused"``, ``"quantized"``, ``"skipped"`` (something
            changed),
            ``"already"`` (converted by an earlier call) or ``"left"`` (recognised but left alone).
        detail: what was done, or why not.
    """

    name: str
    kind: str
    action: str
    detail: str

    @property
    def changed(self) -> bool:
        return self.action in ("replaced", "patched", "fused", "quantized", "skipped")


@dataclass
class OptimizationReport:
    """What :func:`optimize_model` replaced and what it left alone.

    ``str(report)`` gives a readable table; :meth:`summary` one line. ``entries`` holds every
    :class:`ReportEntry`.

    Example:
        >>> import torch
        >>> from rotalabs_accel import optimize_model
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.RMSNorm(8))
        >>> model, report = optimize_model(model, report=True)
        >>> [(e.name, e.action) for e in report.entries]
        [('1', 'replaced')]
    """

    model_class: str
    entries: list[ReportEntry] = field(default_factory=list)

    def add(self, name: str, kind: str, action: str, detail: str) -> None:
        self.entries.append(ReportEntry(name, kind, action, detail))

    @property
    def changed(self) -> list[ReportEntry]:
        """Entries for which something was converted by this call."""
        return [e for e in self.entries if e.changed]

    @property
    def left(self) -> list[ReportEntry]:
        """Entries recognised but left alone (each says why)."""
        return [e for e in self.entries if e.action == "left"]

    def count(self, kind: str, action: str | None = None) -> int:
        return sum(1 for e in self.entries if e.kind == kind and (action is None or e.action == action))

    def summary(self) -> str:
        """One line: how many of each kind were converted, already converted, or left alone."""
        if not self.entries:
            return (
                f"optimize_model({self.model_class}): no RMSNorm, SwiGLU MLP, rotary function, Embedding "
                "or Linear layer recognised, and no causal-LM loss function; the model is unchanged"
            )
        parts = []
        for kind, (label, verb) in _KIND_LABELS.items():
            done = sum(1 for e in self.entries if e.kind == kind and e.changed)
            already = self.count(kind, "already")
            left = self.count(kind, "left")
            if done or already or left:
                bits = [f"{done} {verb}"]
                if already:
                    bits.append(f"{already} already done")
                if left:
                    bits.append(f"{left} left alone")
                parts.append(f"{label}: " + ", ".join(bits))
        return f"optimize_model({self.model_class}): " + "; ".join(parts)

    def __str__(self) -> str:
        lines = [self.summary()]
        if self.entries:
            width = max(len(e.name) for e in self.entries)
            for e in self.entries:
                lines.append(f"  {e.action:<9} {e.kind:<13} {e.name:<{width}}  {e.detail}")
        return "\n".join(lines)


_KIND_LABELS = {
    "rmsnorm": ("RMSNorm", "replaced"),
    "mlp": ("SwiGLU MLP", "replaced"),
    "rope": ("rotary", "patched"),
    "residual_norm": ("residual add + RMSNorm", "fused"),
    "packed_check": ("packed-sequence check", "skipped"),
    "embedding_backward": ("Embedding (Triton table gradient)", "replaced"),
    "loss": ("causal-LM loss", "replaced"),
    "linear": ("Linear", "quantized"),
    "embedding": ("Embedding", "quantized"),
}


# --------------------------------------------------------------------------------------------------
# Helpers: names, checks
# --------------------------------------------------------------------------------------------------


def _normalize_skip(skip: Iterable[str] | str | None) -> tuple[str, ...]:
    if skip is None:
        return ()
    if isinstance(skip, str):
        return (skip,)
    out = tuple(skip)
    for s in out:
        if not isinstance(s, str) or not s:
            raise TypeError(f"optimize_model: skip must be module names (non-empty str), got {s!r}")
    return out


def _is_skipped(name: str, skip: tuple[str, ...]) -> bool:
    """``True`` when an entry of ``skip`` is a contiguous run of ``name``'s dotted components.

    ``"lm_head"`` matches ``"lm_head"`` and ``"model.lm_head"``; ``"layers.0"`` matches everything
    under ``"model.layers.0"``; ``"head"`` does not match ``"lm_head"``.
    """
    parts = name.split(".") if name else []
    for s in skip:
        sp = s.split(".")
        n = len(sp)
        if any(parts[i : i + n] == sp for i in range(len(parts) - n + 1)):
            return True
    return False


def _check_generator(device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(0x5EED)
    return gen


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.detach().double()
    b = b.detach().double()
    if a.shape != b.shape:
        return float("inf")
    denom = b.norm().item()
    err = (a - b).norm().item()
    return err / denom if denom > 0 else err


def _agree(
    old: nn.Module, new: nn.Module, features: int, device: torch.device, dtype: torch.dtype
) -> tuple[bool, str]:
    """Run ``old`` and ``new`` on the same random input (2 x 3 x features) and compare.

    Returns ``(True, "")`` on agreement, ``(True, "not checked: ...")`` when no check is possible
    (meta tensors) and ``(False, reason)`` on a mismatch or an exception.
    """
    if device.type == "meta":
        return True, "not checked (meta device)"
    if not dtype.is_floating_point:
        dtype = torch.float32
    gen = _check_generator(device)
    x = torch.randn(2, 3, features, generator=gen, device=device, dtype=torch.float32).to(dtype)
    try:
        with torch.no_grad():
            expected = old(x)
            got = new(x)
    except Exception as exc:  # the replacement cannot run here: keep the original
        return False, f"the replacement failed on a check input ({type(exc).__name__}: {exc})"
    if not isinstance(expected, torch.Tensor) or not isinstance(got, torch.Tensor):
        return False, "the module does not return a single tensor"
    if got.dtype != expected.dtype:
        return False, f"the replacement returns {got.dtype} where the original returns {expected.dtype}"
    err = _rel_err(got, expected)
    tol = _CHECK_TOL.get(dtype, 5e-2)
    if not err <= tol:
        return False, f"outputs differ on a check input (relative error {err:.2e} > {tol:.0e})"
    return True, ""


# --------------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------------


def _hf_norm_eps(m: nn.Module) -> float | None:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        v = getattr(m, attr, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def _looks_like_hf_rmsnorm(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (
        type(m).__name__.endswith("RMSNorm")
        and isinstance(w, nn.Parameter)
        and w.dim() == 1
        and _hf_norm_eps(m) is not None
    )


# (casting_mode, offset) forms an HF-style RMSNorm can take; the first is the tie-break winner when
# the check input cannot tell them apart (fp32 weights make the casting modes coincide).
_NORM_FORMS = (("llama", 0.0), ("gemma", 1.0), ("gemma", 0.0), ("llama", 1.0))


def _norm_form_value(
    x: torch.Tensor, w: torch.Tensor, eps: float, casting: str, offset: float
) -> torch.Tensor:
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if casting == "llama":
        scale = w + offset if offset else w
        return scale * normed.to(x.dtype)
    return (normed * (w.float() + offset)).to(x.dtype)


def _measure_norm_form(m: nn.Module, eps: float) -> tuple[str, float] | str | None:
    """Find which (casting_mode, offset) the module computes, by running it.

    Returns the pair, ``None`` when the module cannot run (meta tensors: ``TritonRMSNorm.from_module``
    then reads the module's source instead), or a string saying why it is not an RMSNorm.
    """
    w = m.weight
    if w.device.type == "meta":
        return None
    gen = _check_generator(w.device)
    x = torch.randn(2, 3, w.shape[0], generator=gen, device=w.device, dtype=torch.float32).to(w.dtype)
    try:
        with torch.no_grad():
            out = m(x)
            candidates = [(_norm_form_value(x, w, eps, c, o), (c, o)) for c, o in _NORM_FORMS]
    except Exception as exc:
        return f"it failed on a check input ({type(exc).__name__}: {exc})"
    if not isinstance(out, torch.Tensor):
        return "it does not return a single tensor"
    best, best_err = None, float("inf")
    for value, form in candidates:
        err = _rel_err(out, value) if value.dtype == out.dtype else float("inf")
        if err < best_err:
            best, best_err = form, err
    tol = _CHECK_TOL.get(w.dtype, 5e-2)
    if best is None or not best_err <= tol:
        return (
            "its output matches neither x_hat * w nor x_hat * (1 + w) "
            f"(closest relative error {best_err:.2e}); it is not a standard RMSNorm"
        )
    return best


def _convert_rmsnorm(m: nn.Module, verify: bool) -> tuple[nn.Module | None, str]:
    """Return ``(replacement, detail)``; ``replacement`` is ``None`` when the module stays."""
    cls = "torch.nn.RMSNorm" if type(m) is nn.RMSNorm else type(m).__name__
    overrides: dict[str, Any] = {}
    if isinstance(m, nn.RMSNorm):
        shape = tuple(m.normalized_shape)
        if len(shape) != 1:
            return None, f"{cls} left as is: normalized_shape {shape} spans more than the last dimension"
        features = shape[0]
    else:
        eps = _hf_norm_eps(m)
        assert eps is not None
        form = _measure_norm_form(m, eps)
        if isinstance(form, str):
            return None, f"{cls} left as is: {form}"
        if form is not None:
            overrides = {"casting_mode": form[0], "offset": form[1]}
        features = m.weight.shape[0]
    try:
        new = TritonRMSNorm.from_module(m, **overrides)
    except Exception as exc:
        return None, f"{cls} left as is: TritonRMSNorm.from_module failed ({type(exc).__name__}: {exc})"
    weight = getattr(m, "weight", None)
    if isinstance(weight, nn.Parameter) and new.weight is not weight:
        # from_module copies the values; hand over the module's own Parameter instead, so that
        # optimizer state and tied references keep pointing at the live weight and no copy lingers.
        new.weight = weight
    new.train(m.training)
    detail = f"{cls} -> TritonRMSNorm (eps={new.eps}, offset={new.offset}, casting_mode={new.casting_mode!r})"
    if not verify:
        return new, detail + ", not checked (verify=False)"
    if weight is not None:
        device, dtype = weight.device, weight.dtype
    else:
        device, dtype = torch.device("cpu"), torch.float32
    ok, why = _agree(m, new, features, device, dtype)
    if not ok:
        return None, f"{cls} left as is: {why}"
    return new, detail + (f", {why}" if why else "")


def _rmsnorm_candidate(m: nn.Module) -> bool:
    if isinstance(m, TritonRMSNorm):
        return False
    return isinstance(m, nn.RMSNorm) or _looks_like_hf_rmsnorm(m)


# --------------------------------------------------------------------------------------------------
# SwiGLU MLPs
# --------------------------------------------------------------------------------------------------


class FusedGateUpSwiGLU(nn.Module):
    """A SwiGLU MLP whose gate and up projections are one ``Linear`` (Phi-3's ``gate_up_proj``).

    ``y = down_proj(silu(g) * u)`` where ``[g | u] = gate_up_proj(x)`` (gate first, as Phi-3 lays it
    out). The submodules are the original ``gate_up_proj`` and ``down_proj``, so the ``state_dict``
    keys stay those of the Hugging Face module and a checkpoint loads either way; the activation runs
    as one :func:`~rotalabs_accel.functional.swiglu_fused` call on the fused projection's output.

    Args:
        gate_up_proj: ``Linear(hidden, 2 * intermediate)``.
        down_proj: ``Linear(intermediate, hidden)``.

    Shapes:
        ``x``: ``(..., hidden)`` -> ``(..., hidden)``.

    Example:
        >>> import torch
        >>> from rotalabs_accel.integration import FusedGateUpSwiGLU
        >>> mlp = FusedGateUpSwiGLU(torch.nn.Linear(8, 32, bias=False), torch.nn.Linear(16, 8, bias=False))
        >>> mlp(torch.randn(2, 8)).shape
        torch.Size([2, 8])
    """

    def __init__(self, gate_up_proj: nn.Linear, down_proj: nn.Linear) -> None:
        super().__init__()
        if gate_up_proj.out_features != 2 * down_proj.in_features:
            raise ValueError(
                "FusedGateUpSwiGLU: gate_up_proj.out_features must be 2 * down_proj.in_features, got "
                f"{gate_up_proj.out_features} and {down_proj.in_features}"
            )
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu_fused(self.gate_up_proj(x)))


def _activation_of(m: nn.Module) -> Any:
    for attr in ("act_fn", "activation_fn", "act", "activation"):
        act = getattr(m, attr, None)
        if act is not None and callable(act):
            return act
    return None


def _is_silu(act: Any) -> bool:
    if isinstance(act, nn.SiLU) or act is torch.nn.functional.silu:
        return True
    # Hugging Face wraps SiLU in its own class (SiLUActivation); trust behaviour, not names.
    try:
        t = torch.linspace(-6.0, 6.0, 25)
        with torch.no_grad():
            out = act(t)
        return isinstance(out, torch.Tensor) and torch.allclose(out, torch.nn.functional.silu(t), atol=1e-6)
    except Exception:
        return False


def _act_name(act: Any) -> str:
    return type(act).__name__ if isinstance(act, nn.Module) else getattr(act, "__name__", repr(act))


def _mlp_candidate(m: nn.Module) -> str | None:
    """``"split"`` (gate_proj/up_proj/down_proj), ``"fused"`` (gate_up_proj/down_proj) or ``None``."""
    if isinstance(m, (SwiGLU, FusedGateUpSwiGLU)):
        return None
    down = getattr(m, "down_proj", None)
    if not isinstance(down, nn.Module):
        return None
    if isinstance(getattr(m, "gate_proj", None), nn.Module) and isinstance(
        getattr(m, "up_proj", None), nn.Module
    ):
        return "split"
    if isinstance(getattr(m, "gate_up_proj", None), nn.Module):
        return "fused"
    return None


def _convert_mlp(m: nn.Module, form: str, verify: bool) -> tuple[nn.Module | None, str]:
    cls = type(m).__name__
    act = _activation_of(m)
    if act is None:
        return None, f"{cls} left as is: no activation attribute (act_fn / activation_fn) found"
    if not _is_silu(act):
        return None, (
            f"{cls} left as is: its gate activation is {_act_name(act)}, not SiLU "
            "(a GeGLU-style MLP; only SwiGLU is fused)"
        )
    linears = ("gate_proj", "up_proj", "down_proj") if form == "split" else ("gate_up_proj", "down_proj")
    for name in linears:
        if type(getattr(m, name)) is not nn.Linear:
            return (
                None,
                f"{cls} left as is: {name} is a {type(getattr(m, name)).__name__}, not torch.nn.Linear",
            )
    if form == "split":
        try:
            new = SwiGLU.from_module(m)
        except Exception as exc:
            return None, f"{cls} left as is: SwiGLU.from_module failed ({type(exc).__name__}: {exc})"
        detail = f"{cls} -> SwiGLU"
        hidden = m.gate_proj.in_features
    else:
        try:
            new = FusedGateUpSwiGLU(m.gate_up_proj, m.down_proj)
        except ValueError as exc:
            return None, f"{cls} left as is: {exc}"
        detail = f"{cls} -> FusedGateUpSwiGLU (fused gate_up_proj kept)"
        hidden = m.gate_up_proj.in_features
    new.train(m.training)
    if not verify:
        return new, detail + ", not checked (verify=False)"
    ok, why = _agree(m, new, hidden, m.down_proj.weight.device, m.down_proj.weight.dtype)
    if not ok:
        return None, f"{cls} left as is: {why}"
    return new, detail + (f", {why}" if why else "")


# --------------------------------------------------------------------------------------------------
# Rotary: the Hugging Face apply_rotary_pos_emb adapter
# --------------------------------------------------------------------------------------------------


def _hf_rope_adapter(original: Callable) -> Callable:
    """Wrap a Hugging Face ``apply_rotary_pos_emb`` so it runs :func:`apply_rope`.

    Hugging Face passes ``cos``/``sin`` already gathered per token, shape ``(batch, seq, rot)`` (or
    ``(seq, rot)``), with the two halves of the last dimension equal (``cat(freqs, freqs)``), in the
    activations' dtype; ``q``/``k`` are ``(batch, heads, seq, head_dim)`` for ``unsqueeze_dim=1`` and
    ``(batch, seq, heads, head_dim)`` for ``unsqueeze_dim=2``. In :func:`apply_rope`'s terms the table
    is the first half, ``cos[..., :rot // 2]``, in fp32; with one row of positions per batch element
    the table is flattened to ``(batch * seq, rot // 2)`` and token ``(b, s)`` reads row ``b * seq + s``.
    Calls it cannot express exactly (other ranks or ``unsqueeze_dim`` values, the old ``position_ids``
    argument) go to the original function.
    """
    sig = inspect.signature(original)
    params = list(sig.parameters)
    unsqueeze_default = sig.parameters["unsqueeze_dim"].default if "unsqueeze_dim" in sig.parameters else 1

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsqueeze_dim = unsqueeze_default
        if args or kwargs:
            try:
                bound = sig.bind(q, k, cos, sin, *args, **kwargs)
            except TypeError:
                return original(q, k, cos, sin, *args, **kwargs)
            extra = {n: v for n, v in bound.arguments.items() if n not in params[:4]}
            unsqueeze_dim = extra.pop("unsqueeze_dim", unsqueeze_default)
            if any(v is not None for v in extra.values()):
                return original(q, k, cos, sin, *args, **kwargs)
        out = _rope_via_library(q, k, cos, sin, unsqueeze_dim)
        if out is None:
            return original(q, k, cos, sin, *args, **kwargs)
        return out

    apply_rotary_pos_emb.__doc__ = (
        "rotalabs_accel adapter around the original apply_rotary_pos_emb (kept as "
        f"`{_ORIGINAL_ATTR}`): same signature and results, computed by rotalabs_accel.apply_rope."
    )
    apply_rotary_pos_emb.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(apply_rotary_pos_emb, _ORIGINAL_ATTR, original)
    if isinstance(original, nn.Module):
        return _module_rope_adapter(original, apply_rotary_pos_emb)
    return apply_rotary_pos_emb


def _module_rope_adapter(original: nn.Module, adapter: Callable) -> nn.Module:
    """The adapter as an instance of a subclass of ``type(original)``, for functions that transformers
    wraps in a module (``use_kernel_forward_from_hub`` with the ``kernels`` package installed).

    Such a module's pickling rebuilds every model's private copy of the wrapper as
    ``type(<module global>)()``, so the module global must stay an instance of that wrapper type (a
    plain function there makes pickling a model fail). The subclass takes no constructor arguments,
    keeps the wrapper's copy / pickle methods and runs the adapter as its forward.
    """
    base = type(original)
    cls = type(
        base.__name__,
        (base,),
        {
            "forward": lambda self, *args, **kwargs: adapter(*args, **kwargs),
            "__module__": base.__module__,
            "__doc__": adapter.__doc__,
            "__wrapped__": original,
            _ORIGINAL_ATTR: original,
        },
    )
    return cls()


def _rope_via_library(q, k, cos, sin, unsqueeze_dim) -> tuple[torch.Tensor, torch.Tensor] | None:
    if unsqueeze_dim not in (1, 2) or q.dim() != 4 or k.dim() != 4 or cos.shape != sin.shape:
        return None
    if cos.dim() not in (2, 3):
        return None
    rot = cos.shape[-1]
    head_dim = q.shape[-1]
    if rot % 2 or rot > head_dim or k.shape[-1] != head_dim:
        return None
    seq_axis = 2 if unsqueeze_dim == 1 else 1
    seq = q.shape[seq_axis]
    if cos.shape[-2] != seq or k.shape[seq_axis] != seq:
        return None
    half = rot // 2
    cos_h = cos[..., :half]
    sin_h = sin[..., :half]
    position_ids = None
    if cos.dim() == 3:
        if cos.shape[0] == 1:
            cos_h, sin_h = cos_h[0], sin_h[0]
        elif cos.shape[0] == q.shape[0]:
            batch = cos.shape[0]
            cos_h = cos_h.reshape(batch * seq, half)
            sin_h = sin_h.reshape(batch * seq, half)
            position_ids = torch.arange(batch * seq, device=cos.device).view(batch, seq)
        else:
            return None
    cos_h = cos_h.to(torch.float32).contiguous()
    sin_h = sin_h.to(torch.float32).contiguous()
    return apply_rope(
        q,
        k,
        cos_h,
        sin_h,
        position_ids=position_ids,
        layout="bhsd" if unsqueeze_dim == 1 else "bshd",
        rotary_dim=None if rot == head_dim else rot,
    )


def _hf_rope_inputs(
    batch: int, heads: int, kv_heads: int, seq: int, dim: int, rot: int, gen: torch.Generator
):
    """Small inputs shaped the way Hugging Face attention passes them (``unsqueeze_dim=1``)."""
    q = torch.randn(batch, heads, seq, dim, generator=gen)
    k = torch.randn(batch, kv_heads, seq, dim, generator=gen)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    # Different positions per batch element, as left-padded batched generation produces.
    positions = torch.stack([torch.arange(seq) + 3 * b for b in range(batch)]).float()
    freqs = positions[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return q, k, emb.cos(), emb.sin()


def _check_rope_adapter(original: Callable, adapter: Callable) -> str | None:
    """Compare the adapter with the original function on small inputs; a string says what differs."""
    gen = torch.Generator().manual_seed(0x5EED)
    cases = []
    q, k, cos, sin = _hf_rope_inputs(2, 4, 2, 5, 8, 8, gen)
    cases.append(("full rotary, (batch, heads, seq, head_dim)", (q, k, cos, sin), {}))
    cases.append(("one row of positions shared by the batch", (q, k, cos[:1], sin[:1]), {}))
    cases.append(
        (
            "(batch, seq, heads, head_dim) with unsqueeze_dim=2",
            (q.transpose(1, 2), k.transpose(1, 2), cos, sin),
            {"unsqueeze_dim": 2},
        )
    )
    qp, kp, cosp, sinp = _hf_rope_inputs(2, 4, 2, 5, 8, 4, gen)
    cases.append(("partial rotary", (qp, kp, cosp, sinp), {}))
    checked = 0
    for label, a, kw in cases:
        try:
            expected = original(*a, **kw)
        except Exception:
            continue  # the original does not support this case, so the adapter need not either
        checked += 1
        try:
            with use_backend("torch"):
                got = adapter(*a, **kw)
        except Exception as exc:
            return f"the adapter failed ({label}: {type(exc).__name__}: {exc})"
        for g, e, which in zip(got, expected, "qk"):
            err = _rel_err(g, e)
            if not err <= 1e-5:
                return (
                    f"the function is not the standard rotate-half RoPE ({label}, {which}: "
                    f"relative error {err:.1e})"
                )
    if checked == 0:
        return "the function rejects every standard call"
    return None


def _patch_rope(pymodule: types.ModuleType, report: OptimizationReport) -> None:
    name = pymodule.__name__
    fn = getattr(pymodule, _ROPE_FN_NAME)
    if getattr(fn, _ORIGINAL_ATTR, None) is not None:
        report.add(name, "rope", "already", f"{_ROPE_FN_NAME} already runs rotalabs_accel.apply_rope")
        return
    try:
        inspect.signature(fn)
    except (TypeError, ValueError):
        report.add(name, "rope", "left", f"{_ROPE_FN_NAME} has no inspectable signature")
        return
    adapter = _hf_rope_adapter(fn)
    problem = _check_rope_adapter(fn, adapter)
    if problem is not None:
        report.add(name, "rope", "left", f"{_ROPE_FN_NAME} left as is: {problem}")
        return
    setattr(pymodule, _ROPE_FN_NAME, adapter)
    _ROPE_PATCHES[name] = fn
    report.add(
        name,
        "rope",
        "patched",
        f"{name}.{_ROPE_FN_NAME} -> rotalabs_accel.apply_rope (every model of this family in the process; "
        "undo with rotalabs_accel.integration.revert_rope_patches())",
    )


def revert_rope_patches() -> list[str]:
    """Restore every ``apply_rotary_pos_emb`` that :func:`optimize_model` replaced in this process.

    Returns:
        The names of the Python modules restored.

    Example:
        >>> from rotalabs_accel.integration import revert_rope_patches
        >>> isinstance(revert_rope_patches(), list)
        True
    """
    return _restore(_ROPE_PATCHES, _ROPE_FN_NAME)


def _restore(patches: dict[str, Callable], fn_name: str) -> list[str]:
    """Put back each ``module.fn_name`` recorded in ``patches`` (module name -> original) that still
    holds our wrapper of that original; empties ``patches``; returns the modules restored."""
    restored = []
    for name, original in list(patches.items()):
        pymodule = sys.modules.get(name)
        current = getattr(pymodule, fn_name, None) if pymodule is not None else None
        if getattr(current, _ORIGINAL_ATTR, None) is original:
            setattr(pymodule, fn_name, original)
            restored.append(name)
        del patches[name]
    return restored


def _rope_modules(model: nn.Module) -> list[types.ModuleType]:
    """Python modules defining a class used in ``model`` and a module-level ``apply_rotary_pos_emb``."""
    seen: dict[str, types.ModuleType] = {}
    for m in model.modules():
        modname = type(m).__module__
        if modname in seen:
            continue
        pymodule = sys.modules.get(modname)
        if pymodule is not None and callable(getattr(pymodule, _ROPE_FN_NAME, None)):
            seen[modname] = pymodule
    return list(seen.values())


# --------------------------------------------------------------------------------------------------
# Residual add + RMSNorm fusion in decoder layers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FusionPlan:
    """What the fused decoder forward needs to reproduce the original's call of ``self_attn``."""

    param_names: tuple[str, ...]  # the original forward's named parameters after hidden_states
    defaults: dict  # their non-None defaults, passed to self_attn as the original does
    attn_dropout: str | None  # attribute name of a dropout applied to the attention output
    mlp_dropout: str | None  # attribute name of a dropout applied to the MLP output


def _residual_add_operand(stmt: ast.stmt, layer: nn.Module) -> tuple[bool, str | None]:
    """Match ``hidden_states = residual + hidden_states`` (optionally ``+ self.drop(hidden_states)``)."""
    text = ast.unparse(stmt)
    if text == "hidden_states = residual + hidden_states":
        return True, None
    if (
        isinstance(stmt, ast.Assign)
        and isinstance(stmt.value, ast.BinOp)
        and isinstance(stmt.value.op, ast.Add)
    ):
        right = stmt.value.right
        if (
            ast.unparse(stmt.value.left) == "residual"
            and len(stmt.targets) == 1
            and ast.unparse(stmt.targets[0]) == "hidden_states"
            and isinstance(right, ast.Call)
            and isinstance(right.func, ast.Attribute)
            and ast.unparse(right.func.value) == "self"
            and [ast.unparse(a) for a in right.args] == ["hidden_states"]
            and not right.keywords
            and isinstance(getattr(layer, right.func.attr, None), (nn.Dropout, nn.Identity))
        ):
            return True, right.func.attr
    return False, None


def _fusion_plan(layer: nn.Module) -> _FusionPlan | str:
    """Check that ``type(layer).forward`` is the Llama pre-norm structure; a string says why not."""
    forward = inspect.unwrap(type(layer).forward)
    try:
        source = textwrap.dedent(inspect.getsource(forward))
        fdef = ast.parse(source).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return "the decoder layer's forward source is not available"
    if not isinstance(fdef, ast.FunctionDef):
        return "the decoder layer's forward is not a plain function"
    body = list(fdef.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # docstring
    if len(body) != 9:
        return "the decoder layer's forward is not the Llama pre-norm structure"
    sig = inspect.signature(forward)
    names = list(sig.parameters)
    if names[:2] != ["self", "hidden_states"]:
        return "the decoder layer's forward does not take hidden_states first"
    named = [
        n
        for n in names[2:]
        if sig.parameters[n].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    var_kw = [n for n in names[2:] if sig.parameters[n].kind is inspect.Parameter.VAR_KEYWORD]
    if len(named) + len(var_kw) != len(names) - 2:
        return "the decoder layer's forward takes *args"

    def text(i: int) -> str:
        return ast.unparse(body[i])

    fixed = {
        0: "residual = hidden_states",
        1: "hidden_states = self.input_layernorm(hidden_states)",
        4: "residual = hidden_states",
        5: "hidden_states = self.post_attention_layernorm(hidden_states)",
        6: "hidden_states = self.mlp(hidden_states)",
        8: "return hidden_states",
    }
    for i, want in fixed.items():
        if text(i) != want:
            return f"the decoder layer's forward differs from the Llama structure at `{text(i)}`"
    # Statement 2: `hidden_states, <name> = self.self_attn(hidden_states=hidden_states, p=p, ..., **kw)`
    attn = body[2]
    if not (
        isinstance(attn, ast.Assign)
        and len(attn.targets) == 1
        and isinstance(attn.targets[0], ast.Tuple)
        and len(attn.targets[0].elts) == 2
        and ast.unparse(attn.targets[0].elts[0]) == "hidden_states"
        and isinstance(attn.value, ast.Call)
        and ast.unparse(attn.value.func) == "self.self_attn"
        and not attn.value.args
    ):
        return f"the decoder layer's attention call differs from the Llama structure at `{text(2)}`"
    passed = {}
    for kw in attn.value.keywords:
        passed[kw.arg] = ast.unparse(kw.value)
    expected = {"hidden_states": "hidden_states", **{n: n for n in named}}
    for n in var_kw:
        expected[None] = n
    if passed != expected:
        return "the decoder layer does not pass its arguments to self_attn unchanged"
    ok3, attn_dropout = _residual_add_operand(body[3], layer)
    ok7, mlp_dropout = _residual_add_operand(body[7], layer)
    if not (ok3 and ok7):
        return "the decoder layer's residual additions differ from the Llama structure"
    defaults = {
        n: sig.parameters[n].default
        for n in named
        if sig.parameters[n].default is not inspect.Parameter.empty and sig.parameters[n].default is not None
    }
    return _FusionPlan(tuple(named), defaults, attn_dropout, mlp_dropout)


def _fused_decoder_forward(
    self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any
) -> torch.Tensor:
    """Llama pre-norm decoder layer with the attention residual add fused into the second RMSNorm.

    Same arguments and result as the layer's own forward: every argument is handed to ``self_attn``
    as the original does (non-``None`` defaults included; ``None`` defaults are left to
    ``self_attn``'s own, which are ``None`` as well).
    """
    plan: _FusionPlan = getattr(self, _FUSION_ATTR)
    call = dict(plan.defaults)
    if args:
        call.update(zip(plan.param_names, args))
    call.update(kwargs)
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    attn_out = self.self_attn(hidden_states=hidden_states, **call)[0]
    if plan.attn_dropout is not None:
        attn_out = getattr(self, plan.attn_dropout)(attn_out)
    hidden_states, residual = self.post_attention_layernorm(attn_out, residual)
    hidden_states = self.mlp(hidden_states)
    if plan.mlp_dropout is not None:
        hidden_states = getattr(self, plan.mlp_dropout)(hidden_states)
    return residual + hidden_states


# Pickling a bound method stores (instance, method name): naming it "forward" makes an unpickled
# layer fall back to its class's own forward (same results) instead of failing.
_fused_decoder_forward.__name__ = "forward"


def _fusion_candidate(m: nn.Module) -> bool:
    return all(
        isinstance(getattr(m, a, None), nn.Module)
        for a in ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")
    )


def _fuse_layer(layer: nn.Module) -> tuple[str, str]:
    if getattr(layer, _FUSION_ATTR, None) is not None:
        return "already", "residual add + post_attention_layernorm already fused"
    if not isinstance(layer.post_attention_layernorm, TritonRMSNorm):
        return "left", "post_attention_layernorm is not a TritonRMSNorm (rmsnorm=False, or it was left alone)"
    if "forward" in vars(layer):
        return "left", "the layer's forward is already overridden on the instance"
    plan = _fusion_plan(layer)
    if isinstance(plan, str):
        return "left", plan
    object.__setattr__(layer, _FUSION_ATTR, plan)
    layer.forward = types.MethodType(_fused_decoder_forward, layer)
    dropouts = [d for d in (plan.attn_dropout, plan.mlp_dropout) if d]
    note = f" (dropout {', '.join(dropouts)} kept)" if dropouts else ""
    return (
        "fused",
        f"residual + attention output -> post_attention_layernorm as one rmsnorm_residual_fused{note}",
    )


# --------------------------------------------------------------------------------------------------
# Embeddings: the table gradient through the Triton kernel
# --------------------------------------------------------------------------------------------------


def _embedding_candidate(m: nn.Module) -> bool:
    return type(m) is nn.Embedding


def _check_embedding_kernel(device: torch.device, dtype: torch.dtype) -> str | None:
    """Run the table-gradient kernel on a small random table against PyTorch's; ``None`` if they agree."""
    from .reference.embedding import embedding_backward_reference

    gen = _check_generator(device)
    ids = torch.randint(0, 23, (3, 17), generator=gen, device=device)
    ids[0, :9] = 5  # a run of one id
    grad = torch.randn(3, 17, 40, generator=gen, device=device, dtype=torch.float32).to(dtype)
    table = torch.zeros(23, 40, device=device, dtype=dtype, requires_grad=True)
    try:
        with torch.enable_grad():
            embedding_lookup(ids, table, 2).backward(grad)
    except Exception as exc:  # the kernel cannot run here: keep the original
        return f"the gradient kernel failed on a check input ({type(exc).__name__}: {exc})"
    want = embedding_backward_reference(grad, ids, 23, 2)
    err = _rel_err(table.grad, want)
    tol = _CHECK_TOL.get(dtype, 5e-2)
    return None if err <= tol else f"table gradients differ on a check input (relative error {err:.2e})"


def _convert_embedding(m: nn.Module, verify: bool) -> tuple[nn.Module | None, str]:
    try:
        new = TritonEmbedding.from_embedding(m)
    except (TypeError, ValueError) as exc:
        return None, f"nn.Embedding left as is: {exc}"
    detail = "nn.Embedding -> TritonEmbedding (same weight; table gradient by a deterministic Triton kernel)"
    device = m.weight.device
    if not verify:
        return new, detail + ", not checked (verify=False)"
    if device.type != "cuda":
        return new, detail + f", not checked (on {device.type} PyTorch's backward runs)"
    problem = _check_embedding_kernel(device, m.weight.dtype)
    if problem is not None:
        return None, f"nn.Embedding left as is: {problem}"
    return new, detail


# --------------------------------------------------------------------------------------------------
# transformers' packed-sequence check (a host sync in every forward without a mask)
# --------------------------------------------------------------------------------------------------

_PACKED_FN_NAME = "find_packed_sequence_indices"
_MASK_BUILDERS = ("create_causal_mask", "create_sliding_window_causal_mask", "create_masks_for_generate")
_POSITIONS_ATTR = "_rotalabs_accel_position_index"
# True while an optimized base model runs a forward whose positions it derives itself.
_DERIVED_POSITIONS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "rotalabs_accel_derived_positions", default=False
)
_MASK_PATCHES: dict[str, Callable] = {}


def _packed_check_wrapper(original: Callable) -> Callable:
    @functools.wraps(original)
    def find_packed_sequence_indices(position_ids, *args, **kwargs):
        # Under torch.compile transformers skips the check itself (it is data-dependent).
        if not torch.compiler.is_compiling() and _DERIVED_POSITIONS.get():
            return None  # positions are arange(seq): one sequence per row
        return original(position_ids, *args, **kwargs)

    setattr(find_packed_sequence_indices, _ORIGINAL_ATTR, original)
    return find_packed_sequence_indices


def _derived_positions_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The class's forward; with no ``position_ids`` given, transformers' packed check is skipped."""
    if (
        torch.compiler.is_compiling()
        or kwargs.get("position_ids") is not None
        or len(args) > getattr(self, _POSITIONS_ATTR)
    ):
        return type(self).forward(self, *args, **kwargs)
    token = _DERIVED_POSITIONS.set(True)
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        _DERIVED_POSITIONS.reset(token)


_derived_positions_forward.__name__ = "forward"  # see _fused_decoder_forward


# Base models known to derive missing position ids as arange(seq) + cache offset (checked in the tests
# for each). Other models (vision-language ones with multi-axis positions, say) may derive positions
# that the check must see, so they are left alone.
_ARANGE_POSITION_MODELS = frozenset({
    "LlamaModel", "MistralModel", "MixtralModel", "Qwen2Model", "Qwen3Model", "Qwen2MoeModel",
    "Qwen3MoeModel", "GemmaModel", "Gemma2Model", "Phi3Model",
})


def _builds_causal_mask(m: nn.Module) -> bool:
    """Whether ``m`` is a known Hugging Face base model whose forward calls a mask builder."""
    cls = type(m)
    if cls.__name__ not in _ARANGE_POSITION_MODELS or not cls.__module__.startswith("transformers."):
        return False
    code = getattr(inspect.unwrap(cls.forward), "__code__", None)
    return code is not None and any(name in code.co_names for name in _MASK_BUILDERS)


def _skip_packed_check(m: nn.Module) -> tuple[str, str]:
    masking = sys.modules.get("transformers.masking_utils")
    fn = getattr(masking, _PACKED_FN_NAME, None)
    if fn is None:
        return "left", "this transformers version has no packed-sequence check"
    instance_forward = vars(m).get("forward")
    if getattr(instance_forward, "__func__", None) is _derived_positions_forward:
        return "already", "the packed-sequence check is already skipped when positions are derived"
    # (an unpickled model holds its class's own forward bound on the instance: no override)
    if instance_forward is not None and getattr(instance_forward, "__func__", None) is not type(m).forward:
        return "left", "the model's forward is already overridden on the instance"
    try:
        params = list(inspect.signature(type(m).forward).parameters)
    except (TypeError, ValueError):
        return "left", "the model's forward has no inspectable signature"
    if "position_ids" not in params:
        return "left", "the model's forward takes no position_ids"
    if getattr(fn, _ORIGINAL_ATTR, None) is None:
        setattr(masking, _PACKED_FN_NAME, _packed_check_wrapper(fn))
        _MASK_PATCHES[masking.__name__] = fn
    # Positional arguments after `self` up to position_ids' slot leave it unset.
    object.__setattr__(m, _POSITIONS_ATTR, params.index("position_ids") - 1)
    m.forward = types.MethodType(_derived_positions_forward, m)
    return (
        "skipped",
        "transformers' packed-sequence check (a GPU->host sync per forward) is skipped when no "
        "position_ids are passed: the model then uses arange(seq)",
    )


def revert_patches() -> list[str]:
    """Restore every function :func:`optimize_model` replaced process-wide.

    That is each Hugging Face family's ``apply_rotary_pos_emb`` (see :func:`revert_rope_patches`)
    and transformers' ``find_packed_sequence_indices``. Optimized models keep working: their
    forwards then call the originals.

    Returns:
        The names of the Python modules restored.

    Example:
        >>> from rotalabs_accel.integration import revert_patches
        >>> isinstance(revert_patches(), list)
        True
    """
    return revert_rope_patches() + _restore(_MASK_PATCHES, _PACKED_FN_NAME)


# --------------------------------------------------------------------------------------------------
# Causal-LM loss
# --------------------------------------------------------------------------------------------------


def _settable_loss_function(m: nn.Module) -> bool:
    """Whether ``type(m)`` has a ``loss_function`` property with a setter (Hugging Face's
    ``PreTrainedModel``), read without running the getter."""
    prop = inspect.getattr_static(type(m), "loss_function", None)
    return isinstance(prop, property) and prop.fset is not None


def _hf_loss_mapping() -> dict:
    """transformers' ``LOSS_MAPPING`` (loss type -> loss function), or ``{}`` when it is not loaded."""
    mapping = getattr(sys.modules.get("transformers.loss.loss_utils"), "LOSS_MAPPING", None)
    return mapping if isinstance(mapping, dict) else {}


def _check_loss(model: nn.Module, hf_loss: Callable) -> tuple[bool, str]:
    """Compare :func:`causal_lm_loss` with ``hf_loss`` on small random logits (the model's device and
    dtype) and labels with ignored positions: the loss and, outside inference mode, its gradient."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    if device.type == "meta":
        return True, "not checked (meta device)"
    vocab = 37
    gen = _check_generator(device)
    logits = torch.randn(2, 5, vocab, generator=gen, device=device, dtype=torch.float32).to(dtype)
    labels = torch.randint(0, vocab, (2, 5), generator=gen, device=device)
    labels[0, 1] = -100
    with_grad = not torch.is_inference_mode_enabled()
    results = []
    try:
        for fn in (hf_loss, causal_lm_loss):
            x = logits.clone().requires_grad_(with_grad)
            with torch.enable_grad():
                loss = fn(x, labels, vocab_size=vocab)
                grad = torch.autograd.grad(loss, x)[0] if with_grad else None
            results.append((loss.detach(), grad))
    except Exception as exc:  # either loss cannot run here: keep the original
        return False, f"a loss call failed on a check input ({type(exc).__name__}: {exc})"
    (expected, expected_grad), (got, got_grad) = results
    if got.dtype != expected.dtype:
        return False, f"the replacement returns {got.dtype} where the original returns {expected.dtype}"
    # Both compute in fp32 from the same logits: the loss agrees to fp32 rounding, the gradient to
    # one rounding in the logits' dtype.
    err = _rel_err(got, expected)
    if not err <= _CHECK_TOL[torch.float32]:
        return False, f"losses differ on a check input (relative error {err:.2e})"
    if with_grad:
        err = _rel_err(got_grad, expected_grad)
        tol = _CHECK_TOL.get(dtype, 5e-2)
        if not err <= tol:
            return False, f"gradients differ on a check input (relative error {err:.2e} > {tol:.0e})"
    return True, ""


def _convert_loss(m: nn.Module, verify: bool) -> tuple[str, str] | None:
    """Install :func:`causal_lm_loss` on one Hugging Face model instance; ``(action, detail)``, or
    ``None`` for a model that computes no loss (a base model without a head)."""
    loss_type = getattr(m, "loss_type", None)
    if loss_type is None:
        return None
    current = m.loss_function
    if current is causal_lm_loss:
        return "already", "loss_function is already rotalabs_accel's causal_lm_loss"
    mapping = _hf_loss_mapping()
    hf_loss = mapping.get("ForCausalLM")
    name = getattr(current, "__qualname__", type(current).__name__)
    if hf_loss is None or mapping.get(loss_type) is not hf_loss:
        return "left", f"loss type {loss_type!r} ({name}) is not the causal-LM loss; kept"
    if current is not hf_loss:
        return "left", f"a custom loss_function ({name}) is set on the model; kept"
    detail = "ForCausalLMLoss -> causal_lm_loss (this instance's loss_function)"
    if not verify:
        detail += ", not checked (verify=False)"
    else:
        ok, why = _check_loss(m, hf_loss)
        if not ok:
            return "left", f"ForCausalLMLoss left as is: {why}"
        if why:
            detail += f", {why}"
    m.loss_function = causal_lm_loss
    return "replaced", detail


# --------------------------------------------------------------------------------------------------
# optimize_model
# --------------------------------------------------------------------------------------------------


def _hooked(m: nn.Module) -> str | None:
    """Why ``m`` must not be swapped for a new module (its hooks would be lost), or ``None``."""
    if getattr(m, "_hf_hook", None) is not None or "forward" in vars(m):
        return "its forward is wrapped (an accelerate hook or an instance-level forward)"
    if m._forward_hooks or m._forward_pre_hooks:
        return "it has forward hooks, which a new module would not carry"
    return None


def _replace_children(
    root: nn.Module,
    skip: tuple[str, ...],
    pick: Callable[[nn.Module], Any],
    convert: Callable[[nn.Module, Any], tuple[nn.Module | None, str]],
    kind: str,
    report: OptimizationReport,
    already: Callable[[nn.Module], bool],
) -> nn.Module:
    """Replace every module ``pick`` selects (``setattr`` on each parent); returns the new root."""
    memo: dict[int, nn.Module | None] = {}
    reported: set[int] = set()
    for qual, child, parents in _walk(root):
        if _is_skipped(qual, skip):
            continue
        if already(child):
            if id(child) not in reported:
                reported.add(id(child))
                report.add(qual or "<root>", kind, "already", f"already a {type(child).__name__}")
            continue
        form = pick(child)
        if not form:
            continue
        if id(child) not in memo:
            hooked = _hooked(child)
            if hooked is not None:
                new, detail = None, f"{type(child).__name__} left as is: {hooked}"
            else:
                new, detail = convert(child, form)
            memo[id(child)] = new
            report.add(qual or "<root>", kind, "replaced" if new is not None else "left", detail)
        new = memo[id(child)]
        if new is None:
            continue
        if not parents:
            root = new
        for parent, attr in parents:
            setattr(parent, attr, new)
    return root


def _walk(root: nn.Module):
    """Yield ``(qualified_name, module, [(parent, attribute), ...])`` for every module, top down.

    A module reachable from several parents (shared, or tied) is yielded once with all of them. The
    children of a module are listed before any replacement, so a replaced subtree is not revisited.
    """
    parents: dict[int, list[tuple[nn.Module, str]]] = {}
    order: list[tuple[str, nn.Module]] = []
    stack: list[tuple[str, nn.Module]] = [("", root)]
    seen: set[int] = set()
    while stack:
        qual, m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        order.append((qual, m))
        children = [(n, c) for n, c in m._modules.items() if c is not None]
        for n, c in children:
            parents.setdefault(id(c), []).append((m, n))
        for n, c in reversed(children):
            stack.append((f"{qual}.{n}" if qual else n, c))
    for qual, m in order:
        yield qual, m, parents.get(id(m), [])


def optimize_model(
    model: nn.Module,
    *,
    rmsnorm: bool = True,
    swiglu: bool = True,
    rope: bool = True,
    fuse_residual: bool = True,
    cross_entropy: bool = True,
    embedding: bool = True,
    skip_packed_check: bool = True,
    quantize: str | None = None,
    quantize_options: Mapping[str, Any] | None = None,
    skip: Iterable[str] | str = ("lm_head",),
    verify: bool = True,
    report: bool = False,
    verbose: bool = False,
) -> nn.Module | tuple[nn.Module, OptimizationReport]:
    """Convert a model's RMSNorm, SwiGLU MLP, rotary, loss and (optionally) Linear layers in place.

    Recognised (see the module documentation for the details):

    * ``torch.nn.RMSNorm`` anywhere and Hugging Face ``*RMSNorm`` modules (Llama, Mistral, Qwen2,
      Qwen3 including its ``q_norm``/``k_norm``, Phi-3, Gemma's ``(1 + w)`` form, and any module of
      the same shape and behaviour) -> :class:`~rotalabs_accel.kernels.normalization.TritonRMSNorm`.
    * SwiGLU MLPs (``gate_proj``/``up_proj``/``down_proj`` + SiLU) ->
      :class:`~rotalabs_accel.kernels.activations.SwiGLU`; Phi-3's fused ``gate_up_proj`` ->
      :class:`FusedGateUpSwiGLU`. Gemma's GELU-gated MLP is left alone and reported.
    * ``apply_rotary_pos_emb`` of the model's Hugging Face modeling files -> an adapter over
      :func:`~rotalabs_accel.functional.apply_rope` (process-wide for that family; see
      :func:`revert_rope_patches`).
    * Llama-structured decoder layers: the attention residual add and ``post_attention_layernorm`` run
      as one :func:`~rotalabs_accel.functional.rmsnorm_residual_fused`.
    * Hugging Face models whose ``loss_function`` is ``ForCausalLMLoss`` (loss type ``ForCausalLM``,
      ``ForConditionalGeneration``): that instance's ``loss_function`` becomes
      :func:`~rotalabs_accel.functional.loss.causal_lm_loss` (same result, no fp32 copy of the logits;
      the logits the model returns are not modified). Other loss types and custom loss functions are
      left alone and reported.
    * ``nn.Embedding`` (exactly that class, without ``max_norm`` / ``scale_grad_by_freq`` / ``sparse``)
      -> :class:`~rotalabs_accel.kernels.embedding.TritonEmbedding`, holding the same weight: the
      lookup is unchanged, the table's gradient is a deterministic Triton kernel.
    * Hugging Face base models that build a causal mask: transformers' packed-sequence check (a
      GPU-to-host sync in every forward without a mask or cache) is skipped when the caller passes no
      ``position_ids``, whose derived values are never packed.
    * ``quantize="int8"``: the remaining ``nn.Linear`` layers, minus ``skip``, through
      :func:`~rotalabs_accel.quantization.symmetric.quantize_model`.

    Trained weights are kept: a replacement holds the original ``Parameter`` objects (or, for
    :meth:`SwiGLU.from_module`, what that constructor keeps), so the ``state_dict`` keys and values,
    device and dtype are those of the original, the optimized model computes the same function (to
    rounding) and a checkpoint of either loads into the other. The call is idempotent (a second call
    converts nothing and reports ``"already"``), works before or after ``model.to(device)``, and never
    raises on a model it does not know: the report then says nothing was recognised.

    Args:
        model: any ``torch.nn.Module``; converted in place.
        rmsnorm: convert RMSNorm modules.
        swiglu: convert SwiGLU MLPs.
        rope: patch Hugging Face's ``apply_rotary_pos_emb`` for the model's families.
        fuse_residual: fuse the attention residual add into ``post_attention_layernorm`` in decoder
            layers whose ``forward`` has the Llama structure (needs ``rmsnorm=True``).
        cross_entropy: install :func:`~rotalabs_accel.functional.loss.causal_lm_loss` as the
            ``loss_function`` of Hugging Face causal language models (per instance, not per class).
        embedding: convert ``nn.Embedding`` layers (after ``quantize``, which takes them first when
            asked to with ``quantize_options={"embeddings": True}``).
        skip_packed_check: skip transformers' packed-sequence check when the model derives the
            positions itself (see the module documentation); the results are unchanged.
        quantize: ``None`` or ``"int8"`` (per-channel INT8 weights for every remaining ``nn.Linear``).
        quantize_options: extra keyword arguments for
            :func:`~rotalabs_accel.quantization.symmetric.quantize_model`, e.g.
            ``{"group_size": 128}`` or ``{"mode": "w8a16"}``.
        skip: module names left alone by every conversion. An entry matches a module when it is a
            contiguous run of the module's dotted name: ``"lm_head"`` matches ``"lm_head"`` and
            ``"model.lm_head"``, ``"layers.0"`` everything under ``"model.layers.0"``.
        verify: run each module and its replacement on a small random input and keep the replacement
            only when they agree to the dtype's rounding (on by default; costs one tiny forward per
            module, and a tiny loss forward and backward for the loss function; skipped on the meta
            device).
        report: also return the :class:`OptimizationReport`.
        verbose: print the report (it is always logged: a summary at INFO level on the
            ``rotalabs_accel.integration`` logger, each entry at DEBUG).

    Returns:
        The model (the same object, unless the root module itself was replaced), or
        ``(model, report)`` when ``report=True``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``skip`` holds a non-string.
        ValueError: ``quantize`` is not ``None`` or ``"int8"``, or ``quantize_options`` come without it.

    Example:
        >>> import torch
        >>> from rotalabs_accel import optimize_model, TritonRMSNorm
        >>> block = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.RMSNorm(16, eps=1e-6))
        >>> block, rep = optimize_model(block, report=True)
        >>> isinstance(block[1], TritonRMSNorm), rep.summary()
        (True, 'optimize_model(Sequential): RMSNorm: 1 replaced')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize_model: model must be a torch.nn.Module, got {type(model).__name__}")
    if quantize not in (None, "int8"):
        raise ValueError(f"optimize_model: quantize must be None or 'int8', got {quantize!r}")
    if quantize_options and quantize is None:
        raise ValueError("optimize_model: quantize_options given but quantize is None (pass quantize='int8')")
    skip_names = _normalize_skip(skip)
    rep = OptimizationReport(type(model).__name__)

    if rmsnorm:
        model = _replace_children(
            model,
            skip_names,
            _rmsnorm_candidate,
            lambda m, _: _convert_rmsnorm(m, verify),
            "rmsnorm",
            rep,
            already=lambda m: isinstance(m, TritonRMSNorm),
        )
    if swiglu:
        model = _replace_children(
            model,
            skip_names,
            _mlp_candidate,
            lambda m, form: _convert_mlp(m, form, verify),
            "mlp",
            rep,
            already=lambda m: isinstance(m, (SwiGLU, FusedGateUpSwiGLU)),
        )
    if rope:
        for pymodule in _rope_modules(model):
            _patch_rope(pymodule, rep)
    if fuse_residual and rmsnorm:
        for qual, m, _ in _walk(model):
            if _fusion_candidate(m) and not _is_skipped(qual, skip_names):
                action, detail = _fuse_layer(m)
                rep.add(qual or "<root>", "residual_norm", action, detail)
    if cross_entropy:
        for qual, m, _ in _walk(model):
            if _settable_loss_function(m) and not _is_skipped(qual, skip_names):
                outcome = _convert_loss(m, verify)
                if outcome is not None:
                    rep.add(qual or "<root>", "loss", *outcome)
    if skip_packed_check:
        for qual, m, _ in _walk(model):
            if _builds_causal_mask(m) and not _is_skipped(qual, skip_names):
                rep.add(qual or "<root>", "packed_check", *_skip_packed_check(m))
    if quantize == "int8":
        model = _quantize_int8(model, skip_names, dict(quantize_options or {}), rep)
    if embedding:
        model = _replace_children(
            model,
            skip_names,
            _embedding_candidate,
            lambda m, _: _convert_embedding(m, verify),
            "embedding_backward",
            rep,
            already=lambda m: isinstance(m, TritonEmbedding),
        )

    logger.info("%s", rep.summary())
    for e in rep.entries:
        logger.debug("%s %s %s: %s", e.action, e.kind, e.name, e.detail)
    if not rep.entries:
        logger.warning("%s", rep.summary())
    if verbose:
        print(rep)
    return (model, rep) if report else model


def _quantize_int8(
    model: nn.Module, skip: tuple[str, ...], options: Mapping[str, Any], report: OptimizationReport
) -> nn.Module:
    from .kernels.gemm import Int8Linear
    from .quantization.symmetric import Int8Embedding, quantize_model

    if "report" in options:
        raise ValueError(
            "optimize_model: quantize_options must not contain 'report' (optimize_model's own report "
            "lists the quantized layers; pass report=True to optimize_model)"
        )
    before = {qual: type(m) for qual, m, _ in _walk(model)}
    linears = [q for q, t in before.items() if t is nn.Linear and not _is_skipped(q, skip)]
    embeddings = [
        q for q, t in before.items() if t in (nn.Embedding, TritonEmbedding) and not _is_skipped(q, skip)
    ]
    if not options.get("embeddings"):
        embeddings = []
    if not linears and not embeddings:
        for q, m, _ in _walk(model):
            if isinstance(m, Int8Linear):
                report.add(q or "<root>", "linear", "already", f"already a {type(m).__name__}")
            elif isinstance(m, Int8Embedding):
                report.add(q or "<root>", "embedding", "already", "already an Int8Embedding")
        return model
    # quantize_model gets both the user's entries and the exact names this function skips, so the two
    # agree on what is left in floating point whatever its own matching rule.
    skipped_here = tuple(q for q, t in before.items() if t is nn.Linear and _is_skipped(q, skip))
    model = quantize_model(model, skip=tuple(dict.fromkeys(skip + skipped_here)), **options)
    after = {qual: m for qual, m, _ in _walk(model)}
    for q in linears:
        m = after.get(q)
        if isinstance(m, Int8Linear):
            scales = f"per-group ({m.group_size})" if m.group_size else "per-channel"
            detail = f"nn.Linear -> {type(m).__name__} (INT8 weights, {scales} scales, mode {m.mode!r})"
            report.add(q or "<root>", "linear", "quantized", detail)
        else:
            report.add(q or "<root>", "linear", "left", "quantize_model left it in floating point")
    for q in skipped_here:
        report.add(q, "linear", "left", "in skip")
    for q in embeddings:
        m = after.get(q)
        if isinstance(m, Int8Embedding):
            detail = "nn.Embedding -> Int8Embedding (per-row scales)"
            report.add(q or "<root>", "embedding", "quantized", detail)
        else:
            report.add(q or "<root>", "embedding", "left", "quantize_model left it in floating point")
    return model
