"""Greedy decoding with a static KV cache, ``torch.compile`` and CUDA graphs: :class:`StaticCacheDecoder`.

Batch-1 decoding of a large model is bound by reading the weights once per token; what is left is
launch overhead (hundreds of small kernels per token) and Python. A CUDA graph removes both, but it
needs every tensor of the step at a fixed address and no host synchronisation. Hugging Face's own static
cache keeps a position counter that ``torch.compile(mode="reduce-overhead")`` cannot capture, so this
module drives the model's own submodules with a cache it owns:

* one preallocated ``k``/``v`` tensor per layer, ``[batch, kv_heads, cache_len, head_dim]``, written at
  a position *tensor* with ``index_copy_``;
* the rotary ``cos``/``sin`` of every position computed once by the model's ``rotary_emb`` and gathered
  by the position tensor;
* attention over the whole cache with a mask ``j <= position`` (grouped-query attention without copying
  the keys: the query heads of one key/value head are stacked along the query axis);
* a decode step that reads the token and position from static buffers and writes the greedy token,
  the next position and the generated sequence back into them, so that decoding ``n`` tokens is ``n``
  replays of one graph with no synchronisation in between.

The decoder layers' modules are used as they are (``q_proj`` ... ``o_proj``, the norms, the MLP, the
modeling file's ``apply_rotary_pos_emb``), so a model converted by
:func:`~rotalabs_accel.integration.optimize_model` (Triton RMSNorm, SwiGLU, RoPE, INT8 linears) decodes
through the library's kernels, and a residual add followed by a ``TritonRMSNorm`` runs as one fused call.

Optionally the per-layer step is compiled with ``torch.compile`` (one region reused by every layer, so
compile time does not grow with depth), and on CUDA the whole decode step is captured as one CUDA graph.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .kernels.gemm import linears_of_one_input
from .kernels.normalization import TritonRMSNorm
from .quantization.symmetric import Int8Embedding

__all__ = ["StaticCacheDecoder", "SUPPORTED_MODEL_TYPES"]

#: Hugging Face ``config.model_type`` values whose decoder the harness reproduces exactly: Llama-style
#: pre-norm layers, rotate-half RoPE from ``model.model.rotary_emb``, no logit soft-capping and no
#: embedding scale. Qwen3's per-head ``q_norm``/``k_norm`` and Phi-3's fused ``qkv_proj`` are handled.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")

# The cache length is rounded up to this many positions: the fused attention kernels want the mask's
# rows aligned, and a few spare positions cost nothing.
_CACHE_ALIGN = 64


class _Geometry(NamedTuple):
    """Shapes of the attention layers (plain numbers: dynamo treats them as constants)."""

    heads: int
    kv_heads: int
    head_dim: int
    groups: int
    scaling: float


def _add_norm(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(x + residual), x + residual)``, fused into one kernel when ``norm`` is a TritonRMSNorm."""
    if isinstance(norm, TritonRMSNorm):
        return norm(x, residual)
    residual = residual + x
    return norm(residual), residual


