"""The fast stride-2 convolutions equal flax's Conv and ConvTranspose, values and gradients."""
import contextlib
import io
import itertools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from planet_jax import config, networks, ops

# (input size, kernel, in channels, out channels): the decoder's four layers (scaled down in
# channels), an even and an odd kernel on small inputs, an odd kernel of 3, and an even kernel wider
# than _MAX_CONV_CHANNELS (4 * I * O).
CASES = [(1, 5, 16, 8), (5, 5, 8, 6), (13, 6, 6, 4), (30, 6, 4, 3), (3, 4, 3, 2), (2, 3, 3, 2), (4, 6, 12, 8)]


def _flax(x, kernel, bias):
    layer = nn.ConvTranspose(kernel.shape[-1], kernel.shape[:2], strides=(2, 2), padding="VALID")
    return layer.apply({"params": {"kernel": kernel, "bias": bias}}, x)


def _naive(x, kernel, bias):
    """The definition as a scatter, one tap at a time: y[2i + p, 2j + q] += x[i, j] @ kernel[k-1-p, k-1-q]."""
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    b, h, w, _ = x.shape
    k, o = kernel.shape[0], kernel.shape[-1]
    y = np.zeros((b, 2 * (h - 1) + k, 2 * (w - 1) + k, o))
    for p in range(k):
        for q in range(k):
            y[:, p:p + 2 * h - 1:2, q:q + 2 * w - 1:2] += x @ kernel[k - 1 - p, k - 1 - q]
    return y + np.asarray(bias)


