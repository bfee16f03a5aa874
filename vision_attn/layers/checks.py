"""Input validation shared by models and explain functions: clear errors instead of shape asserts."""

import torch

try:
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing
except ImportError:  # torch < 2.5: only the flag that is also set by torch.export
    from torch.fx._symbolic_trace import is_fx_tracing as is_fx_symbolic_tracing

__all__ = ["check_images", "is_tracing", "to_2tuple_int"]


@torch.jit.unused  # callers test ``torch.jit.is_scripting()`` first, so TorchScript never calls it
def is_tracing() -> bool:
    """Return True while ``torch.fx`` symbolic tracing or ``torch.jit.trace`` runs.

    Shape checks that need concrete values are skipped then (inside a traced graph they would be proxies); under
    ``torch.jit.script`` the callers skip them statically with ``if not torch.jit.is_scripting()``. ``torch.export``
    and ``torch.compile`` see concrete shapes, so the checks still run there (as guards, at no run-time cost).
    """
    return torch.jit.is_tracing() or is_fx_symbolic_tracing()


def to_2tuple_int(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    """Return ``value`` as an ``(h, w)`` tuple of positive ints, or raise a ``ValueError`` naming ``name``."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    return pair  # type: ignore[return-value]


def check_images(
    x: torch.Tensor,
    in_chans: int | None = None,
    img_size: tuple[int, int] | None = None,
    divisor: tuple[int, int] | None = None,
    min_size: tuple[int, int] | None = None,
    name: str = "x",
) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``x`` is a floating ``[B, C, H, W]`` image batch that fits.

    ``img_size`` demands an exact spatial size, ``divisor`` that H and W are multiples of it, ``min_size`` a
    minimum. Returns nothing.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B, C, H, W], got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} has dtype {x.dtype}; expected a floating dtype (float32/float16/bfloat16); "
            "convert with x.float() and normalize first"
        )
    if x.ndim != 4:
        raise ValueError(f"{name} must be 4-D [B, C, H, W], got {x.ndim}-D with shape {tuple(x.shape)}")
    _, c, h, w = x.shape
    if in_chans is not None and c != in_chans:
        raise ValueError(f"{name} has {c} channels (shape {tuple(x.shape)}); the model expects in_chans={in_chans}")
    if img_size is not None and (h, w) != tuple(img_size):
        raise ValueError(
            f"{name} has spatial size {h}x{w}; the model expects img_size={img_size[0]}x{img_size[1]} "
            "(build it with dynamic_img_size=True to accept other sizes)"
        )
    if divisor is not None and (h % divisor[0] or w % divisor[1]):
        raise ValueError(
            f"{name} has spatial size {h}x{w}, which is not divisible by patch_size {divisor[0]}x{divisor[1]}"
        )
    if min_size is not None and (h < min_size[0] or w < min_size[1]):
        raise ValueError(f"{name} has spatial size {h}x{w}; the minimum is {min_size[0]}x{min_size[1]}")
