"""The SwiGLU feed-forward module (``rotalabs_accel.kernels.activations``)."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..functional.activations import packed_pair, swiglu_ffn, swiglu_fused
from .gemm import linears_of_one_input

__all__ = ["SwiGLU", "swiglu_fused"]


def _repack_after_load(module: nn.Module, incompatible_keys) -> None:
    # load_state_dict(assign=True) replaces the parameters; put gate and up back in one buffer.
    if isinstance(module, SwiGLU) and module.fused_gate_up:
        module._pack(strict=False)


_PLAIN_TENSOR_TYPES = (nn.Parameter, torch.Tensor)


def _plain_linear_tensors(gate: nn.Module, up: nn.Module, down: nn.Module) -> tuple | None:
    """``(gate.weight, up.weight, down.weight, gate.bias, up.bias, down.bias)`` when all three are
    plain ``nn.Linear`` layers (no hooks, parameters of no tensor subclass), else ``None``: replaced
    projections (LoRA, quantized, parametrized: a parametrization changes the module's class) and
    hooks need the modules themselves to run. The parameters come from each layer's dict, where
    ``torch.func.functional_call`` swaps them too."""
    weights, biases = [], []
    for module in (gate, up, down):
        if type(module) is not nn.Linear or module._forward_hooks or module._forward_pre_hooks:
            return None
        params = module._parameters
        weight, bias = params["weight"], params["bias"]
        if type(weight) not in _PLAIN_TENSOR_TYPES:
            return None
        if bias is not None and type(bias) not in _PLAIN_TENSOR_TYPES:
            return None
        weights.append(weight)
        biases.append(bias)
    return (*weights, *biases)


class SwiGLU(nn.Module):
    r"""SwiGLU feed-forward block, the MLP of Llama, Mistral, Qwen and PaLM.

    .. math::
        y = W_d\,\bigl(\mathrm{silu}(W_g x + b_g) \odot (W_u x + b_u)\bigr) + b_d,
        \qquad \mathrm{silu}(z) = z\,\sigma(z)

    The submodules are ``nn.Linear`` layers named as in Hugging Face's ``LlamaMLP``: ``gate_proj``
    (``W_g``, ``[I, H]``), ``up_proj`` (``W_u``, ``[I, H]``) and ``down_proj`` (``W_d``, ``[H, I]``), so
    the ``state_dict`` keys are ``gate_proj.weight``, ``up_proj.weight``, ``down_proj.weight`` (plus
    ``.bias`` with ``bias=True``) and a ``LlamaMLP`` ``state_dict`` loads into it, and back.

    What it does better than composing the layers:

    * **Memory.** In training it keeps the two projections ``W_g x`` and ``W_u x`` for backward but
      not the activation ``silu(W_g x) * W_u x``: backward recomputes it in the same kernel pass that
      computes the activation's gradients, and writes those gradients over the saved projections.
      That keeps one ``[tokens, I]`` tensor less than Liger-Kernel's ``LigerSwiGLUMLP`` and two less
      than the eager ``LlamaMLP``. One backward per forward is supported.
    * **Speed.** The activation is one Triton kernel each way (3 passes over ``[tokens, I]`` forward,
      6 backward including the recomputation, against about 14 for the eager composition); with
      ``fused_gate_up=True`` the gate and up projections also run as one GEMM over ``[W_g; W_u]``
      forward and backward.

    ``fused_gate_up=True`` keeps the two parameters ``gate_proj.weight`` and ``up_proj.weight`` (same
    names, same ``state_dict``, same optimizer view) but stores them back to back in one ``[2I, H]``
    buffer, so the fused GEMM reads that buffer in place: no per-step ``torch.cat`` of the weights. The
    packing is restored after ``.to()`` / ``.cuda()`` / ``.half()``, ``copy.deepcopy`` and
    ``load_state_dict(..., assign=True)``; if the parameters are replaced some other way, the module
    still computes the same function with two GEMMs and warns once (call :meth:`pack_gate_up_`).
    Checkpoints: ``torch.save`` and Hugging Face's ``save_pretrained`` handle the shared buffer;
    ``safetensors.torch.save_model`` refuses tensors that share a buffer (``save_file`` on the
    ``state_dict`` works).

    Under ``torch.compile`` or autocast the block is composed from ``F.linear`` and
    :func:`~rotalabs_accel.functional.swiglu_fused` (the compiler plans memory itself; autocast picks
    the GEMM dtypes). When a projection has been replaced (LoRA, quantized weights) or carries forward
    hooks, it runs as ``down_proj(swiglu_fused(gate_proj(x), up_proj(x)))``, calling the modules.

    Args:
        hidden_size: ``H``, the model width.
        intermediate_size: ``I``, the width of the gate and up projections.
        bias: give the three projections a bias (``LlamaConfig.mlp_bias``).
        fused_gate_up: store the gate and up weights in one buffer and run them as one GEMM.
        device: where to create the parameters.
        dtype: the parameters' dtype (float32 / float16 / bfloat16 use the kernels on CUDA).

    Shape:
        ``x``: ``[..., H]`` in the parameters' dtype; returns ``[..., H]``.

    Example:
        >>> import torch
        >>> from rotalabs_accel import SwiGLU
        >>> ffn = SwiGLU(hidden_size=64, intermediate_size=172)
        >>> x = torch.randn(2, 5, 64)
        >>> ffn(x).shape
        torch.Size([2, 5, 64])
        >>> sorted(ffn.state_dict())
        ['down_proj.weight', 'gate_proj.weight', 'up_proj.weight']
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        bias: bool = False,
        *,
        fused_gate_up: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Create ``gate_proj``, ``up_proj`` and ``down_proj`` (arguments: see the class docstring)."""
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"SwiGLU: {name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"SwiGLU: {name} must be positive, got {value}")
        factory = {"device": device, "dtype": dtype}
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.fused_gate_up = bool(fused_gate_up)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias, **factory)
        self._warned_unpacked = False
        if self.fused_gate_up:
            self._pack(strict=True)
        self.register_load_state_dict_post_hook(_repack_after_load)

    # ---------------------------------------------------------------------------------------------
    # Forward
    # ---------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x`` of shape ``[..., hidden_size]``; returns ``[..., hidden_size]``."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"SwiGLU: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.hidden_size:
            raise ValueError(
                f"SwiGLU: the last dimension of x must be hidden_size={self.hidden_size}, "
                f"got x of shape {list(x.shape)}"
            )
        # submodules and parameters straight from the modules' dicts: Module.__getattr__ per access
        # cost more host time than the rest of a decode-sized call's Python
        modules = self._modules
        gate, up, down = modules["gate_proj"], modules["up_proj"], modules["down_proj"]
        tensors = _plain_linear_tensors(gate, up, down)
        if tensors is None:
            # int8 gate/up: one GEMV launch at decode, its packed [..., 2I] output read as is
            gate_up = linears_of_one_input(x, (gate, up), concat=True)
            if gate_up is not None:
                return down(swiglu_fused(gate_up))
            return down(swiglu_fused(gate(x), up(x)))
        if self.fused_gate_up and not self._warned_unpacked and not torch.compiler.is_compiling():
            # meta tensors have no storage to share (nothing runs on them): no packing to lose
            if packed_pair(tensors[0], tensors[1]) is None and tensors[0].device.type != "meta":
                self._warned_unpacked = True
                warnings.warn(
                    "SwiGLU(fused_gate_up=True): gate_proj.weight and up_proj.weight no longer share "
                    "one buffer (were the parameters replaced?); running two GEMMs. Call "
                    "pack_gate_up_() to fuse them again.",
                    stacklevel=2,
                )
        return swiglu_ffn(x, *tensors)

    # ---------------------------------------------------------------------------------------------
    # Gate/up packing
    # ---------------------------------------------------------------------------------------------

    @property
    def gate_up_packed(self) -> bool:
        """``True`` when ``gate_proj.weight`` and ``up_proj.weight`` sit back to back in one buffer."""
        return packed_pair(self.gate_proj.weight, self.up_proj.weight) is not None

    def pack_gate_up_(self) -> SwiGLU:
        """Store the gate and up weights (and biases) back to back in one buffer; sets ``fused_gate_up``.

        The parameter objects stay the same (optimizers keep working); their data moves into one
        ``[2I, H]`` buffer (one copy now, none per step).

        Returns:
            ``self``.

        Example:
            >>> from rotalabs_accel import SwiGLU
            >>> ffn = SwiGLU(16, 40).pack_gate_up_()
            >>> ffn.gate_up_packed
            True
        """
        self.fused_gate_up = True
        self._pack(strict=True)
        return self

    @torch.no_grad()
    def _pack(self, strict: bool) -> None:
        self._warned_unpacked = False
        for name in ("weight", "bias"):
            first = getattr(self.gate_proj, name)
            second = getattr(self.up_proj, name)
            if first is None or second is None or packed_pair(first, second) is not None:
                continue
            if first.shape != second.shape or first.dtype != second.dtype or first.device != second.device:
                if strict:
                    raise ValueError(
                        f"SwiGLU.pack_gate_up_: gate_proj.{name} and up_proj.{name} must match in shape, "
                        f"dtype and device, got {list(first.shape)} {first.dtype} {first.device} and "
                        f"{list(second.shape)} {second.dtype} {second.device}"
                    )
                continue
            n = first.shape[0]
            buffer = torch.empty((2 * n, *first.shape[1:]), dtype=first.dtype, device=first.device)
            buffer[:n].copy_(first)
            buffer[n:].copy_(second)
            first.data = buffer[:n]
            second.data = buffer[n:]

    def __setstate__(self, state) -> None:
        # copy.deepcopy clones each parameter into its own storage; restore the packing.
        super().__setstate__(state)
        if self.fused_gate_up:
            self._pack(strict=False)

    def _apply(self, fn, recurse=True):
        # .to()/.cuda()/.half() give every parameter its own new storage; restore the packing.
        result = super()._apply(fn, recurse)
        if self.fused_gate_up:
            self._pack(strict=False)
        return result

    # ---------------------------------------------------------------------------------------------
    # Conversion
    # ---------------------------------------------------------------------------------------------

    @classmethod
    def from_module(cls, mlp: nn.Module, *, fused_gate_up: bool = False) -> SwiGLU:
        """Convert a Hugging Face ``LlamaMLP``-like module (``gate_proj``/``up_proj``/``down_proj``, SiLU).

        The new module uses the very same parameter objects as ``mlp`` (no copy: same device, dtype and
        values, and an optimizer holding them keeps working). With ``fused_gate_up=True`` the gate and
        up weights are moved into one buffer (one copy), which ``mlp`` then shares too.

        Args:
            mlp: a module with ``nn.Linear`` attributes ``gate_proj``, ``up_proj``, ``down_proj`` and a
                SiLU activation (``act_fn`` / ``activation_fn`` being ``nn.SiLU``, Hugging Face's
                ``SiLUActivation`` or ``F.silu``; without one, ``config.hidden_act`` in
                ``("silu", "swish")``).
            fused_gate_up: see :class:`SwiGLU`.

        Returns:
            A :class:`SwiGLU` computing the same function, in ``mlp``'s training mode.

        Raises:
            TypeError: a projection is missing or not an ``nn.Linear``.
            ValueError: the activation is not SiLU, or the projection shapes do not fit together.

        Example:
            >>> import torch
            >>> from rotalabs_accel import SwiGLU
            >>> class MLP(torch.nn.Module):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.gate_proj = torch.nn.Linear(8, 24, bias=False)
            ...         self.up_proj = torch.nn.Linear(8, 24, bias=False)
            ...         self.down_proj = torch.nn.Linear(24, 8, bias=False)
            ...         self.act_fn = torch.nn.SiLU()
            >>> ffn = SwiGLU.from_module(MLP())
            >>> ffn.intermediate_size
            24
        """
        sources = {}
        for name in ("gate_proj", "up_proj", "down_proj"):
            module = getattr(mlp, name, None)
            if not isinstance(module, nn.Linear):
                raise TypeError(
                    f"SwiGLU.from_module: mlp.{name} must be an nn.Linear, got {type(module).__name__}"
                )
            sources[name] = module
        _check_silu(mlp)
        n_inter, hidden = sources["gate_proj"].weight.shape
        expected = {"gate_proj": (n_inter, hidden), "up_proj": (n_inter, hidden),
                    "down_proj": (hidden, n_inter)}
        for name, shape in expected.items():
            got = tuple(sources[name].weight.shape)
            if got != shape:
                raise ValueError(
                    f"SwiGLU.from_module: mlp.{name}.weight must have shape {list(shape)} to match "
                    f"gate_proj.weight {[n_inter, hidden]}, got {list(got)}"
                )
        new = cls(hidden, n_inter, bias=False, device="meta", dtype=sources["gate_proj"].weight.dtype)
        for name, source in sources.items():
            target = getattr(new, name)
            target.weight = source.weight
            target.bias = source.bias
        if fused_gate_up:
            new.pack_gate_up_()
        new.train(mlp.training)
        return new

    def reset_parameters(self) -> None:
        """Re-initialise the three projections as ``nn.Linear`` does (in place: packing is kept)."""
        for module in (self.gate_proj, self.up_proj, self.down_proj):
            module.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
            f"bias={self.gate_proj.bias is not None}, fused_gate_up={self.fused_gate_up}"
        )


def _check_silu(mlp: nn.Module) -> None:
    for attr in ("act_fn", "activation_fn", "act"):
        act = getattr(mlp, attr, None)
        if act is not None:
            ok = isinstance(act, nn.SiLU) or act is F.silu or type(act).__name__ in ("SiLU", "SiLUActivation")
            found = f"{attr}={act!r}"
            break
    else:
        config = getattr(mlp, "config", None)
        name = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)
        ok = name in ("silu", "swish")
        found = f"config.hidden_act={name!r}" if config is not None else "no act_fn and no config"
    if not ok:
        raise ValueError(f"SwiGLU.from_module: mlp must apply SiLU to gate_proj's output, found {found}")