def _check_against_references(fast_fn, naive_fn, flax_fn, x_shape, k, c_out, seed):
    """fast_fn equals the naive loop and flax in value, and flax in every gradient."""
    kx, kk, kb, kg = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(kx, (2,) + x_shape)
    kernel = jax.random.normal(kk, (k, k, x_shape[-1], c_out)) / k
    bias = jax.random.normal(kb, (c_out,))
    fast = fast_fn(x, kernel, bias)
    np.testing.assert_allclose(fast, naive_fn(x, kernel, bias), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(fast, flax_fn(x, kernel, bias), atol=1e-4, rtol=1e-4)

    cotangent = jax.random.normal(kg, fast.shape)
    loss = lambda fn: lambda *args: jnp.sum(fn(*args) * cotangent)
    grads_fast = jax.jit(jax.grad(loss(fast_fn), (0, 1, 2)))(x, kernel, bias)
    grads_flax = jax.jit(jax.grad(loss(flax_fn), (0, 1, 2)))(x, kernel, bias)
    for g_fast, g_flax in zip(grads_fast, grads_flax):
        np.testing.assert_allclose(g_fast, g_flax, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("size,k,c_in,c_out", CASES)
def test_forward_and_gradients_equal_flax(size, k, c_in, c_out):
    _check_against_references(ops.conv_transpose_s2, _naive, _flax, (size, size, c_in), k, c_out,
                              seed=size * 10 + k)


@pytest.mark.parametrize("impl,k", [(ops.DEFAULT_CONV_IMPL, 5), ("im2col", 6), ("taps/xla", 5), ("xla/taps", 5)])
def test_second_order_gradient_equals_flax(impl, k):
    """The custom VJP is itself differentiable (e.g. for gradient penalties), split passes too, and
    the backward that gathers dy's windows once (even k)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 3, 3, 2))
    kernel = jax.random.normal(jax.random.PRNGKey(1), (k, k, 2, 2))
    bias = jnp.zeros(2)

    def grad_of_input_grad_norm(fn):
        input_grad = lambda w: jax.grad(lambda v: jnp.sum(jnp.sin(fn(v, w, bias))))(x)
        return jax.grad(lambda w: jnp.sum(jnp.square(input_grad(w))))(kernel)

    fast = lambda x, w, b: ops.conv_transpose_s2(x, w, b, impl=impl)
    np.testing.assert_allclose(grad_of_input_grad_norm(fast), grad_of_input_grad_norm(_flax), atol=1e-3, rtol=1e-3)


def _naive_conv(x, kernel, bias):
    """The definition, one tap at a time: y[m, n] = sum_{p, q} x[2m + p, 2n + q] @ kernel[p, q] + bias."""
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    k = kernel.shape[0]
    ho, wo = (x.shape[1] - k) // 2 + 1, (x.shape[2] - k) // 2 + 1
    y = np.zeros((x.shape[0], ho, wo, kernel.shape[-1]))
    for p in range(k):
        for q in range(k):
            y += x[:, p:p + 2 * ho - 1:2, q:q + 2 * wo - 1:2] @ kernel[p, q]
    return y + np.asarray(bias)


def _flax_conv(x, kernel, bias):
    layer = nn.Conv(kernel.shape[-1], kernel.shape[:2], strides=(2, 2), padding="VALID")
    return layer.apply({"params": {"kernel": kernel, "bias": bias}}, x)


# The encoder's four layers (64 -> 31 -> 14 -> 6 -> 2, scaled down in channels), a kernel of 2 and
# a non-square input.
@pytest.mark.parametrize("shape,k,c_out", [((64, 64, 3), 4, 4), ((31, 31, 4), 4, 5), ((14, 14, 5), 4, 3),
                                           ((6, 6, 3), 4, 2), ((7, 9, 2), 2, 3), ((11, 8, 2), 4, 2)])
def test_conv_forward_and_gradients_equal_flax(shape, k, c_out):
    _check_against_references(ops.conv_s2, _naive_conv, _flax_conv, shape, k, c_out, seed=sum(shape) + k)


def test_networks_fast_and_plain_share_parameters_and_agree():
    cfg = config.tiny().model
    params = networks.init_params(cfg, 2, jax.random.PRNGKey(0))
    plain_cfg = config.override(config.tiny(), ["model.fast_conv=false"]).model
    plain_params = networks.init_params(plain_cfg, 2, jax.random.PRNGKey(0))
    assert jax.tree.structure(params) == jax.tree.structure(plain_params)
    decode, encode = (jax.jit(fn, static_argnums=1) for fn in (networks.decode, networks.encode))
    feat = jax.random.normal(jax.random.PRNGKey(1), (3, cfg.feature_size))
    np.testing.assert_allclose(decode(params, cfg, feat), decode(params, plain_cfg, feat), atol=1e-5, rtol=1e-5)
    o = jax.random.uniform(jax.random.PRNGKey(2), (3, 64, 64, 3), minval=-0.5, maxval=0.5)
    np.testing.assert_allclose(encode(params, cfg, o), encode(params, plain_cfg, o), atol=1e-5, rtol=1e-5)
    # The fast encoder recomputes its first layer in the backward pass (below); gradients unchanged.
    g = jax.random.normal(jax.random.PRNGKey(3), (3, cfg.embed_size))
    grad = jax.jit(jax.grad(lambda p, c: jnp.sum(networks.encode(p, c, o) * g)), static_argnums=1)
    for fast, plain in zip(jax.tree.leaves(grad(params, cfg)), jax.tree.leaves(grad(params, plain_cfg))):
        np.testing.assert_allclose(fast, plain, atol=1e-4, rtol=1e-4)


def _flax_dense_deconv(x, w_d, b_d, kernel, bias):
    z = nn.Dense(w_d.shape[1]).apply({"params": {"kernel": w_d, "bias": b_d}}, x)
    return _flax(z.reshape(z.shape[:-1] + (1, 1, -1)), kernel, bias)


# Few rows: x @ W_d first; many rows: the kernels' product first (fewer multiply-adds each way).
@pytest.mark.parametrize("lead,kernels_first", [((2,), False), ((5, 8), True)])
def test_dense_then_conv_transpose_on_1x1_equals_flax(lead, kernels_first):
    d, f, k, o = 4, 16, 5, 3
    keys = jax.random.split(jax.random.PRNGKey(len(lead)), 6)
    x = jax.random.normal(keys[0], lead + (d,))
    args = (jax.random.normal(keys[1], (d, f)), jax.random.normal(keys[2], (f,)),
            jax.random.normal(keys[3], (k, k, f, o)) / k, jax.random.normal(keys[4], (o,)))
    y = ops.dense_conv_transpose_1x1(x, *args)
    assert y.shape == lead + (k, k, o) and y.dtype == jnp.float32
    flat = x.reshape(-1, d)
    np.testing.assert_allclose(y.reshape((-1, k, k, o)), _flax_dense_deconv(flat, *args), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(y.reshape((-1, k, k, o)), _naive(
        (np.asarray(flat, np.float64) @ np.asarray(args[0], np.float64) + np.asarray(args[1]))[:, None, None],
        *args[2:]), atol=1e-4, rtol=1e-4)
    dots = [tuple(v.aval.shape for v in e.invars) for e in jax.make_jaxpr(ops.dense_conv_transpose_1x1)(x, *args).eqns
            if e.primitive.name == "dot_general"]
    assert (((d, f), (f, k * k * o)) in dots) == kernels_first

    cotangent = jax.random.normal(keys[5], y.shape)
    grad = lambda fn: jax.grad(lambda *a: jnp.sum(fn(*a).reshape(cotangent.shape) * cotangent), range(5))
    ref = grad(lambda x, *a: _flax_dense_deconv(x.reshape(-1, d), *a))(x, *args)
    for g, g_ref in zip(grad(ops.dense_conv_transpose_1x1)(x, *args), ref):
        np.testing.assert_allclose(g, g_ref, atol=1e-3, rtol=1e-4)
    y16 = ops.dense_conv_transpose_1x1(x, *args, dtype="bfloat16")
    assert 1e-4 < _scaled_error(y16, y) < BF16_TOL
    with pytest.raises(ValueError, match="chain"):
        ops.dense_conv_transpose_1x1(x, args[0], args[1], args[2][:, :, :-1], args[3])


@pytest.mark.parametrize("kernel_shape", [(4, 4, 2, 3), (4, 3, 3, 3), (1, 1, 3, 3)])
def test_bad_kernel_shape_is_named(kernel_shape):
    with pytest.raises(ValueError, match="kernel"):
        ops.conv_transpose_s2(jnp.zeros((1, 2, 2, 3)), jnp.zeros(kernel_shape))
    with pytest.raises(ValueError, match="kernel"):
        ops.conv_s2(jnp.zeros((1, 8, 8, 3)), jnp.zeros(kernel_shape))


# bfloat16 operands: each product carries about 2^-8 relative error and sums of n terms grow it by
# about sqrt(n), so errors are measured against the spread of the exact result. BF16_TOL is the
# stated tolerance; the second bound checks that bf16 was really used (float32 is ~1e-7 here).
BF16_TOL = 2e-2


def _scaled_error(value, reference):
    reference = np.asarray(reference, np.float64)
    return float(np.max(np.abs(np.asarray(value, np.float64) - reference)) / np.std(reference))


@pytest.mark.parametrize("op,naive,shape,k,c_out", [
    (ops.conv_transpose_s2, _naive, (5, 5, 16), 5, 12), (ops.conv_transpose_s2, _naive, (13, 13, 12), 6, 8),
    (ops.conv_transpose_s2, _naive, (1, 1, 32), 5, 16), (ops.conv_s2, _naive_conv, (31, 31, 8), 4, 12)])
def test_bfloat16_operands_within_tolerance_of_float64(op, naive, shape, k, c_out):
    kx, kk, kg = jax.random.split(jax.random.PRNGKey(k), 3)
    x = jax.random.normal(kx, (2,) + shape)
    kernel = jax.random.normal(kk, (k, k, shape[-1], c_out)) / k
    bias = jnp.zeros(c_out)
    y16 = op(x, kernel, bias, dtype="bfloat16")
    assert y16.dtype == jnp.float32
    assert 1e-4 < _scaled_error(y16, naive(x, kernel, bias)) < BF16_TOL

    # Gradients against the float32 op's, which equal flax's to 1e-4 (tests above).
    cotangent = jax.random.normal(kg, y16.shape)
    grads = [jax.jit(jax.grad(lambda x, w: jnp.sum(op(x, w, bias, dtype=dt) * cotangent), (0, 1)))(x, kernel)
             for dt in ("bfloat16", "float32")]
    for g16, g32 in zip(*grads):
        assert g16.dtype == jnp.float32
        assert 1e-4 < _scaled_error(g16, g32) < BF16_TOL


def test_bad_dtype_is_named():
    with pytest.raises(ValueError, match="dtype"):
        ops.conv_s2(jnp.zeros((1, 8, 8, 3)), jnp.zeros((4, 4, 3, 2)), dtype="float16")


# The decoder's four layers and the encoder's (scaled down in channels; the first decoder layer
# takes the matmul forward whatever the formulation, its backward follows it).
LAYER_CASES = [("deconv", (1, 1, 16), 5, 8), ("deconv", (5, 5, 8), 5, 6), ("deconv", (13, 13, 12), 6, 8),
               ("deconv", (30, 30, 8), 6, 3), ("conv", (64, 64, 3), 4, 4), ("conv", (31, 31, 8), 4, 12),
               ("conv", (14, 14, 4), 4, 16), ("conv", (6, 6, 16), 4, 32)]


# Forward in one formulation, gradients in another ('forward/gradients'): XLA's op either side.
SPLIT_IMPLS = ["conv/taps", "xla/outer", "im2col/xla"]


@pytest.mark.parametrize("impl", [impl for impl in ops.CONV_IMPLS if impl != ops.DEFAULT_CONV_IMPL] + SPLIT_IMPLS)
@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: f"{c[0]}{c[1][0]}")
def test_every_formulation_equals_flax(case, impl):
    """Each formulation the autotuner may pick (ops.CONV_IMPLS; the default one is tested above),
    and pairs of them split between the passes, values and gradients."""
    kind, shape, k, c_out = case
    if kind == "deconv":
        fast = lambda x, w, b: ops.conv_transpose_s2(x, w, b, impl=impl)
        _check_against_references(fast, _naive, _flax, shape, k, c_out, seed=k)
    else:
        fast = lambda x, w, b: ops.conv_s2(x, w, b, impl=impl)
        _check_against_references(fast, _naive_conv, _flax_conv, shape, k, c_out, seed=k)


@pytest.mark.parametrize("impl", ["mixed", "im2col", "taps", "outer"])
@pytest.mark.parametrize("k,c_in,c_out", [(6, 12, 8), (5, 8, 6), (6, 3, 2)])
def test_non_square_inputs_equal_flax(impl, k, c_in, c_out):
    """Rows and columns are not mixed up: a 4 x 7 input, through each gradient branch."""
    fast = lambda x, w, b: ops.conv_transpose_s2(x, w, b, impl=impl)
    _check_against_references(fast, _naive, _flax, (4, 7, c_in), k, c_out, seed=k + c_in)


@pytest.mark.parametrize("impl", ["mixed", "im2col", "taps", "outer"])
@pytest.mark.parametrize("shape,k,c_out", [((7, 10, 8), 4, 12), ((9, 6, 5), 2, 40), ((12, 9, 6), 6, 16)])
def test_strided_conv_on_non_square_inputs_equals_flax(impl, shape, k, c_out):
    """The paired-rows windows keep rows and columns apart (odd sizes cropped, k of 2, 4 and 6; wide
    enough that 'mixed' takes them rather than XLA's conv)."""
    assert 4 * shape[-1] * c_out > ops._MAX_CONV_CHANNELS
    fast = lambda x, w, b: ops.conv_s2(x, w, b, impl=impl)
    _check_against_references(fast, _naive_conv, _flax_conv, shape, k, c_out, seed=k + c_out)


def _transposed_sizes(jaxpr) -> list[int]:
    """Element counts of the operands of every transpose in a jaxpr, inner jaxprs included."""
    sizes = [int(np.prod(eqn.invars[0].aval.shape)) for eqn in jaxpr.eqns if eqn.primitive.name == "transpose"]
    for inner in jax.extend.core.subjaxprs(jaxpr):
        sizes += _transposed_sizes(inner)
    return sizes


@pytest.mark.parametrize("impl", ["mixed", "im2col", "taps"])
def test_strided_conv_matmul_forms_move_no_activation(impl):
    """Forward and gradients of conv_s2's matmul forms transpose nothing larger than the kernel (no
    space-to-depth of x or of dx): its windows are slices of x seen as paired rows."""
    x, kernel = jnp.ones((4, 30, 30, 8)), jnp.ones((4, 4, 8, 16))  # x far larger than the kernel
    g = jnp.ones((4, 14, 14, 16))
    both = lambda x, w, g: jax.vjp(lambda x, w: ops.conv_s2(x, w, impl=impl), x, w)
    sizes = _transposed_sizes(jax.make_jaxpr(lambda x, w, g: both(x, w, g)[1](g))(x, kernel, g).jaxpr)
    assert max(sizes, default=0) <= kernel.size, sizes


def _gathers(fn, *args) -> int:
    return str(jax.make_jaxpr(fn)(*args)).count("gather[")


@pytest.mark.parametrize("k,c_in,c_out", [(6, 12, 8), (4, 16, 8), (5, 12, 8), (6, 4, 3), (6, 8, 9)])
def test_which_gradients_gather(k, c_in, c_out):
    """The transposed conv's gradients gather once under 'mixed' (dy's patches, any k and width),
    under 'im2col' for even k (the phases' windows), never under 'taps'. (An 11 x 12 input: the
    forward pass is the phase conv for every k here.)"""
    x, kernel = jnp.ones((2, 11, 12, c_in)), jnp.ones((k, k, c_in, c_out))
    g = jnp.ones(jax.eval_shape(lambda x, w: ops.conv_transpose_s2(x, w), x, kernel).shape)
    backward = lambda impl: lambda x, w, g: jax.vjp(lambda x, w: ops.conv_transpose_s2(x, w, impl=impl),
                                                    x, w)[1](g)
    assert _gathers(backward("mixed"), x, kernel, g) == 1
    assert (_gathers(backward("im2col"), x, kernel, g) > 0) == (k % 2 == 0)
    assert _gathers(backward("taps"), x, kernel, g) == 0


@pytest.mark.parametrize("impl", ["mixed", "xla/mixed"])
@pytest.mark.parametrize("k,h,w,matmul", [(5, 5, 5, True), (5, 4, 7, True), (4, 1, 1, True), (5, 11, 12, False),
                                           (6, 5, 6, False)])
def test_mixed_gradients_are_the_forward_matmuls_transpose(k, h, w, matmul, impl):
    """'mixed' takes the gradients as the transpose of the forward's matmul form, one gather of dy's
    patches and no convolution, on tiny inputs (where the forward pass is that matmul and an
    overlap-add) and on larger ones (where it is the phase conv). Values, also with XLA's forward
    pass ('xla/mixed'): against a plain loop over pixels and taps."""
    assert ops._forward_is_matmul(h, w, k) == matmul
    x = jax.random.normal(jax.random.PRNGKey(0), (2, h, w, 6))
    kernel = jax.random.normal(jax.random.PRNGKey(1), (k, k, 6, 5))
    g = jax.random.normal(jax.random.PRNGKey(2), jax.eval_shape(lambda x, w: ops.conv_transpose_s2(x, w), x, kernel).shape)
    backward = lambda x, w, g: jax.vjp(lambda x, w: ops.conv_transpose_s2(x, w, impl=impl), x, w)[1](g)
    if impl == "mixed":
        forward = str(jax.make_jaxpr(lambda x, w: ops.conv_transpose_s2(x, w, impl=impl))(x, kernel))
        jaxpr = str(jax.make_jaxpr(backward)(x, kernel, g))  # the forward pass's, then the gradients'
        assert jaxpr.count("gather[") == 1
        assert jaxpr.count("conv_general_dilated[") == forward.count("conv_general_dilated[")
    # y[2i + p, 2j + q] += x[i, j] @ kernel[k - 1 - p, k - 1 - q] (flax's convention): its gradients by loops.
    xn, kn, gn = (np.asarray(v, np.float64) for v in (x, kernel, g))
    dx, dk = np.zeros_like(xn), np.zeros_like(kn)
    for i, j, p, q in itertools.product(range(h), range(w), range(k), range(k)):
        dx[:, i, j] += gn[:, 2 * i + p, 2 * j + q] @ kn[k - 1 - p, k - 1 - q].T
        dk[k - 1 - p, k - 1 - q] += xn[:, i, j].T @ gn[:, 2 * i + p, 2 * j + q]
    got_dx, got_dk = backward(x, kernel, g)
    np.testing.assert_allclose(got_dx, dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_dk, dk, rtol=1e-4, atol=1e-4)


def _convolutions(fn, *args) -> int:
    """XLA convolution instructions left in fn's compiled program (dead code removed)."""
    return jax.jit(fn).lower(*args).compile().as_text().count(" convolution(")


@pytest.mark.parametrize("op,x_shape,kernel_shape", [(ops.conv_transpose_s2, (2, 5, 5, 8), (6, 6, 8, 8)),
                                                     (ops.conv_s2, (2, 14, 14, 8), (4, 4, 8, 8))])
def test_split_formulations_run_each_pass_as_named(op, x_shape, kernel_shape):
    """'f/b' runs formulation f forward and b in the gradients: only 'xla' uses XLA's convolutions."""
    x, kernel = jnp.ones(x_shape), jnp.ones(kernel_shape)
    g = jnp.ones(jax.eval_shape(lambda x, w: op(x, w), x, kernel).shape)
    for impl, forward_convs, gradient_convs in (("xla/taps", True, False), ("taps/xla", False, True)):
        f = lambda x, w: op(x, w, impl=impl)
        assert (_convolutions(f, x, kernel) > 0) == forward_convs, impl
        assert (_convolutions(lambda x, w, g: jax.vjp(f, x, w)[1](g), x, kernel, g) > 0) == gradient_convs, impl


def test_bad_impl_is_named():
    with pytest.raises(ValueError, match="impl"):
        ops.conv_s2(jnp.zeros((1, 8, 8, 3)), jnp.zeros((4, 4, 3, 2)), impl="fastest")
    for impl in ("conv/fastest", "conv/", "conv/taps/im2col"):
        with pytest.raises(ValueError, match="impl"):
            ops.conv_transpose_s2(jnp.zeros((1, 2, 2, 3)), jnp.zeros((4, 4, 3, 2)), impl=impl)


_ITEM_BYTES = {"f32": 4, "bf16": 2, "bool": 1, "s32": 4, "u32": 4, "u8": 1}


def _saved(fn, *args) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, shape) of each array that reverse mode keeps for fn's backward, from jax's own listing."""
    import jax.ad_checkpoint
    listing = io.StringIO()
    with contextlib.redirect_stdout(listing):
        jax.ad_checkpoint.print_saved_residuals(fn, *args)
    found = re.findall(r"^(\w+)\[([\d,]*)\]", listing.getvalue(), re.MULTILINE)
    assert found, listing.getvalue()
    return [(dtype, tuple(int(n) for n in shape.split(",") if n)) for dtype, shape in found]


def _saved_bytes(fn, *args):
    return sum(_ITEM_BYTES[dtype] * int(np.prod(shape)) for dtype, shape in _saved(fn, *args))


def _saved_shapes(fn, *args):
    return [shape for _, shape in _saved(fn, *args)]


def test_backward_keeps_only_the_inputs_of_conv_and_relu(monkeypatch):
    """conv_s2 saves x and the kernel, not its shifted windows; relu saves no mask beside its output."""
    monkeypatch.setattr(ops, "_MAX_CONV_CHANNELS", 0)
    x = jnp.ones((2, 14, 14, 8))
    kernel = jnp.ones((4, 4, 8, 16))
    inputs = x.size * 4 + kernel.size * 4
    assert _saved_bytes(lambda x, w: jnp.sum(ops.conv_s2(x, w)), x, kernel) <= inputs
    layer = lambda x, w: jnp.sum(ops.relu(ops.conv_s2(x, w)))
    out = 2 * 6 * 6 * 16 * 4
    assert _saved_bytes(layer, x, kernel) <= inputs + out


def test_encoder_backward_recomputes_its_first_layer_output():
    """The first layer's output (the encoder's largest activation) is not kept for the backward pass."""
    cfg = config.tiny().model
    params = networks.init_params(cfg, 2, jax.random.PRNGKey(0))
    o = jnp.zeros((2, 64, 64, 3))
    kept = _saved_shapes(lambda p: jnp.sum(networks.encode(p, cfg, o)), params)
    assert (2, 64, 64, 3) in kept and (2, 14, 14, 2 * cfg.cnn_depth) in kept, kept
    assert (2, 31, 31, cfg.cnn_depth) not in kept, kept


def test_relu_equals_jax_relu_with_gradients():
    x = jnp.array([-2.0, -0.5, 0.0, 0.5, 3.0])
    g = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0])
    np.testing.assert_array_equal(ops.relu(x), jax.nn.relu(x))
    grad = lambda f: jax.grad(lambda v: jnp.sum(f(v) * g))(x)
    np.testing.assert_array_equal(grad(ops.relu), grad(jax.nn.relu))
    np.testing.assert_array_equal(grad(ops.relu), [0.0, 0.0, 0.0, 4.0, 5.0])


def test_bfloat16_deconv_after_relu_keeps_no_second_copy_of_its_input():
    """The transposed conv keeps its input as it came (here the ReLU's float32 output, kept by the
    ReLU anyway) and casts it in the backward pass, rather than keeping a bfloat16 copy beside it."""
    x = jnp.ones((2, 13, 13, 16))
    kernel = jnp.ones((6, 6, 16, 8))
    layer = lambda x, w: jnp.sum(ops.conv_transpose_s2(ops.relu(x), w, dtype="bfloat16"))
    assert _saved_bytes(layer, x, kernel) <= x.size * 4 + kernel.size * 4
