"""Peak device memory of real code on a CPU-only machine: run it on the meta device and count live storages.

Meta tensors carry shapes and dtypes but no data, so the full FLUX.1-Kontext-dev transformer (11.9 B parameters)
runs forward, backward and an optimizer step in seconds without memory. Three pieces make a meta run allocate
what a CUDA run allocates:

- `LiveStorages` (a `TorchDispatchMode`, below autograd): every meta storage an aten op creates is counted until it
  dies (a weakref finalizer on the storage; views and in-place results share their base's storage and are counted
  once), in the CUDA caching allocator's 512-byte blocks. Its `peak` is what `torch.cuda.max_memory_allocated`
  reports for the same code, less what CUDA kernels allocate internally (cuBLAS workspaces, flash attention's
  backward accumulator: tens of MB). It also answers what meta cannot: `.item()` gives 0 and a copy to the CPU
  gives zeros, so code that logs a loss or turns a decoded image into a PIL image runs unchanged.
- `CudaAutocast` (a `TorchFunctionMode`, above autograd, where `torch.autocast` acts): autocast has no meta kernel,
  so while the code has CPU autocast on (an `Accelerator(cpu=True)` with bf16 does), it applies CUDA autocast's
  cast lists (aten/src/ATen/autocast_mode.cpp: matmuls, linear, conv and attention in bf16; norms, losses, pow,
  exp, upsampling in fp32; softmax and sums with an fp32 result) and its cache of casts of fp32 leaf parameters
  (the fp32 LoRA weights' bf16 copies, kept until the outermost autocast region ends). The casts are real
  differentiable `.to()` calls, so autograd saves what it saves on a GPU.
- Attention: on meta, `scaled_dot_product_attention` always takes the math path, which materialises the attention
  matrix a GPU never holds. `CudaAutocast` routes it to the fused kernels' own aten ops
  (`_scaled_dot_product_flash_attention`, `_scaled_dot_product_efficient_attention`, which have meta kernels and
  their own backward), choosing as PyTorch does on a GPU: flash for fp16/bf16 with head dim ≤ 256 and no mask,
  else memory-efficient; `attention="math"` leaves the math path (what `attentionBackend: math` costs).

Nothing here is specific to FLUX; `bench.memory` drives it with the trainer's code.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves, tree_map

aten = torch.ops.aten
BLOCK = 512  # the CUDA caching allocator rounds every allocation up to a multiple of 512 bytes


def _rounded(nbytes: int) -> int:
    return -(-nbytes // BLOCK) * BLOCK


class LiveStorages(TorchDispatchMode):
    """Bytes of live meta storages: now, at the peak, and at the peak of each named phase."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.phase_peaks: dict[str, int] = {}
        self._phase: str | None = None

    # ---- counting ---------------------------------------------------------------------------------------------
    def track(self, tensor: torch.Tensor) -> None:
        if is_traceable_wrapper_subclass(tensor):  # e.g. optimum-quanto's int8/fp8 weights: count their parts
            for name in tensor.__tensor_flatten__()[0]:
                self.track(getattr(tensor, name))
            return
        if tensor.device.type != "meta":
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._live:
            return
        nbytes = _rounded(storage.nbytes())
        if nbytes == 0:
            return
        self._live[key] = nbytes
        weakref.finalize(storage, self._release, key)
        self.current += nbytes
        if self.current > self.peak:
            self.peak = self.current
        if self._phase is not None and self.current > self.phase_peaks.get(self._phase, 0):
            self.phase_peaks[self._phase] = self.current

    def track_module(self, module: torch.nn.Module) -> None:
        """Count a module's parameters and buffers made before this mode was entered."""
        for tensor in [*module.parameters(), *module.buffers()]:
            self.track(tensor)

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.current
        self.phase_peaks = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Record the peak reached while the block runs under `name` (phases do not nest)."""
        previous, self._phase = self._phase, name
        self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), self.current)
        try:
            yield
        finally:
            self._phase = previous

    # ---- the mode ---------------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and first.device.type == "meta":
            if func is aten._local_scalar_dense.default:  # .item(), float(t): meta has no value
                return False if first.dtype is torch.bool else 0 if not first.is_floating_point() else 0.0
            if func is aten._to_copy.default and _is_cpu(kwargs.get("device")):
                return torch.zeros(first.shape, dtype=kwargs.get("dtype") or first.dtype)  # .cpu(), .numpy()
        if func is aten.copy_.default and _is_cpu(first.device if isinstance(first, torch.Tensor) else None):
            source = args[1]
            if isinstance(source, torch.Tensor) and source.device.type == "meta":
                return first.zero_()
        out = func(*args, **kwargs)
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.track(leaf)
        return out


def _is_cpu(device: Any) -> bool:
    return device is not None and torch.device(device).type == "cpu"


# ---- CUDA autocast, emulated for meta tensors ---------------------------------------------------------------------

LOWER, FP32, FP32_RESULT = "lower", "fp32", "fp32_result"
_T = torch.Tensor
CUDA_AUTOCAST_POLICY: dict[Any, str] = {
    # lower_precision_fp: run in the autocast dtype
    **{f: LOWER for f in (F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d)},
    **{f: LOWER for f in (F.conv_transpose3d, F.prelu, F.bilinear, F.scaled_dot_product_attention)},
    **{f: LOWER for f in (torch.matmul, _T.matmul, _T.__matmul__, _T.__rmatmul__, torch.mm, _T.mm, torch.bmm)},
    **{f: LOWER for f in (_T.bmm, torch.baddbmm, _T.baddbmm, torch.addmm, _T.addmm, torch.addbmm, torch.einsum)},
    **{f: LOWER for f in (torch.mv, _T.mv, torch.addmv, torch.addr, torch.chain_matmul)},
    # fp32: run in float32
    **{f: FP32 for f in (F.layer_norm, torch.layer_norm, F.group_norm, torch.group_norm, F.mse_loss, F.l1_loss)},
    **{f: FP32 for f in (F.smooth_l1_loss, F.huber_loss, F.softplus, F.interpolate, F.cosine_similarity)},
    **{f: FP32 for f in (F.binary_cross_entropy_with_logits, F.kl_div, F.nll_loss, torch.cdist, torch.logsumexp)},
    **{f: FP32 for f in (torch.exp, _T.exp, torch.expm1, torch.log, _T.log, torch.log1p, torch.log2, torch.log10)},
    **{f: FP32 for f in (torch.pow, _T.pow, _T.__pow__, _T.__rpow__, torch.rsqrt, _T.rsqrt, torch.reciprocal)},
    **{f: FP32 for f in (_T.reciprocal, torch.erfinv, torch.acos, torch.asin, torch.cosh, torch.sinh, torch.tan)},
    **{f: FP32 for f in (torch.norm, _T.norm, torch.renorm, torch.dist, torch.pdist)},
    # fp32_set_opt_dtype: a float32 result unless a dtype is given
    **{f: FP32_RESULT for f in (F.softmax, torch.softmax, _T.softmax, F.log_softmax, torch.log_softmax)},
    **{f: FP32_RESULT for f in (_T.log_softmax, torch.sum, _T.sum, torch.prod, _T.prod, torch.cumsum, _T.cumsum)},
    **{f: FP32_RESULT for f in (torch.cumprod, _T.cumprod, torch.linalg.vector_norm, torch.linalg.matrix_norm)},
}
ATTENTION_CHOICES = ("auto", "flash", "efficient", "math")


class CudaAutocast(TorchFunctionMode):
    """CUDA autocast's casts for meta tensors while CPU autocast is on, and fused attention kernels (see module doc)."""

    def __init__(self, attention: str = "auto") -> None:
        super().__init__()
        if attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {attention!r}")
        self.attention = attention
        self._cache: dict[int, tuple[weakref.ref, torch.Tensor]] = {}
        self._clear: Any = None
        self._depth = 0

    def __enter__(self):  # type: ignore[no-untyped-def]
        if self._depth == 0:
            # torch.autocast's __exit__ clears its cast cache when the outermost region ends: clear ours with it.
            self._clear = original = torch.clear_autocast_cache

            def clear() -> None:
                self._cache.clear()
                original()

            torch.clear_autocast_cache = clear
        self._depth += 1
        return super().__enter__()

    def __exit__(self, *exc):  # type: ignore[no-untyped-def]
        self._depth -= 1
        if self._depth == 0:
            torch.clear_autocast_cache = self._clear
            self._cache.clear()
        return super().__exit__(*exc)

    def gradient_checkpointing_func(self):  # type: ignore[no-untyped-def]
        """diffusers' checkpointing function (`torch.utils.checkpoint`, non-reentrant) for
        `enable_gradient_checkpointing(gradient_checkpointing_func=...)`, with this mode back on while a block is
        recomputed in the backward pass: autograd runs the recomputation with the torch-function mode stack empty,
        where a GPU run re-enters CUDA autocast (the checkpoint saves and restores autocast state, not modes)."""

        def run_checkpointed(module: torch.nn.Module, *args: Any) -> Any:
            def block(*inner: Any) -> Any:
                if self in _get_current_function_mode_stack():
                    return module(*inner)
                with self:
                    return module(*inner)

            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)

        return run_checkpointed

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        enabled = torch.is_autocast_enabled("cpu")
        policy = CUDA_AUTOCAST_POLICY.get(func) if enabled else None
        if policy == LOWER:
            dtype = torch.get_autocast_dtype("cpu")
            args, kwargs = tree_map(lambda x: self._cast(x, dtype, cache=True), (args, kwargs))
        elif policy == FP32:
            args, kwargs = tree_map(lambda x: self._cast(x, torch.float32, cache=False), (args, kwargs))
        elif policy == FP32_RESULT and kwargs.get("dtype") is None and any(map(_lower_precision, tree_leaves(args))):
            kwargs = {**kwargs, "dtype": torch.float32}
        if func is F.scaled_dot_product_attention:
            return self._attention(*args, **kwargs)
        return func(*args, **kwargs)

    def _cast(self, value: Any, dtype: torch.dtype, cache: bool) -> Any:
        if not _meta_float(value) or value.dtype == dtype:
            return value
        if not (cache and value.is_leaf and value.requires_grad and value.dtype == torch.float32):
            return value.to(dtype)
        hit = self._cache.get(id(value))
        if hit is not None and hit[0]() is value:
            return hit[1]
        cast = value.to(dtype)
        self._cache[id(value)] = (weakref.ref(value), cast)
        return cast

    def _attention(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **extra):  # type: ignore[no-untyped-def]
        if query.device.type != "meta" or self.attention == "math" or extra.get("enable_gqa"):
            return F.scaled_dot_product_attention(
                query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **extra
            )
        flash_ok = query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= 256 and attn_mask is None
        if self.attention == "flash" or (self.attention == "auto" and flash_ok):
            return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, scale=scale)[0]
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        return aten._scaled_dot_product_efficient_attention(
            query, key, value, attn_mask, needs_grad, dropout_p, is_causal, scale=scale
        )[0]


def _lower_precision(value: Any) -> bool:
    return _meta_float(value) and value.dtype in (torch.float16, torch.bfloat16)


def _meta_float(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type == "meta" and value.is_floating_point()


@contextlib.contextmanager
def meta_gpu(attention: str = "auto") -> Iterator[tuple[LiveStorages, CudaAutocast]]:
    """Count live meta storages while code runs as it would on a CUDA GPU (autocast lists, fused attention)."""
    tracker = LiveStorages()
    autocast = CudaAutocast(attention)
    with autocast, tracker:
        yield tracker, autocast