def _attention(
    attn: nn.Module,
    rope: Callable,
    geo: _Geometry,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Self-attention of ``x`` ``[B, S, hidden]`` at positions ``pos`` ``[S]`` against the static cache."""
    b, s, _ = x.shape
    d = geo.head_dim
    if hasattr(attn, "qkv_proj"):  # Phi-3: one projection, [q | k | v] along the features
        qkv = attn.qkv_proj(x)
        q_size, kv_size = geo.heads * d, geo.kv_heads * d
        q = qkv[..., :q_size]
        k = qkv[..., q_size : q_size + kv_size]
        v = qkv[..., q_size + kv_size :]
    else:
        # int8 projections: one GEMV launch for the three at decode
        q, k, v = linears_of_one_input(x, (attn.q_proj, attn.k_proj, attn.v_proj))
    q = q.view(b, s, geo.heads, d)
    k = k.view(b, s, geo.kv_heads, d)
    v = v.view(b, s, geo.kv_heads, d)
    if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head before the rotation
        q = attn.q_norm(q)
        k = attn.k_norm(k)
    q, k = rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    k_cache.index_copy_(2, pos, k.to(k_cache.dtype))
    v_cache.index_copy_(2, pos, v.transpose(1, 2).to(v_cache.dtype))
    # Grouped-query attention without repeating the cache: the `groups` query heads that share a
    # key/value head become `groups * s` query rows of that head (head h reads kv head h // groups);
    # `mask` already has those `groups * s` rows.
    q = q.reshape(b, geo.kv_heads, geo.groups * s, d)
    out = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, scale=geo.scaling)
    out = out.reshape(b, geo.heads, s, d).transpose(1, 2).reshape(b, s, geo.heads * d)
    return attn.o_proj(out)


def _decoder_layer(
    layer: nn.Module,
    next_norm: nn.Module,
    rope: Callable,
    geo: _Geometry,
    x: torch.Tensor,
    residual: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pre-norm decoder layer, from its normalised input to the next norm's output.

    ``x`` is ``input_layernorm(stream)`` and ``residual`` the stream; returns
    ``(next_norm(new_stream), new_stream)`` where ``next_norm`` is the next layer's
    ``input_layernorm`` (or the final norm). Ending each region at the next norm gives every layer the
    same signature (one compiled region serves them all) and puts both residual additions of a layer
    next to an RMSNorm, where ``TritonRMSNorm`` fuses them.
    """
    attn_out = _attention(layer.self_attn, rope, geo, x, cos, sin, k_cache, v_cache, pos, mask)
    x, residual = _add_norm(layer.post_attention_layernorm, attn_out, residual)
    return _add_norm(next_norm, layer.mlp(x), residual)


def _compile_options(compile: bool | str | Mapping[str, Any]) -> dict[str, Any] | None:
    if compile is False or compile is None:
        return None
    if compile is True:
        return {"mode": "default", "dynamic": False}
    if isinstance(compile, str):
        return {"mode": compile, "dynamic": False}
    if isinstance(compile, Mapping):
        return {"dynamic": False, **compile}
    raise TypeError(
        f"StaticCacheDecoder: compile must be a bool, a torch.compile mode (str) or a dict of "
        f"torch.compile arguments, got {type(compile).__name__}"
    )


class StaticCacheDecoder:
    r"""Greedy decoding of a Hugging Face Llama-family causal LM with a static KV cache.

    Each generated token is :math:`t_{i+1} = \arg\max_v \operatorname{logits}(t_{\le i})_v`, exactly as
    ``model.generate(do_sample=False)``, computed by the model's own modules with a cache this object
    preallocates: per layer, ``k`` and ``v`` of shape ``[batch_size, kv_heads, cache_len, head_dim]``
    in the model's dtype (``cache_len`` is ``max_seq_len`` rounded up to a multiple of 64). The prompt
    is processed in one eager forward pass; every later token is one *decode step* that reads the last
    token and its position from static buffers, runs all layers and writes the argmax, the next
    position and the growing sequence back to them. On CUDA (``cuda_graph`` left at ``None`` or
    ``True``) that step is captured once as a CUDA graph and replayed, so decoding ``n`` tokens costs
    ``n`` graph launches and one synchronisation. With ``compile`` the per-layer computation is
    compiled by ``torch.compile`` first (one region for all layers; the first step compiles it).

    Works for ``config.model_type`` in :data:`SUPPORTED_MODEL_TYPES` (Llama, Mistral, Qwen2, Qwen3,
    Phi-3), as loaded or after :func:`~rotalabs_accel.integration.optimize_model` (including
    ``quantize="int8"``). It reads the model's parameters in place (no copy) and never changes the model.
    Decoding always produces ``max_new_tokens`` tokens (no stop on an end-of-sequence token).

    Args:
        model: a ``*ForCausalLM`` with ``model.model.embed_tokens``, ``.layers``, ``.norm``,
            ``.rotary_emb`` and ``model.lm_head``.
        max_seq_len: the longest sequence (prompt + new tokens) the cache holds.
        batch_size: number of sequences decoded together (all prompts of the same length).
        compile: ``False``; ``True`` (``torch.compile`` in its default mode); a mode string such as
            ``"max-autotune-no-cudagraphs"``; or a dict of ``torch.compile`` keyword arguments.
            ``dynamic=False`` is implied. Modes that capture CUDA graphs themselves
            (``"reduce-overhead"``, ``"max-autotune"``) are refused: the decoder captures its own graph.
        cuda_graph: capture the decode step as a CUDA graph; ``None`` means "on CUDA".

    Attributes:
        compile_seconds: wall time of the first decode step when ``compile`` is set (dynamo tracing and
            Inductor code generation; kernel compilation included), else ``None``.
        capture_seconds: wall time of warming up and capturing the CUDA graph, or ``None``.
        last_timing: after :meth:`generate`, ``{"prefill_ms", "decode_ms", "decode_steps"}`` measured
            with CUDA events (wall clock on CPU); ``decode_ms / decode_steps`` is the time per token.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or a bad ``compile`` argument.
        ValueError: an unsupported model type or structure, a sliding-window model whose window is
            shorter than ``max_seq_len``, a non-positive size, or ``cuda_graph=True`` off CUDA.

    Example:
        >>> import torch, transformers
        >>> from rotalabs_accel.generation import StaticCacheDecoder
        >>> config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, eos_token_id=None)
        >>> _ = torch.manual_seed(0)
        >>> model = transformers.LlamaForCausalLM(config).eval()
        >>> decoder = StaticCacheDecoder(model, max_seq_len=16)
        >>> prompt = torch.tensor([[1, 5, 9]])
        >>> out = decoder.generate(prompt, max_new_tokens=4)
        >>> out.shape
        torch.Size([1, 7])
        >>> ref = model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        >>> bool((out == ref).all())
        True
    """

    def __init__(
        self,
        model: nn.Module,
        max_seq_len: int,
        *,
        batch_size: int = 1,
        compile: bool | str | Mapping[str, Any] = False,
        cuda_graph: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"StaticCacheDecoder: model must be a torch.nn.Module, got {type(model).__name__}"
            )
        for name, value in (("max_seq_len", max_seq_len), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"StaticCacheDecoder: {name} must be a positive int, got {value!r}")
        options = _compile_options(compile)
        if options is not None and options.get("mode") in ("reduce-overhead", "max-autotune"):
            raise ValueError(
                f"StaticCacheDecoder: compile mode {options['mode']!r} captures CUDA graphs itself; use "
                "'default' or 'max-autotune-no-cudagraphs' (the decoder captures the whole step)"
            )
        self._check_structure(model)
        config = model.config
        inner = model.model
        self.model = model
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.cache_len = _CACHE_ALIGN * math.ceil(max_seq_len / _CACHE_ALIGN)
        self._check_window(config)

        embed = inner.embed_tokens
        # An Int8Embedding's ``weight`` is a dequantized copy of the whole table: read its dtype instead.
        self.dtype = embed.dtype if isinstance(embed, Int8Embedding) else embed.weight.dtype
        devices = {t.device for t in model.parameters()} | {t.device for t in model.buffers()}
        self.device = next(iter(devices))
        if len(devices) > 1:
            raise ValueError(
                "StaticCacheDecoder: the model must live on one device (the cache and the captured step "
                f"do), it spans {sorted(str(d) for d in devices)}"
            )
        if cuda_graph is None:
            cuda_graph = self.device.type == "cuda"
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(
                f"StaticCacheDecoder: cuda_graph=True needs a model on CUDA, it is on {self.device}"
            )
        self.cuda_graph = bool(cuda_graph)
        self.compile_options = options

        layers = list(inner.layers)
        self._layers = layers
        self._norms = [layer.input_layernorm for layer in layers[1:]] + [inner.norm]
        attn = layers[0].self_attn
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(attn, "head_dim", None) or config.hidden_size // heads)
        scaling = float(getattr(attn, "scaling", head_dim**-0.5))
        self._geo = _Geometry(heads, kv_heads, head_dim, heads // kv_heads, scaling)
        self._rope = self._rope_function(attn)

        with torch.no_grad():
            positions = torch.arange(self.cache_len, device=self.device).unsqueeze(0)
            probe = torch.zeros(1, 1, 1, device=self.device, dtype=self.dtype)
            cos, sin = inner.rotary_emb(probe, positions)
        # [cache_len, rot] tables; a step gathers its rows into the [1, S, rot] layout HF passes
        self._cos = cos[0].contiguous()
        self._sin = sin[0].contiguous()
        shape = (batch_size, kv_heads, self.cache_len, head_dim)
        self._k = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in layers]
        self._v = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in layers]
        self._arange = torch.arange(self.cache_len, device=self.device)
        # decode-step state: the token to feed, its position, and the whole sequence so far
        self._token = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self._seq = torch.zeros(batch_size, self.cache_len + 1, dtype=torch.long, device=self.device)
        self._logits: torch.Tensor | None = None

        self._layer_fn: Callable = _decoder_layer
        self._compiled = False
        self._graph: torch.cuda.CUDAGraph | None = None
        self.compile_seconds: float | None = None
        self.capture_seconds: float | None = None
        self.last_timing: dict[str, float] = {}

    # ---------------------------------------------------------------------------------------------
    # Structure checks
    # ---------------------------------------------------------------------------------------------

    @staticmethod
    def _check_structure(model: nn.Module) -> None:
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"StaticCacheDecoder: model.config.model_type must be one of {SUPPORTED_MODEL_TYPES}, "
                f"got {model_type!r} ({type(model).__name__})"
            )
        inner = getattr(model, "model", None)
        missing = [a for a in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(inner, a)]
        if not isinstance(getattr(model, "lm_head", None), nn.Module):
            missing.append("lm_head (on the model itself)")
        if missing:
            raise ValueError(
                f"StaticCacheDecoder: {type(model).__name__} lacks the Llama-family structure: no "
                f"model.{', model.'.join(missing)}"
            )
        if len(inner.layers) == 0:
            raise ValueError("StaticCacheDecoder: the model has no decoder layers")
        for i, layer in enumerate(inner.layers):
            attn = getattr(layer, "self_attn", None)
            split = all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj"))
            has_qkv = split or hasattr(attn, "qkv_proj")
            parts = ("input_layernorm", "post_attention_layernorm", "mlp")
            if not (has_qkv and hasattr(attn, "o_proj") and all(hasattr(layer, p) for p in parts)):
                raise ValueError(
                    f"StaticCacheDecoder: model.model.layers[{i}] lacks the Llama-family structure "
                    "(self_attn.{q,k,v,o}_proj or qkv_proj, input_layernorm, post_attention_layernorm, mlp)"
                )
        for name in ("final_logit_softcapping", "attn_logit_softcapping"):
            if getattr(config, name, None):
                raise ValueError(f"StaticCacheDecoder: config.{name} is set; soft-capping is not supported")
        rope_type = (getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
        if isinstance(rope_type, Mapping) and rope_type.get("rope_type", rope_type.get("type")) in (
            "dynamic",
            "longrope",
        ):
            raise ValueError(
                "StaticCacheDecoder: RoPE scaling that changes with the sequence length "
                f"({rope_type.get('rope_type', rope_type.get('type'))!r}) is not supported"
            )

    def _check_window(self, config: Any) -> None:
        window = getattr(config, "sliding_window", None)
        if window is None:
            return
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None and "sliding_attention" not in layer_types:
            return
        if getattr(config, "use_sliding_window", True) is False and layer_types is None:
            return
        if self.max_seq_len > window:
            raise ValueError(
                f"StaticCacheDecoder: the model attends over a sliding window of {window} positions; "
                f"max_seq_len must be at most that, got {self.max_seq_len}"
            )

    @staticmethod
    def _rope_function(attn: nn.Module) -> Callable:
        module = sys.modules.get(type(attn).__module__)
        fn = getattr(module, "apply_rotary_pos_emb", None)
        if not callable(fn):
            raise ValueError(
                f"StaticCacheDecoder: {type(attn).__module__} has no apply_rotary_pos_emb function"
            )
        return fn

    # ---------------------------------------------------------------------------------------------
    # The computation
    # ---------------------------------------------------------------------------------------------

    def _forward(self, input_ids: torch.Tensor, pos: torch.Tensor, layer_fn: Callable) -> torch.Tensor:
        """Logits ``[B, S, vocab]`` of ``input_ids`` ``[B, S]`` at positions ``pos`` ``[S]``; fills the cache.

        ``layer_fn`` is :func:`_decoder_layer` or its compiled form.
        """
        inner = self.model.model
        stream = inner.embed_tokens(input_ids)
        cos = self._cos.index_select(0, pos).unsqueeze(0)
        sin = self._sin.index_select(0, pos).unsqueeze(0)
        # Additive mask [groups * S, cache_len]: keys at or before each query's position. Built once per
        # step in the activations' dtype, so the layers pass it to the attention kernel as it is.
        allowed = (self._arange.unsqueeze(0) <= pos.unsqueeze(1)).repeat(self._geo.groups, 1)
        mask = torch.zeros(allowed.shape, device=self.device, dtype=self.dtype)
        mask.masked_fill_(allowed.logical_not(), float("-inf"))
        x = self._layers[0].input_layernorm(stream)
        residual = stream
        for i, layer in enumerate(self._layers):
            x, residual = layer_fn(
                layer, self._norms[i], self._rope, self._geo, x, residual, cos, sin, self._k[i], self._v[i],
                pos, mask,
            )
        return self.model.lm_head(x)

    def _decode_step(self) -> None:
        """One token: logits of ``_token`` at ``_pos``, greedy pick, state advanced in place."""
        logits = self._forward(self._token, self._pos, self._layer_fn)[:, -1]
        self._logits = logits
        nxt = logits.argmax(dim=-1, keepdim=True)
        self._seq.index_copy_(1, self._pos + 1, nxt)
        self._token.copy_(nxt)
        self._pos.add_(1)

    def _prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        s = input_ids.shape[1]
        pos = self._arange[:s]
        logits = self._forward(input_ids, pos, _decoder_layer)
        self._seq[:, :s].copy_(input_ids)
        return logits

    # ---------------------------------------------------------------------------------------------
    # Compile and capture
    # ---------------------------------------------------------------------------------------------

    def _reset_step_state(self) -> None:
        self._token.zero_()
        self._pos.zero_()

    @torch.no_grad()
    def warmup(self) -> None:
        """Compile (if asked) and capture the CUDA graph (if enabled) now rather than on first use.

        Runs a few decode steps on scratch state (the cache is overwritten by the next prompt).
        Sets :attr:`compile_seconds` and :attr:`capture_seconds`.
        """
        with self._on_device():
            self._warmup()

    def _warmup(self) -> None:
        if self.compile_options is not None and not self._compiled:
            self._layer_fn = torch.compile(_decoder_layer, **self.compile_options)
            self._reset_step_state()
            self._sync()
            t0 = time.perf_counter()
            self._decode_step()
            self._sync()
            self.compile_seconds = time.perf_counter() - t0
            self._compiled = True
        if self.cuda_graph and self._graph is None:
            self._reset_step_state()
            self._sync()
            t0 = time.perf_counter()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                # library kernels and cuBLAS handles initialise on first use, outside the capture
                for _ in range(3):
                    self._decode_step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._reset_step_state()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._decode_step()
            self._graph = graph
            self._sync()
            self.capture_seconds = time.perf_counter() - t0
        self._reset_step_state()

    def _on_device(self):
        """Make the model's GPU the current one (streams, graphs and events belong to a device)."""
        if self.device.type == "cuda":
            return torch.cuda.device(self.device)
        return contextlib.nullcontext()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _step(self) -> None:
        if self._graph is not None:
            self._graph.replay()
        else:
            self._decode_step()

    # ---------------------------------------------------------------------------------------------
    # Public calls
    # ---------------------------------------------------------------------------------------------

    def _check_ids(self, input_ids: Any, extra: int, what: str) -> torch.Tensor:
        integer = isinstance(input_ids, torch.Tensor) and not (
            input_ids.dtype.is_floating_point or input_ids.is_complex() or input_ids.dtype == torch.bool
        )
        if not integer:
            got = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise TypeError(f"StaticCacheDecoder.{what}: input_ids must be an integer tensor, got {got}")
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch_size or input_ids.shape[1] < 1:
            raise ValueError(
                f"StaticCacheDecoder.{what}: input_ids must have shape [batch_size={self.batch_size}, "
                f"seq >= 1], got {list(input_ids.shape)}"
            )
        total = input_ids.shape[1] + extra
        if total > self.max_seq_len:
            raise ValueError(
                f"StaticCacheDecoder.{what}: prompt ({input_ids.shape[1]}) + new tokens ({extra}) = {total} "
                f"exceeds max_seq_len={self.max_seq_len}"
            )
        return input_ids.to(device=self.device, dtype=torch.long)

    @torch.no_grad()
    def forward_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of every position of ``input_ids`` ``[batch_size, S]`` (one eager forward pass).

        The same computation as the prompt pass of :meth:`generate`, for checking the decoder against
        the model (``model(input_ids).logits``) or another model on the same tokens. Overwrites the
        cache.

        Returns:
            ``[batch_size, S, vocab]`` in the model's dtype.
        """
        input_ids = self._check_ids(input_ids, 0, "forward_logits")
        with self._on_device():
            return self._prefill(input_ids)

    @torch.no_grad()
    def decode_logits(self, input_ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """Logits of the decode steps when they are fed ``input_ids`` instead of their own picks.

        The first ``prompt_len`` tokens go through the prompt pass; every later token goes through the
        decode step (the compiled, graph-captured one when enabled), exactly as in :meth:`generate`
        but with the given token as input (teacher forcing). Compares a model's greedy decisions
        with a reference sequence position by position, without one early difference derailing the
        rest.

        Args:
            input_ids: integer tensor ``[batch_size, S]``.
            prompt_len: tokens handled by the prompt pass, ``1 <= prompt_len <= S``.

        Returns:
            ``[batch_size, S - prompt_len + 1, vocab]``: row ``j`` holds the logits predicting token
            ``prompt_len + j`` from ``input_ids[:, :prompt_len + j]`` (the last row predicts the token
            after the sequence).
        """
        input_ids = self._check_ids(input_ids, 0, "decode_logits")
        s = input_ids.shape[1]
        if isinstance(prompt_len, bool) or not isinstance(prompt_len, int) or not 1 <= prompt_len <= s:
            raise ValueError(
                f"StaticCacheDecoder.decode_logits: prompt_len must be an int in [1, {s}] (the sequence "
                f"length), got {prompt_len!r}"
            )
        self.warmup()
        with self._on_device():
            logits = self._prefill(input_ids[:, :prompt_len])[:, -1:]
            out = logits.new_empty(self.batch_size, s - prompt_len + 1, logits.shape[-1])
            out[:, :1].copy_(logits)
            self._pos.fill_(prompt_len)
            for t in range(prompt_len, s):
                self._token.copy_(input_ids[:, t : t + 1])
                self._step()
                out[:, t - prompt_len + 1].copy_(self._logits)
        return out

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy-decode ``max_new_tokens`` tokens after ``input_ids``.

        Args:
            input_ids: integer tensor ``[batch_size, S]`` (moved to the model's device), ``S >= 1`` and
                ``S + max_new_tokens <= max_seq_len``.
            max_new_tokens: number of tokens to generate (``>= 0``).

        Returns:
            ``[batch_size, S + max_new_tokens]`` long tensor on the model's device: the prompt followed by
            the generated tokens (what ``model.generate(..., do_sample=False)`` returns when no
            end-of-sequence token stops it).
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(
                "StaticCacheDecoder.generate: max_new_tokens must be a non-negative int, got "
                f"{max_new_tokens!r}"
            )
        input_ids = self._check_ids(input_ids, max_new_tokens, "generate")
        s = input_ids.shape[1]
        if max_new_tokens == 0:
            return input_ids.clone()
        self.warmup()
        with self._on_device():
            timer = _Timer(self.device)
            timer.mark()
            logits = self._prefill(input_ids)
            first = logits[:, -1].argmax(dim=-1, keepdim=True)
            self._seq[:, s : s + 1].copy_(first)
            self._token.copy_(first)
            self._pos.fill_(s)
            timer.mark()
            for _ in range(max_new_tokens - 1):
                self._step()
            timer.mark()
            out = self._seq[:, : s + max_new_tokens].clone()
            prefill_ms, decode_ms = timer.elapsed_ms()
        self.last_timing = {
            "prefill_ms": prefill_ms,
            "decode_ms": decode_ms,
            "decode_steps": float(max_new_tokens - 1),
        }
        return out


class _Timer:
    """Consecutive intervals on the device's stream (CUDA events) or the wall clock."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def elapsed_ms(self) -> list[float]:
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [1e3 * (b - a) for a, b in zip(self.marks, self.marks[1:])]
