"""The stride-2 convolutions of the encoder and decoder, reformulated so that XLA:CPU runs them fast.

XLA:CPU lowers `lax.conv_transpose` (an lhs-dilated convolution) and, worse, its gradients to slow
generic loops, far below the machine's matmul rate (docs/performance.md). `conv_transpose_s2` computes exactly what
`flax.linen.ConvTranspose(O, (k, k), strides=(2, 2), padding='VALID')` computes, with
ordinary stride-1 convolutions, matmuls and pads/reshapes in both passes (and, in some of the
gradients, one gather of shifted windows):

  flax's transposed conv (transpose_kernel=False) scatters each input pixel through the spatially
  flipped kernel, y[2i + p, 2j + q] += x[i, j] @ S[p, q] with S = kernel[::-1, ::-1]. Writing
  p = 2a + r (r in {0, 1}, a < A = ceil(k / 2)), output phase (r, s) is an ordinary correlation of
  x with the 2x2 polyphase sub-kernels S[2a + r, 2b + s]:
    forward   one stride-1 conv of x (padded by A - 1) with all four phases as 4 * O output
              channels, then depth-to-space ("sub-pixel" convolution); or, where that conv would
              mostly multiply padding (tiny inputs), one matmul x @ S followed by an overlap-add;
    d/dx      one stride-1 VALID conv of space-to-depth(dy) with the phase kernels;
    d/dkernel A^2 matmuls x^T @ shifted windows of space-to-depth(dy), taps past k skipped;
    or, for even k, both gradients from the A^2 windows gathered once side by side: dx one
              matmul of them with the phase kernels, d/dkernel one matmul x^T @ them (`_im2col`);
    or the transpose of the forward's matmul form, whatever form the forward took: each input
              pixel's k x k patch of dy gathered once, dx = patches @ S^T and
              d/dkernel = x^T @ patches (`_backward_matmul`), no zero taps for odd k.
The stride-1 convolutions above are themselves matmuls (`_conv_s1`): the shifted windows side by
side in channels and one matmul; one matmul per tap, summed; one matmul of the unshifted input with
all taps side by side, whose per-tap outputs are then shifted and summed; or XLA's stride-1 conv for
narrow layers. The first copies a * b input windows, the second slices them for its matmuls, the
third copies a * b outputs instead, so which is fastest depends on the channels in and out. Which
of these formulations (config.CONV_IMPLS, XLA's own strided op among them) each layer uses is
measured once per machine and shape (`layer_impl`, planet_jax.autotune), for the forward pass and
the gradients apart ('f/b': `_two_pass`), since the fastest differs between CPUs, between CPUs and
accelerators, and between the passes. Everything is pure jnp/lax, so it
also runs (and differentiates) on GPU/TPU.

`dtype` ('float32' or 'bfloat16') is the operand type of every matmul in both passes; products are
accumulated and returned in float32. bfloat16 speeds up the matmuls on CPUs with native bf16
dot products (and on TPUs) at a relative error of about 2^-8 per operand (tests/test_ops.py
states the tolerance against float32).

The decoder's first transposed conv reads the 1x1 output of a dense layer with no nonlinearity
between them; `dense_conv_transpose_1x1` computes the two as one affine map.

`Deconv` is a drop-in for that flax layer: same parameter names, shapes and initialisers, so
parameters are interchangeable between `fast=True` and `fast=False`.

The encoder's stride-2 convolutions have the same problem in their gradients (the input gradient of
a strided conv is an lhs-dilated conv). `conv_s2` computes `flax.linen.Conv(O, (k, k), (2, 2),
'VALID')` for even k by matmuls on x seen, without moving anything, as rows in pairs with each
column pair's channels side by side: 2 (k/2)^2 windows of 2C channels, each a slice
(`_conv_s2_paired_rows`); or as space-to-depth (2x2 blocks into channels) and a stride-1
correlation (`_conv_s1`: XLA's conv for narrow layers, or 'outer'). Its gradients are pads, adds
and matmuls. `Conv` is the matching drop-in layer.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import math
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from planet_jax import autotune
from planet_jax.config import CONV_IMPLS, MATMUL_DTYPES, check_choice, conv_impl_pin

_DN = ("NHWC", "HWIO", "NHWC")

# Forward by matmul + overlap-add instead of the phase conv when the phase conv would do more than
# this many times the exact multiply-adds (it pads the input by A - 1 on each side; the matmul form
# does (2A / k)^2 times them, with the zero taps of an odd k): the decoder's
# 1x1 -> 5x5 and 5 -> 13 layers use the matmul, its 13 -> 30 and 30 -> 64 layers the conv.
_MAX_PHASE_CONV_WASTE = 2.0


# In the 'mixed' formulation, stride-1 convolutions with at most this product of input and output
# channels use XLA's conv (see `_conv_s1`): such narrow layers are memory-bound, and XLA:CPU's conv
# ran them faster than any matmul form on the machine this default was set on.
_MAX_CONV_CHANNELS = 256

# How a stride-2 layer is computed (config.CONV_IMPLS); all give flax's result (tests/test_ops.py),
# forward and backward:
#   xla     XLA's own strided (or lhs-dilated) convolution and its gradients, as flax computes it;
#   conv    the stride-1 reformulation below, its correlations by XLA's stride-1 conv (float32);
#   im2col  the reformulation, each correlation as one matmul of the shifted windows side by side;
#   taps    the reformulation, each correlation as one matmul per kernel tap, summed;
#   outer   the reformulation, each correlation as one matmul of the input with every tap's weights
#           side by side, then the taps' outputs shifted into place and summed;
#   mixed   the reformulation, per correlation: conv when narrow (_MAX_CONV_CHANNELS), otherwise
#           im2col or taps, whichever copies the narrower of input and output; but the transposed
#           conv's gradients are those of its forward's matmul form, one gather of dy's patches and
#           two matmuls (docs/performance_speed.md, ninth session), and the strided conv's
#           matmul form is im2col (its windows, slices of x's paired rows, copy as much as taps');
#   'f/b'   (two of the above) formulation f in the forward pass, b in the gradients.
# 'mixed' is the default when nothing is measured; `layer_impl` measures (planet_jax.autotune).
DEFAULT_CONV_IMPL = "mixed"
# A layer leaves DEFAULT_CONV_IMPL only for a formulation that takes at most 60% of its time: layers
# are timed alone, and inside the training step formulations a quarter to a third faster alone made
# the step slower on one CPU, while formulations twice as fast alone made it faster on another
# (docs/performance_speed.md); the gaps that matter most (XLA's own conv against the
# reformulations, on a CPU or an accelerator) are many-fold.
_LAYER_MIN_GAIN = 0.4
# Calls of a layer per timed candidate, run as a loop (see `_timed_layer`).
_LOOP_GROUPS = 2
# The enclosing `conv_impl_scope`'s spec (ModelConfig.conv_impl syntax), read when a layer is traced.
# With what a pass left 'auto' by that spec is replaced ('auto': measured, or 'default').
_CONV_IMPL_PIN: contextvars.ContextVar[tuple[str, str]] = contextvars.ContextVar("conv_impl",
                                                                                 default=("auto", "auto"))


def _cast(x: jax.Array, dtype: str) -> jax.Array:
    return x if dtype == "float32" else x.astype(dtype)


def dot(x: jax.Array, w: jax.Array, dtype: str) -> jax.Array:
    """x (..., K) @ w (K, N) with operands cast to `dtype` ('float32' or 'bfloat16'), accumulated
    and returned in float32 (`jnp.dot`'s preferred_element_type): float32 (..., N)."""
    return jnp.dot(_cast(x, dtype), _cast(w, dtype), preferred_element_type=jnp.float32)


def _dot_t(x: jax.Array, y: jax.Array, dtype: str) -> jax.Array:
    """x (..., K)^T @ y (..., N) summed over all leading axes -> (K, N), float32."""
    x, y = _cast(x.reshape(-1, x.shape[-1]), dtype), _cast(y.reshape(-1, y.shape[-1]), dtype)
    return lax.dot_general(x, y, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x: jax.Array, w: jax.Array, dtype: str) -> jax.Array:
    """`dot` whose backward matmuls also take `dtype` operands (autodiff would mix dtypes)."""
    return dot(x, w, dtype)


def _matmul_fwd(x, w, dtype):
    return dot(x, w, dtype), (_cast(x, dtype), _cast(w, dtype))


def _matmul_bwd(dtype, res, g):
    x, w = res
    return dot(g, w.T, dtype), _dot_t(x, g, dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _matmul_of(dtype: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """x @ w with `dtype` operands in both passes: plain `jnp.dot` for float32, else `_matmul`."""
    return jnp.dot if dtype == "float32" else functools.partial(_matmul, dtype=dtype)


def _conv_s1(x: jax.Array, w: jax.Array, dtype: str, impl: str) -> jax.Array:
    """Stride-1 VALID correlation of x (B, H, W, C) with w (a, b, C, N), formulated as `impl` says
    (see CONV_IMPLS): XLA's conv ('conv', float32 whatever `dtype`), the a * b shifted windows
    concatenated along channels and one matmul ('im2col'), one matmul per tap and a sum ('taps'),
    or one matmul x @ (C, a * b * N) over every input pixel and a sum of the a * b shifted outputs
    ('outer'); 'mixed' takes 'conv' for narrow layers (C * N up to _MAX_CONV_CHANNELS) and otherwise
    'im2col' or 'taps' by the narrower of input and output. Differentiable, with `dtype` operands in
    the backward matmuls too.
    """
    a, b, c, n = w.shape
    if impl == "mixed":
        impl = "conv" if c * n <= _MAX_CONV_CHANNELS else "im2col" if c < n else "taps"
    if impl == "conv":
        return _narrow_conv_s1(x, w)
    if impl == "outer":
        ho, wo = x.shape[1] - a + 1, x.shape[2] - b + 1
        y = _matmul_of(dtype)(x, w.transpose(2, 0, 1, 3).reshape(c, a * b * n)).reshape(x.shape[:3] + (a * b, n))
        # y[:, m + i, n + j, tap (i, j)] is tap (i, j)'s contribution to output (m, n).
        return sum(y[:, i:i + ho, j:j + wo, i * b + j] for i in range(a) for j in range(b))
    return _windows_times_taps(_windows(x, a, b), w.reshape(a * b, c, n), dtype, impl)


def _windows_times_taps(windows: list[jax.Array], taps: jax.Array, dtype: str, impl: str) -> jax.Array:
    """sum_t windows[t] @ taps[t] for T windows (B, Ho, Wo, C) and taps (T, C, N), as one matmul of
    the windows side by side ('im2col') or one matmul per window ('taps'), `dtype` operands."""
    mm = _matmul_of(dtype)
    if impl == "im2col":
        return mm(jnp.concatenate(windows, -1), taps.reshape(-1, taps.shape[-1]))
    return sum(mm(win, tap) for win, tap in zip(windows, taps))


def _im2col(x: jax.Array, a: int, b: int, stride: int = 1) -> jax.Array:
    """The a * b shifted windows of x (B, H, W, C) side by side in channels, (B, Ho, Wo, (i, j, C))
    for window (i, j) with Ho = (H - a) // stride + 1 (Wo alike); with stride 2, each output
    position's a x b patch of x. One gather from x seen as (B * H, W * C), whose slice per output
    position is its patch's a rows of b * C contiguous numbers: XLA:CPU copies the decoder's
    gradient windows this way faster than one pixel's C numbers at a time, or than it concatenates
    them (docs/performance_speed.md; not 2 x 2 windows of 12 channels, which the decoder's layers,
    k 5 and 6, never gather).
    Not for autodiff on a CPU (the gather's transpose is a scatter): the backward passes use it,
    where nothing is differentiated except for higher-order gradients."""
    bsz, h, w, c = x.shape
    ho, wo = (h - a) // stride + 1, (w - b) // stride + 1
    rows = h * jnp.arange(bsz)[:, None, None] + stride * jnp.arange(ho)[None, :, None]
    cols = stride * c * jnp.arange(wo)[None, None, :]
    starts = jnp.stack(jnp.broadcast_arrays(rows, cols), -1)        # (B, Ho, Wo, 2): patch's first row, column
    dims = lax.GatherDimensionNumbers(offset_dims=(3, 4), collapsed_slice_dims=(), start_index_map=(0, 1))
    patches = lax.gather(x.reshape(bsz * h, w * c), starts, dims, slice_sizes=(a, b * c),
                         mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)
    return patches.reshape(bsz, ho, wo, a * b * c)


def _windows(x: jax.Array, a: int, b: int) -> list[jax.Array]:
    """The a * b shifted windows of x (B, H, W, C) that a VALID (a, b) correlation reads."""
    ho, wo = x.shape[1] - a + 1, x.shape[2] - b + 1
    return [x[:, i:i + ho, j:j + wo] for i in range(a) for j in range(b)]


@jax.custom_vjp
def _narrow_conv_s1(x: jax.Array, w: jax.Array) -> jax.Array:
    """XLA's stride-1 VALID conv (float32), whose kernel gradient is one matmul per shifted window:
    XLA:CPU's own kernel-gradient conv was far slower than matmuls for the cpu preset's first
    encoder layer (12 -> 16 channels after space-to-depth), and so was one matmul of the windows
    side by side, whose copy of so few channels costs more than the matmuls (docs/performance_speed.md)."""
    return lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=_DN)


def _narrow_conv_s1_fwd(x, w):
    return _narrow_conv_s1(x, w), (x, w)


def _narrow_conv_s1_bwd(res, dy):
    x, w = res
    a, b, c, n = w.shape
    # d/dx: the full correlation of dy with the spatially flipped kernel, channels swapped.
    dx = lax.conv_general_dilated(dy, jnp.flip(w, (0, 1)).swapaxes(2, 3), (1, 1),
                                  ((a - 1, a - 1), (b - 1, b - 1)), dimension_numbers=_DN)
    # d/dw[i, j] = sum over pixels of window(i, j)^T dy.
    dw = jnp.stack([_dot_t(win, dy, "float32") for win in _windows(x, a, b)]).reshape(a, b, c, n)
    return dx, dw


_narrow_conv_s1.defvjp(_narrow_conv_s1_fwd, _narrow_conv_s1_bwd)


@jax.custom_vjp
def relu(x: jax.Array) -> jax.Array:
    """max(x, 0), whose backward reads the output (kept anyway as the next layer's input) instead of
    keeping a separate mask of x > 0, so less is saved for the backward pass. Gradients as `jax.nn.relu` (0 at x = 0), by reverse mode only (a custom VJP, like
    `conv_transpose_s2`: forward-mode jvp is not defined)."""
    return jnp.maximum(x, 0)


def _relu_fwd(x):
    y = jnp.maximum(x, 0)
    return y, y


def _relu_bwd(y, g):
    return (jnp.where(y > 0, g, 0),)


relu.defvjp(_relu_fwd, _relu_bwd)


def _phase_taps(kernel: jax.Array) -> jax.Array:
    """(k, k, I, O) flax kernel -> (A, 2, A, 2, I, O) scatter taps S[2a + r, 2b + s], zero past k."""
    k = kernel.shape[0]
    pad = 2 * ((k + 1) // 2) - k
    s = jnp.pad(kernel[::-1, ::-1], ((0, pad), (0, pad), (0, 0), (0, 0)))
    a = s.shape[0] // 2
    return s.reshape((a, 2, a, 2) + kernel.shape[2:])


def _depth_to_space(y: jax.Array, channels: int) -> jax.Array:
    """(B, H, W, (r, s, O)) -> (B, 2H, 2W, O) with y_out[2m + r, 2n + s] = y[m, n, r, s]."""
    b, h, w, _ = y.shape
    y = y.reshape(b, h, w, 2, 2, channels).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(b, 2 * h, 2 * w, channels)


def _space_to_depth(y: jax.Array) -> jax.Array:
    """Inverse of `_depth_to_space`: (B, 2H, 2W, O) -> (B, H, W, (r, s, O))."""
    b, h2, w2, c = y.shape
    y = y.reshape(b, h2 // 2, 2, w2 // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(b, h2 // 2, w2 // 2, 4 * c)


def check_dtype(dtype: str) -> str:
    """`dtype` if `dot` takes it (config.MATMUL_DTYPES); ValueError (one line) otherwise."""
    return check_choice("dtype", dtype, MATMUL_DTYPES)


def _passes_pin(pin: str) -> tuple[str, str]:
    """'f' or 'f/b' (an impl, or a layer's pin: 'auto', 'default', an impl) -> (forward, gradients)."""
    fwd, sep, bwd = pin.partition("/")
    return fwd, bwd if sep else fwd


def _passes(impl: str) -> tuple[str, str]:
    """impl 'f' or 'f/b' -> (forward formulation, gradients' formulation), each one of CONV_IMPLS.
    Raises ValueError otherwise."""
    passes = _passes_pin(impl)
    if not all(p in CONV_IMPLS for p in passes):
        raise ValueError(f"conv impl must be one of {', '.join(CONV_IMPLS)}, or two of them as "
                         f"'forward/gradients', got {impl!r}")
    return passes


def _check_kernel(x: jax.Array, kernel: jax.Array, k_ok: bool, requirement: str) -> None:
    k = kernel.shape[0]
    if kernel.ndim != 4 or kernel.shape[1] != k or x.shape[-1] != kernel.shape[2] or not k_ok:
        raise ValueError(f"kernel {kernel.shape} must be (k, k, {x.shape[-1]}, O) with {requirement}")


def _apply(op: Callable, x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
    """op on x (..., H, W, I) with its leading axes flattened to one batch axis, then + bias."""
    lead = x.shape[:-3]
    y = op(x.reshape((-1,) + x.shape[-3:]), kernel)
    y = y.reshape(lead + y.shape[1:])
    return y if bias is None else y + bias


def _out_size(n: int, k: int) -> int:
    return 2 * (n - 1) + k


def _scatter_matrix(kernel: jax.Array) -> jax.Array:
    """(k, k, I, O) flax kernel -> S = kernel[::-1, ::-1] as one (I, (p, q, O)) matrix: row x[i, j]
    times it gives every tap's contribution y[2i + p, 2j + q] (module docstring)."""
    k, _, c_in, c_out = kernel.shape
    return kernel[::-1, ::-1].transpose(2, 0, 1, 3).reshape(c_in, k * k * c_out)


def _forward_is_matmul(h: int, w: int, k: int) -> bool:
    """Whether an (h, w) input takes `_forward_matmul` rather than the phase conv, which would do
    more than _MAX_PHASE_CONV_WASTE times the exact multiply-adds."""
    return _phase_conv_waste(h, w, k) > _MAX_PHASE_CONV_WASTE


def _phase_conv_waste(h: int, w: int, k: int) -> float:
    """Multiply-adds of the phase-conv forward over the exact count h * w * k^2 (per I * O)."""
    a = (k + 1) // 2
    return 4 * a * a * (h + a - 1) * (w + a - 1) / (h * w * k * k)


def _forward_phase_conv(x: jax.Array, kernel: jax.Array, dtype: str, impl: str) -> jax.Array:
    k, _, c_in, c_out = kernel.shape
    taps = _phase_taps(kernel)
    a = taps.shape[0]
    # Output phase (r, s) at (m, n) = sum_{a, b} x[m - a, n - b] S[2a + r, 2b + s]: a correlation of
    # x padded by A - 1 with the taps reversed along a and b.
    w = taps[::-1, :, ::-1].transpose(0, 2, 4, 1, 3, 5).reshape(a, a, c_in, 4 * c_out)
    xp = jnp.pad(x, ((0, 0), (a - 1, a - 1), (a - 1, a - 1), (0, 0)))
    y = _depth_to_space(_conv_s1(xp, w, dtype, impl), c_out)
    return y[:, :_out_size(x.shape[1], k), :_out_size(x.shape[2], k)]


def _forward_matmul(x: jax.Array, kernel: jax.Array, dtype: str) -> jax.Array:
    k, _, c_in, c_out = kernel.shape
    b, h, w, _ = x.shape
    taps = _phase_taps(kernel)                                  # (A, 2, A, 2, I, O): S, zeros past k
    a = taps.shape[0]
    # With S's zero taps past k (odd k) in the matrix, the matmul writes every pixel's contributions
    # in the (a, 2, a, 2) order the overlap-add reads, instead of its large product being padded after.
    s = taps.transpose(4, 0, 1, 2, 3, 5).reshape(c_in, 4 * a * a * c_out)
    cols = dot(x, s, dtype).reshape(b, h, w, a, 2, a, 2, c_out)
    # Overlap-add: tap (p, q) = (2a + r, 2b + s) of pixel (i, j) lands on phase (r, s) at (i + a, j + b).
    y = sum(jnp.pad(cols[:, :, :, i, :, j], ((0, 0), (i, a - 1 - i), (j, a - 1 - j), (0, 0), (0, 0), (0, 0)))
            for i in range(a) for j in range(a))
    y = y.transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * (h + a - 1), 2 * (w + a - 1), c_out)
    return y[:, :_out_size(h, k), :_out_size(w, k)]


def _forward(x: jax.Array, kernel: jax.Array, dtype: str, impl: str) -> jax.Array:
    if _forward_is_matmul(x.shape[1], x.shape[2], kernel.shape[0]):
        return _forward_matmul(x, kernel, dtype)
    return _forward_phase_conv(x, kernel, dtype, impl)


def _backward_matmul(x: jax.Array, kernel: jax.Array, dy: jax.Array, dtype: str
                     ) -> tuple[jax.Array, jax.Array]:
    """The gradients of the transposed conv (of `_forward_matmul`, the same linear map as the phase
    conv): dy's k x k patch under each input pixel, gathered once (the transpose of the
    overlap-add), then dx = patches @ S^T and dS = x^T @ patches, two matmuls over every pixel with
    no zero taps."""
    k, _, c_in, c_out = kernel.shape
    # Pixel (i, j)'s tap (p, q) landed on y[2i + p, 2j + q] (module docstring).
    patches = _im2col(dy, k, k, stride=2)                        # (B, h, w, (p, q, O))
    dx = dot(patches, _scatter_matrix(kernel).T, dtype)
    d_s = _dot_t(x, patches, dtype).reshape(c_in, k, k, c_out).transpose(1, 2, 0, 3)
    return dx, d_s[::-1, ::-1]


def _backward(x: jax.Array, kernel: jax.Array, dy: jax.Array, dtype: str, impl: str
              ) -> tuple[jax.Array, jax.Array]:
    k, _, c_in, c_out = kernel.shape
    b, h, w, _ = x.shape
    if impl == "mixed":
        return _backward_matmul(x, kernel, dy, dtype)
    a = (k + 1) // 2
    hp, wp = h + a - 1, w + a - 1
    dy = jnp.pad(dy, ((0, 0), (0, 2 * hp - dy.shape[1]), (0, 2 * wp - dy.shape[2]), (0, 0)))
    dyph = _space_to_depth(dy)                                  # (B, hp, wp, (r, s, O))
    taps = _phase_taps(kernel)                                  # (a, r, b, s, I, O)
    # dx[i, j] = sum_{a, b, r, s} dy[2(i + a) + r, 2(j + b) + s] S[2a + r, 2b + s]^T.
    w_dx = taps.transpose(0, 2, 1, 3, 5, 4).reshape(a, a, 4 * c_out, c_in)
    if k % 2 == 0 and impl == "im2col":
        # Both gradients read the same a * a windows of dy's phases: copied once, side by side, they
        # make dx one matmul and dS one matmul. (With odd k those matmuls would multiply the zero
        # taps past k as well; the products below skip them.)
        cols = _im2col(dyph, a, a)                              # (B, h, w, (a, b, r, s, O))
        dx = _matmul_of(dtype)(cols, w_dx.reshape(a * a * 4 * c_out, c_in))
        d_taps = _dot_t(x, cols, dtype).reshape(c_in, a, a, 2, 2, c_out)
        d_s = d_taps.transpose(1, 3, 2, 4, 0, 5).reshape(2 * a, 2 * a, c_in, c_out)[:k, :k]
        return dx, d_s[::-1, ::-1]
    dx = _conv_s1(dyph, w_dx, dtype, impl)
    # dS[2a + r, 2b + s] = sum_{batch, i, j} x[i, j]^T dy-phase (r, s)[i + a, j + b]: one matmul per
    # shift (a, b) over the phases whose tap exists (2a + r < k), so odd k wastes nothing.
    x, dyph = _cast(x, dtype), _cast(dyph.reshape(b, hp, wp, 2, 2, c_out), dtype)
    rows = []
    for i in range(a):
        r_n = min(2, k - 2 * i)
        row = []
        for j in range(a):
            s_n = min(2, k - 2 * j)
            win = dyph[:, i:i + h, j:j + w, :r_n, :s_n].reshape(b, h, w, r_n * s_n * c_out)
            g = _dot_t(x, win, dtype).reshape(c_in, r_n, s_n, c_out)
            row.append(jnp.pad(g, ((0, 0), (0, 2 - r_n), (0, 2 - s_n), (0, 0))))
        rows.append(jnp.stack(row))
    d_taps = jnp.stack(rows)                                    # (a, b, I, r, s, O)
    d_s = d_taps.transpose(0, 3, 1, 4, 2, 5).reshape(2 * a, 2 * a, c_in, c_out)[:k, :k]
    return dx, d_s[::-1, ::-1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_transpose_s2(x: jax.Array, kernel: jax.Array, dtype: str, impl: str) -> jax.Array:
    return _forward(x, kernel, dtype, impl)


def _conv_transpose_s2_fwd(x, kernel, dtype, impl):
    # x is kept as it came (usually a ReLU's output, which that ReLU keeps too); `_backward` casts it.
    return _forward(x, kernel, dtype, impl), (x, kernel)


def _conv_transpose_s2_bwd(dtype, impl, res, dy):
    return _backward(*res, dy, dtype, impl)


_conv_transpose_s2.defvjp(_conv_transpose_s2_fwd, _conv_transpose_s2_bwd)


def conv_transpose_s2(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None,
                      dtype: str = "float32", impl: str = DEFAULT_CONV_IMPL) -> jax.Array:
    """Stride-2 VALID transposed conv, equal to flax's `ConvTranspose(O, (k, k), (2, 2), 'VALID')`.

    x: (..., H, W, I) NHWC; kernel: (k, k, I, O) in flax's layout and convention; bias: (O,) or None;
    dtype: the matmuls' operand type (see the module docstring); impl: one of CONV_IMPLS, or 'f/b'
    for f in the forward pass and b in the gradients. The result is float32, (..., 2(H - 1) + k,
    2(W - 1) + k, O). Differentiable by reverse mode (a custom VJP that is itself differentiable);
    forward-mode (jvp) is defined only for impl 'xla'.
    Raises ValueError for a kernel that is not (k, k, I, O) with k >= 2, or an unknown dtype or impl.
    """
    # k = 1 is excluded: flax pads its output to 2H there (VALID keeps max(k, stride) per input).
    _check_kernel(x, kernel, kernel.shape[0] >= 2, "k >= 2")
    dtype, (fwd, bwd) = check_dtype(dtype), _passes(impl)
    if fwd != bwd:
        return _apply(functools.partial(_two_pass, op=conv_transpose_s2, dtype=dtype, fwd=fwd, bwd=bwd),
                      x, kernel, bias)
    if fwd == "xla":
        return conv_transpose_s2_plain(x, kernel, bias)
    return _apply(functools.partial(_conv_transpose_s2, dtype=dtype, impl=fwd), x, kernel, bias)


def conv_transpose_s2_plain(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None,
                            dtype: str = "float32") -> jax.Array:
    """The same op as flax computes it (`lax.conv_transpose`): the reference, and the GPU/TPU path
    when XLA's own lowering is preferred. Always float32 (`dtype` is accepted for a common signature)."""
    op = lambda x, kernel: lax.conv_transpose(x, kernel, (2, 2), "VALID", dimension_numbers=_DN)
    return _apply(op, x, kernel, bias)


def dense_conv_transpose_1x1(x: jax.Array, dense_kernel: jax.Array, dense_bias: jax.Array,
                             kernel: jax.Array, bias: jax.Array, dtype: str = "float32") -> jax.Array:
    """flax's `ConvTranspose(O, (k, k), (2, 2), 'VALID')` on `Dense(F)(x)` seen as a 1x1 image, as
    one affine map: the decoder's first two layers, which have no nonlinearity between them.

    x: (..., D); dense_kernel (D, F) and dense_bias (F,) in `nn.Dense`'s layout; kernel (k, k, F, O)
    and bias (O,) in `nn.ConvTranspose`'s; dtype: the operand type of the matmul with x (see the
    module docstring). Returns float32 (..., k, k, O). On a 1x1 input the transposed conv is
    y[p, q] = z @ S[p, q] + bias with S = kernel[::-1, ::-1] (module docstring), so with S as an
    (F, k k O) matrix the layers are x @ (W_d S) + (b_d S + bias); the product is taken in the order
    with fewer multiply-adds: W_d S first when there are many rows (D << F), z = x W_d first for few.
    Raises ValueError for kernels that do not chain (D, F) into (k, k, F, O).
    """
    k, k2, f, o = kernel.shape
    if dense_kernel.shape[1:] != (f,) or k2 != k or dense_kernel.shape[0] != x.shape[-1]:
        raise ValueError(f"dense kernel {dense_kernel.shape} and kernel {kernel.shape} do not chain "
                         f"(D, F) -> (k, k, F, O) for inputs {x.shape}")
    s = _scatter_matrix(kernel)
    rows, d = math.prod(x.shape[:-1]), x.shape[-1]
    mm = _matmul_of(check_dtype(dtype))
    if d * f * k * k * o + rows * d * k * k * o < rows * f * (d + k * k * o):
        y = mm(x, jnp.dot(dense_kernel, s)) + jnp.dot(dense_bias, s)
    else:
        y = mm(mm(x, dense_kernel) + dense_bias, s)
    return y.reshape(x.shape[:-1] + (k, k, o)) + bias


def _s2d_kernel(kernel: jax.Array) -> jax.Array:
    """(k, k, I, O) -> (k/2, k/2, (r, s, I), O) with w[2i + r, 2j + s] at [i, j, (r, s)]."""
    k, _, c_in, c_out = kernel.shape
    a = k // 2
    return kernel.reshape(a, 2, a, 2, c_in, c_out).transpose(0, 2, 1, 3, 4, 5).reshape(a, a, 4 * c_in, c_out)


def conv_s2(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None,
            dtype: str = "float32", impl: str = DEFAULT_CONV_IMPL) -> jax.Array:
    """Stride-2 VALID conv, equal to flax's `Conv(O, (k, k), strides=(2, 2), padding='VALID')`.

    x: (..., H, W, I) NHWC; kernel: (k, k, I, O) with k even; bias: (O,) or None. Returns
    (..., (H - k) // 2 + 1, (W - k) // 2 + 1, O). y[m, n] = sum_{p, q} x[2m + p, 2n + q] @ w[p, q]:
    with p = 2a + r and q = 2b + s, a sum over the (a, r, b) windows of x seen as (H/2, 2, W/2, 2I)
    (`_conv_s2_paired_rows`: 'im2col', 'taps'), or a stride-1 correlation of space-to-depth(x)
    ('conv' by XLA, 'outer' by one matmul and shifted sums), formulated as `impl` says (one of
    CONV_IMPLS, 'xla' being flax's op, 'mixed' being 'conv' for 4 I O up to _MAX_CONV_CHANNELS and
    'im2col' otherwise, or 'f/b' as in `conv_transpose_s2`), with `dtype` operands in the matmuls of
    both passes (the result is float32). Differentiable by reverse mode; forward-mode (jvp) is not
    defined for split 'f/b' formulations (a custom VJP).
    Raises ValueError for a kernel that is not (k, k, I, O) with k even, or an unknown dtype or impl.
    """
    _check_kernel(x, kernel, kernel.shape[0] % 2 == 0, "k even")
    dtype, (fwd, bwd) = check_dtype(dtype), _passes(impl)
    if fwd != bwd:
        return _apply(functools.partial(_two_pass, op=conv_s2, dtype=dtype, fwd=fwd, bwd=bwd), x, kernel, bias)
    if fwd == "xla":
        return conv_s2_plain(x, kernel, bias)
    return _apply(lambda x, kernel: _conv_s2(x, kernel, dtype, fwd), x, kernel, bias)


# Rematerialised: the backward keeps only x and the kernel, and rebuilds the shifted windows (the
# matmul operands, up to (k/2)^2 copies of the input) from them. Rebuilding is slicing only; the
# forward matmul is not redone, since the backward of a linear map does not read its output; the
# step's peak memory falls by the size of those copies.
@functools.partial(jax.checkpoint, static_argnums=(2, 3))
def _conv_s2(x: jax.Array, kernel: jax.Array, dtype: str, impl: str) -> jax.Array:
    k, _, c_in, c_out = kernel.shape
    ho, wo = (x.shape[1] - k) // 2 + 1, (x.shape[2] - k) // 2 + 1
    x = x[:, :2 * (ho - 1) + k, :2 * (wo - 1) + k]
    if impl == "mixed":
        impl = "conv" if 4 * c_in * c_out <= _MAX_CONV_CHANNELS else "im2col"
    if impl in ("conv", "outer"):
        # 'outer' on paired rows would write four times the products it writes on 2 x 2 blocks.
        return _conv_s1(_space_to_depth(x), _s2d_kernel(kernel), dtype, impl)
    return _conv_s2_paired_rows(x, kernel, dtype, impl)


def _conv_s2_paired_rows(x: jax.Array, kernel: jax.Array, dtype: str, impl: str) -> jax.Array:
    """The stride-2 correlation of x (B, H, W, C), H and W even, by matmuls on x seen as
    (B, H/2, 2, W/2, 2C): rows in pairs, each column pair's channels side by side, a reshape that
    moves nothing. With p = 2a + r and q = 2b + s, y[m, n] = sum_{a, r, b} X[m + a, r, n + b] @
    W[a, r, b] where W[a, r, b] is kernel[2a + r, 2b : 2b + 2] as a (2C, O) matrix: 2 (k/2)^2 windows
    of 2C channels, each a slice of X, without the space-to-depth transposes (of x, and of dx in the
    gradients) that a correlation of (2 x 2) blocks would need. impl: 'im2col' (the windows side by
    side, one matmul) or 'taps' (one matmul per window, summed)."""
    k, _, c_in, c_out = kernel.shape
    bsz, h, w, _ = x.shape
    a = k // 2
    ho, wo = h // 2 - a + 1, w // 2 - a + 1
    rows = x.reshape(bsz, h // 2, 2, w // 2, 2 * c_in)
    taps = kernel.reshape(2 * a * a, 2 * c_in, c_out)         # [(a, r, b)] = kernel[2a + r, 2b:2b + 2]
    windows = [rows[:, i:i + ho, r, j:j + wo] for i in range(a) for r in range(2) for j in range(a)]
    return _windows_times_taps(windows, taps, dtype, impl)


def conv_s2_plain(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None,
                  dtype: str = "float32") -> jax.Array:
    """The same op as flax computes it (`lax.conv_general_dilated`): the reference, float32."""
    op = lambda x, kernel: lax.conv_general_dilated(x, kernel, (2, 2), "VALID", dimension_numbers=_DN)
    return _apply(op, x, kernel, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _two_pass(x: jax.Array, kernel: jax.Array, op: Callable, dtype: str, fwd: str, bwd: str) -> jax.Array:
    """op(x, kernel) computed in formulation `fwd`, its gradients as formulation `bwd` computes them.
    Every formulation computes the same linear map of x (and of the kernel), so the pair does too;
    the backward reads only x and the kernel, whatever the forward did."""
    return op(x, kernel, None, dtype, fwd)


def _two_pass_fwd(x, kernel, op, dtype, fwd, bwd):
    return op(x, kernel, None, dtype, fwd), (x, kernel)


def _two_pass_bwd(op, dtype, fwd, bwd, res, g):
    return jax.vjp(lambda x, kernel: op(x, kernel, None, dtype, bwd), *res)[1](g)


_two_pass.defvjp(_two_pass_fwd, _two_pass_bwd)


@contextlib.contextmanager
def conv_impl_scope(spec: str, auto: str = "auto"):
    """Within this block, fast stride-2 layers take the formulation `spec` pins (the syntax of
    `ModelConfig.conv_impl`: 'auto', 'default', one of CONV_IMPLS, 'forward/gradients' pairs of
    those, or 'conv0=taps,deconv3=conv/auto,...' by layer name, unnamed layers 'auto'), and each
    pass the spec leaves 'auto' takes `auto` ('auto': measured; 'default': DEFAULT_CONV_IMPL
    without measuring). Raises ValueError for a malformed spec or an `auto` other than those two."""
    conv_impl_pin(spec, "")  # validates
    if auto not in ("auto", "default"):
        raise ValueError(f"auto must be 'auto' or 'default', got {auto!r}")
    token = _CONV_IMPL_PIN.set((spec, auto))
    try:
        yield
    finally:
        _CONV_IMPL_PIN.reset(token)


def layer_impl(op: Callable, name: str | None, x_shape: tuple[int, ...], kernel_shape: tuple[int, ...],
               dtype: str, tuner: autotune.Tuner | None = None) -> str:
    """The formulation of layer `name` computing op (`conv_s2` or `conv_transpose_s2`) on x
    (..., H, W, I) with a (k, k, I, O) kernel: one of CONV_IMPLS, or 'f/b' for formulation f in the
    forward pass and b in the gradients. Each pass is as pinned by the enclosing `conv_impl_scope`,
    else measured once per machine and shape (planet_jax.autotune; 'mixed' unless another takes at
    most 60% of its time) and cached, else (search off, or too little work to time) 'mixed'. The
    passes are timed apart (`_timed_layer`), since the fastest differs between them: XLA:CPU's
    stride-1 conv runs some forward correlations far faster than any matmul form and their
    gradients far slower."""
    x_shape = (math.prod(x_shape[:-3]),) + tuple(x_shape[-3:])
    k, _, c_in, c_out = kernel_shape
    if op is conv_s2:
        positions = ((x_shape[1] - k) // 2 + 1) * ((x_shape[2] - k) // 2 + 1)
    else:
        positions = x_shape[1] * x_shape[2]
    gflop = 2 * x_shape[0] * positions * k * k * c_in * c_out / 1e9
    key = f"x{'x'.join(map(str, x_shape))} k{k} o{c_out} {dtype}"
    spec, auto = _CONV_IMPL_PIN.get()
    pins = [auto if pin == "auto" else pin for pin in _passes_pin(conv_impl_pin(spec, name or ""))]
    tuner = tuner or autotune.Tuner()
    chosen = []
    for pass_, pin, work in zip(_PASSES, pins, (gflop, 2 * gflop)):
        candidates = {impl: functools.partial(_timed_layer, op, impl, pass_, x_shape, tuple(kernel_shape), dtype)
                      for impl in CONV_IMPLS}
        revision = _PASS_REVISION.get((op.__name__, pass_), "")
        chosen.append(tuner.choose(f"ops.{op.__name__}", f"{key} {pass_}{revision}", candidates, DEFAULT_CONV_IMPL,
                                   pin, work, min_gain=_LAYER_MIN_GAIN))
    fwd, bwd = chosen
    return fwd if fwd == bwd else f"{fwd}/{bwd}"


_PASSES = ("forward", "gradients")
# Named in a pass's cache key once a formulation it measures has changed, so that timings cached for
# the old code are measured again, for that pass only: r2, conv_transpose_s2's 'mixed' gradients
# became the gather of dy's patches at every input size; conv_s2's r2, its matmul formulations
# became windows of paired rows instead of space-to-depth blocks.
_PASS_REVISION = {("conv_transpose_s2", "gradients"): " r2", ("conv_s2", "forward"): " r2",
                  ("conv_s2", "gradients"): " r2"}


def _timed_layer(op: Callable, impl: str, pass_: str, x_shape: tuple[int, ...], kernel_shape: tuple[int, ...],
                 dtype: str) -> Callable[[], Any]:
    """An autotune candidate: one pass of the layer in formulation `impl` on random inputs of the
    given shapes, 'forward' (the output) or 'gradients' (both input gradients from a random output
    gradient; nothing of the forward is computed, since every formulation's backward reads only x
    and the kernel), as the body of a loop over _LOOP_GROUPS groups (the loss maps over groups of
    sequences): XLA:CPU runs some convolutions (its strided conv's gradients) far slower inside a
    loop body than alone, so a candidate timed alone could win and then lose."""
    x = autotune.random_array((_LOOP_GROUPS,) + x_shape, 0)
    kernel = autotune.random_array(kernel_shape, 1, scale=1 / kernel_shape[0])
    fn = lambda x, w: op(x, w, None, dtype, impl)
    if pass_ == "forward":
        run = jax.jit(lambda x, w: jax.lax.map(lambda x: fn(x, w), x)).lower(x, kernel).compile()
        return lambda: jax.block_until_ready(run(x, kernel))
    y = jax.eval_shape(fn, jax.ShapeDtypeStruct(x_shape, jnp.float32), kernel)
    g = autotune.random_array((_LOOP_GROUPS,) + y.shape, 2)
    vjp = lambda x, w, g: jax.vjp(fn, x, w)[1](g)
    grads = jax.jit(lambda x, w, g: jax.lax.map(lambda xg: vjp(xg[0], w, xg[1]), (x, g))).lower(x, kernel, g).compile()
    return lambda: jax.block_until_ready(grads(x, kernel, g))


class _Stride2Layer(nn.Module):
    """A stride-2 VALID layer with flax's parameters ('kernel' (k, k, I, O), 'bias' (O,)) and
    initialisers, computed by `_fast_op` (with `dtype` matmul operands, in the formulation that
    `layer_impl` picks for its name and shapes) when `fast` and by flax's own op otherwise, so both
    paths share parameters."""
    features: int
    kernel_size: int
    fast: bool = True
    dtype: str = "float32"
    use_bias: bool = True
    kernel_init: Callable = nn.linear.default_kernel_init
    bias_init: Callable = nn.initializers.zeros_init()

    _fast_op: ClassVar[Callable]
    _plain_op: ClassVar[Callable]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias)
        if not self.fast:
            return type(self)._plain_op(x, kernel, bias)
        op = inspect.unwrap(type(self)._fast_op)  # flax wraps functions stored on Module classes
        impl = layer_impl(op, self.name, x.shape, kernel.shape, self.dtype)
        return op(x, kernel, bias, self.dtype, impl)


class Conv(_Stride2Layer):
    """Drop-in for `nn.Conv(features, (k, k), strides=(2, 2), padding='VALID')`, k even:
    (..., H, W, I) -> (..., (H - k) // 2 + 1, (W - k) // 2 + 1, features)."""
    _fast_op = conv_s2
    _plain_op = conv_s2_plain


class Deconv(_Stride2Layer):
    """Drop-in for `nn.ConvTranspose(features, (k, k), strides=(2, 2), padding='VALID')`:
    (..., H, W, I) -> (..., 2(H - 1) + k, 2(W - 1) + k, features)."""
    _fast_op = conv_transpose_s2
    _plain_op = conv_transpose_s2_plain
