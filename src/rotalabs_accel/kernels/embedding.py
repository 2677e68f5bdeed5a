"""An ``nn.Embedding`` whose table gradient runs a deterministic Triton kernel: :class:`TritonEmbedding`."""

from __future__ import annotations

import torch
from torch import nn

from ..functional.embedding import embedding

__all__ = ["TritonEmbedding"]


class TritonEmbedding(nn.Embedding):
    r"""Drop-in ``nn.Embedding`` whose backward (the gradient of the table) is a Triton kernel on CUDA.

    A subclass of ``torch.nn.Embedding`` with the same parameter (``weight``, ``(num_embeddings,
    embedding_dim)``) and ``state_dict``. The lookup is ``F.embedding``; the gradient of the table sums
    the output gradients of each id's tokens in fp32, in token order, and writes each row once (see
    :func:`rotalabs_accel.functional.embedding`): deterministic, and its kernels take 1.6-2.7x less
    GPU time than PyTorch's backward at a language model's shapes (benchmarks/results/embedding-*;
    a step timed alone is bound by the host issuing the sort and launches, which a training step
    hides). On CPU tensors, or without Triton, PyTorch's backward runs instead.

    ``max_norm``, ``scale_grad_by_freq`` and ``sparse`` are not supported (they raise ``ValueError``).

    Args:
        num_embeddings, embedding_dim, padding_idx, device, dtype: as ``nn.Embedding``.

    Example:
        >>> import torch
        >>> from rotalabs_accel.kernels.embedding import TritonEmbedding
        >>> emb = TritonEmbedding(100, 16, padding_idx=0)
        >>> emb(torch.tensor([[0, 5, 7]])).shape
        torch.Size([1, 3, 16])
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        _weight: torch.Tensor | None = None,
        _freeze: bool = False,
    ) -> None:
        unsupported = _unsupported(max_norm, scale_grad_by_freq, sparse)
        if unsupported:
            raise ValueError(f"TritonEmbedding: {unsupported}")
        # _weight / _freeze: what nn.Embedding.from_pretrained passes (as nn.Embedding takes them)
        super().__init__(num_embeddings, embedding_dim, padding_idx, device=device, dtype=dtype,
                         _weight=_weight, _freeze=_freeze)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return embedding(input, self.weight, self.padding_idx)

    @classmethod
    def from_embedding(cls, module: nn.Embedding) -> TritonEmbedding:
        """A ``TritonEmbedding`` holding ``module``'s very ``weight`` Parameter (no copy).

        Args:
            module: an ``nn.Embedding`` whose ``forward`` is ``nn.Embedding.forward`` (a subclass that
                scales its output is not a plain lookup), without ``max_norm``, ``scale_grad_by_freq``
                or ``sparse``.

        Returns:
            The new module, in ``module``'s training mode; tied weights stay tied (same Parameter).

        Raises:
            TypeError: not an ``nn.Embedding``, or a subclass with its own ``forward``.
            ValueError: an unsupported option is set.

        Example:
            >>> import torch
            >>> from rotalabs_accel.kernels.embedding import TritonEmbedding
            >>> plain = torch.nn.Embedding(10, 4)
            >>> TritonEmbedding.from_embedding(plain).weight is plain.weight
            True
        """
        fn = "TritonEmbedding.from_embedding"
        if not isinstance(module, nn.Embedding):
            raise TypeError(f"{fn}: expected a torch.nn.Embedding, got {type(module).__name__}")
        if type(module).forward not in (nn.Embedding.forward, cls.forward):
            raise TypeError(
                f"{fn}: {type(module).__name__} overrides nn.Embedding.forward (it may scale or offset "
                "the rows), so a plain lookup would not compute the same function"
            )
        unsupported = _unsupported(module.max_norm, module.scale_grad_by_freq, module.sparse)
        if unsupported:
            raise ValueError(f"{fn}: {unsupported}")
        new = cls(module.num_embeddings, module.embedding_dim, module.padding_idx, device="meta",
                  dtype=module.weight.dtype)
        new.weight = module.weight
        new.train(module.training)
        return new


def _unsupported(max_norm, scale_grad_by_freq: bool, sparse: bool) -> str | None:
    if max_norm is not None:
        return "max_norm is not supported (it renormalizes rows in place at each lookup)"
    if scale_grad_by_freq:
        return "scale_grad_by_freq is not supported"
    if sparse:
        return "sparse gradients are not supported (the kernel writes a dense table gradient)"
    return None
