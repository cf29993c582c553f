"""The quantizer: reference properties, edge cases, and fused == reference."""

import math

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mesa import quant
from torch_mesa.quant import reference as ref
from torch_mesa.quant import fused

from conftest import sqnr_db, with_outliers

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (axes, group_size) layouts: per channel, per 64-channel group, per tensor,
# per (head, channel), per head, along a middle axis with ragged groups.
LAYOUTS = [((3,), 1), ((3,), 64), ((3,), None), ((1, 3), 1), ((1, 3), 65), ((2,), 5)]


def _round_trip(x, bits, axes, group_size, stochastic=False, rows=None, impl=ref):
    saved = impl.quantize(x, bits, axes, group_size, stochastic, rows=rows)
    return saved, impl.dequantize(saved, x.shape, x.dtype, bits, axes, group_size, rows=rows)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("axes,group_size", LAYOUTS)
def test_nearest_error_at_most_half_a_step(bits, axes, group_size):
    x = torch.randn(3, 7, 19, 65)
    saved, y = _round_trip(x, bits, axes, group_size)
    scale_c = ref.to_channels(saved[2], tuple(x.shape), ref.normalize_axes(axes, 4), group_size)
    err = (y - x).abs()
    # half a step, plus fp32 rounding of the arithmetic
    assert (err <= scale_c * 0.5 * (1 + 1e-5) + 1e-6).all()
    lo_c = ref.to_channels(saved[1], tuple(x.shape), ref.normalize_axes(axes, 4), group_size)
    hi_c = lo_c + scale_c * (2**bits - 1)
    assert (y >= lo_c - 1e-6).all() and (y <= hi_c * (1 + 1e-6) + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,shape", [(None, (4, 50, 96)), ("row", (4, 50, 96)), ("scaled", (4, 50, 96)),
                                        ("scaled", (2, 3, 40, 64))])
def test_codes_are_nearest_to_the_exact_quotient(dtype, rows, shape):
    """The quantizer multiplies by reciprocals of its per-channel, per-row and
    per-group divisors instead of dividing by them: each code is still the
    nearest to the value computed in fp64 with true divisions (from the same
    kept statistics), up to the fp32 roundings of that arithmetic, for each
    row mode, on outlier-heavy data (zeros and spikes included)."""
    x = with_outliers(*shape, dtype=dtype, requires_grad=False)
    x[0, 0] = 0.0
    axes = (1, 3) if len(shape) == 4 else (len(shape) - 1,)
    saved = ref.quantize(x, 8, axes, 1, False, rows=rows)
    codes = ref.unpack(saved[0], 8, x.numel()).reshape(shape).double()
    lo_c = ref.to_channels(saved[1], shape, axes, 1).double()
    scale_c = ref.to_channels(saved[2], shape, axes, 1).double()
    v = x.double()
    if rows == "row":
        v = (v - saved[3].double()) / saved[4].double()
    elif rows == "scaled":
        v = v / saved[4].double() / saved[3].double()
    q = ((v - lo_c) / scale_c).clamp(0, 255)
    assert (codes - q).abs().max() <= 0.5 + 1e-3
    # elsewhere than near a tie, the same code as rounding the exact quotient
    # (bf16 values lie on a coarse grid, so exact ties are not rare there)
    clear = ((q - q.floor()) - 0.5).abs() > 1e-3
    assert torch.equal(codes[clear], q.round()[clear])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,min_db", [(8, 38.0), (4, 14.0), (2, 1.5)])
def test_sqnr_and_memory_per_bits(dtype, bits, min_db):
    """Per-channel ranges of Gaussian data: 8 bits ~ 6 dB per bit; and the
    codes take bits/8 bytes per element."""
    x = torch.randn(4, 197, 384).to(dtype)
    saved, y = _round_trip(x, bits, (2,), 1)
    assert y.dtype == dtype and y.shape == x.shape
    # judged against the low-precision input itself
    assert sqnr_db(y.float(), x.float()) >= min_db
    assert saved[0].dtype == torch.uint8
    assert saved[0].numel() == math.ceil(x.numel() * bits / 8)
    assert saved[1].numel() == saved[2].numel() == 384


def test_outliers_get_their_own_range_per_channel():
    x = with_outliers(8, 197, 384, requires_grad=False)
    _, per_channel = _round_trip(x, 8, (2,), 1)
    _, per_tensor = _round_trip(x, 8, (2,), None)
    assert sqnr_db(per_channel, x) > sqnr_db(per_tensor, x) + 10


def test_row_normalised_keeps_relative_precision_of_small_rows():
    x = torch.randn(2, 50, 64)
    x[:, 0] *= 1e-3  # a token with a tiny spread (a class token at init)
    _, plain = _round_trip(x, 8, (2,), 1)
    _, rows = _round_trip(x, 8, (2,), 1, rows="row")
    assert sqnr_db(rows[:, 0], x[:, 0]) > 30
    assert sqnr_db(plain[:, 0], x[:, 0]) < 10


def test_stochastic_rounding_is_unbiased():
    x = torch.randn(64, 32)
    draws = 800
    total = torch.zeros_like(x)
    for _ in range(draws):
        saved, y = _round_trip(x, 2, (1,), 1, stochastic=True)
        total += y
    mean = total / draws
    step = ref.to_channels(saved[2], (64, 32), (1,), 1)
    _, nearest = _round_trip(x, 2, (1,), 1)
    # mean of unbiased draws: error ~ step / (2 sqrt(draws)); nearest: up to step / 2
    assert ((mean - x).abs() / step).mean() < 0.03
    assert ((nearest - x).abs() / step).mean() > 0.15


def test_edge_cases_zero_size_constant_scalar_noncontiguous():
    for shape in [(0, 5), (3, 0), (2, 0, 4)]:
        saved, layout = quant.compress(torch.randn(shape), 8, kernel="reference")
        assert quant.expand(saved, layout).shape == shape
    c = torch.full((4, 9), 3.25)
    saved, layout = quant.compress(c, 4, kernel="reference")
    assert torch.equal(quant.expand(saved, layout), c)  # constant groups are exact
    s = torch.tensor(1.5)
    saved, layout = quant.compress(s, 8, kernel="reference")
    out = quant.expand(saved, layout)
    assert out.shape == () and out.item() == 1.5
    base = torch.randn(33, 17)
    t = base.t()  # non-contiguous
    saved, layout = quant.compress(t, 8, kernel="reference")
    out = quant.expand(saved, layout)
    assert out.shape == t.shape and sqnr_db(out, t) > 38


def test_huge_and_tiny_magnitudes_stay_finite():
    for scale in (1e30, 1e-30, 1e-42):  # 1e-42 is a float32 denormal
        x = torch.randn(16, 8) * scale
        saved, layout = quant.compress(x, 8, kernel="reference")
        y = quant.expand(saved, layout)
        assert torch.isfinite(y).all()
        if scale >= 1e-30:
            assert sqnr_db(y, x) > 38


def test_non_finite_groups_dequantize_to_nan_not_to_silent_values():
    x = torch.randn(10, 4)
    x[3, 1] = float("nan")
    x[5, 2] = float("inf")
    saved, layout = quant.compress(x, 8, kernel="reference")
    y = quant.expand(saved, layout)
    assert torch.isnan(y[:, 1]).all() and torch.isnan(y[:, 2]).all()
    assert torch.isfinite(y[:, [0, 3]]).all()


def test_running_range_saturates_never_wraps():
    r = quant.RunningRange(momentum=0.9)
    x = torch.rand(100, 4)  # in [0, 1)
    quant.compress(x, 8, running=r, kernel="reference")
    big = x * 10  # far outside the running range
    saved, layout = quant.compress(big, 8, running=r, kernel="reference")
    y = quant.expand(saved, layout)
    hi = (r.lo + r.span).max()
    assert y.max() <= hi * 1.0001  # saturates at the top of the range
    order = torch.argsort(big[:, 0])
    assert (y[order, 0].diff() >= 0).all()  # monotone: no wrap-around


def test_running_range_is_a_moving_average_and_ignores_non_finite_steps():
    r = quant.RunningRange(momentum=0.9)
    a = torch.zeros(10, 2)
    a[0] = 1.0
    quant.compress(a, 8, running=r, kernel="reference")
    assert torch.allclose(r.lo, torch.zeros(2)) and torch.allclose(r.span, torch.ones(2))
    quant.compress(a * 3, 8, running=r, kernel="reference")
    assert torch.allclose(r.span, torch.full((2,), 0.9 * 1 + 0.1 * 3))
    before = r.span.clone()
    bad = a.clone()
    bad[1, 0] = float("nan")
    saved, layout = quant.compress(bad, 8, running=r, kernel="reference")
    assert torch.equal(r.span[0], before[0])  # the NaN step did not poison the estimate
    assert torch.isnan(quant.expand(saved, layout)[:, 0]).all()  # and shows up as NaN


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([1, 2, 4, 8]),
    codes=st.lists(st.integers(0, 255), min_size=0, max_size=70),
)
def test_pack_unpack_round_trip(bits, codes):
    c = torch.tensor([v % (1 << bits) for v in codes], dtype=torch.uint8)
    packed = ref.pack(c, bits)
    assert packed.numel() == ref.packed_numel(c.numel(), bits)
    assert torch.equal(ref.unpack(packed, bits, c.numel()), c)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 13),
    bits=st.sampled_from([2, 4, 8]),
    group_size=st.sampled_from([1, 3, 8, None]),
    scale=st.floats(1e-3, 1e3),
)
def test_dequantized_values_stay_within_their_group_range(rows, cols, bits, group_size, scale):
    x = torch.randn(rows, cols) * scale
    saved, y = _round_trip(x, bits, (1,), group_size)
    lo_c = ref.to_channels(saved[1], (rows, cols), (1,), group_size)
    scale_c = ref.to_channels(saved[2], (rows, cols), (1,), group_size)
    tol = 1e-5 * scale
    assert (y >= lo_c - tol).all() and (y <= lo_c + scale_c * (2**bits - 1) + tol).all()
    assert ((y - x).abs() <= scale_c / 2 + tol).all()


# ------------------------------------------------------------ fused path
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("axes,group_size", [((3,), 1), ((1, 3), 1), ((3,), None), ((2,), 5)])
def test_fused_equals_reference_bit_for_bit(dtype, bits, axes, group_size):
    x = with_outliers(3, 7, 197, 65, dtype=dtype, requires_grad=False)
    a, ya = _round_trip(x, bits, axes, group_size)
    b, yb = _round_trip(x, bits, axes, group_size, impl=fused)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert torch.equal(ya, yb)
    assert fused.available()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ["row", "scaled"])
def test_fused_equals_reference_rows_and_noncontiguous(dtype, rows):
    """Row modes, on a transposed view, in each dtype: the same bits in both paths."""
    x = with_outliers(5, 65, 197, dtype=dtype, requires_grad=False).transpose(1, 2)  # (5, 197, 65)
    a, ya = _round_trip(x, 8, (2,), 1, rows=rows)
    b, yb = _round_trip(x, 8, (2,), 1, rows=rows, impl=fused)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert torch.equal(ya, yb)


def test_fp16_token_scale_compiles_without_a_warning():
    """An fp16 tensor kept with the token scale (bf16 row widths) made
    Inductor's code generator warn of mixed bf16 and fp16 in every graph, a
    warning a user training in fp16 would see and could not act on (the
    result is bit for bit the reference's, tested above). Compiled from
    scratch here: a cached graph is not generated again, and would not warn."""
    import torch._inductor.config as inductor_config

    fused._quantize.cache_clear()
    fused._dequantize.cache_clear()
    x = with_outliers(4, 33, 96, dtype=torch.float16, requires_grad=False)
    with inductor_config.patch(fx_graph_cache=False), warnings.catch_warnings():
        warnings.simplefilter("error")
        saved = fused.quantize(x, 8, (2,), 1, False, rows="scaled")
        fused.dequantize(saved, x.shape, x.dtype, 8, (2,), 1, rows="scaled")
    fused._quantize.cache_clear()
    fused._dequantize.cache_clear()


@pytest.mark.parametrize("shape,transposed,rows,dtype", [
    ((16, 197, 1536), False, "scaled", torch.float32),  # ViT-S's MLP activation: 3152 rows, 197 blocks of 16
    ((3, 211, 768), False, None, torch.float32),        # 633 rows: a remainder of 9
    ((130, 512), False, "row", torch.float32),          # just wide and tall enough
    ((3, 512, 211), True, "scaled", torch.float32),     # a transposed view
    ((16, 197, 1536), False, "scaled", torch.bfloat16),  # the same under bf16 autocast
    ((3, 211, 768), False, "row", torch.bfloat16),
    ((3, 512, 211), True, None, torch.float16),
])
def test_wide_channel_statistics_in_two_steps(shape, transposed, rows, dtype):
    """Channel ranges and scales of wide fp32, bf16 and fp16 tensors on the
    CPU are reduced over blocks of rows, then over the blocks: the same minima,
    maxima and channel scales as one reduction over every row (NaN and inf
    included), so the same codes, in the reference and the fused path alike."""
    x = with_outliers(*shape, requires_grad=False).to(dtype)
    if transposed:
        x = x.transpose(-2, -1)
    x[(1,) * x.dim()] = float("nan")
    x[(2,) * x.dim()] = float("inf")
    assert ref._wide(x)
    others = tuple(range(x.dim() - 1))
    # the channel scale: the largest magnitude, or above 8x the nonzero values' mean that cap's power of two
    a = x.double().abs()
    largest, cap = a.amax(others), 8 * a.sum(others) / (a != 0).sum(others).clamp(min=1)
    want = torch.where(largest > cap, torch.exp2(torch.floor(torch.log2(cap))), largest).float()
    torch.testing.assert_close(ref.channel_scale(x, (x.dim() - 1,)).reshape(-1), want, rtol=0, atol=0,
                               equal_nan=True)
    lo, hi = ref.channel_minmax(x, (x.dim() - 1,), False)
    torch.testing.assert_close(lo, x.float().amin(others), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(hi, x.float().amax(others), rtol=0, atol=0, equal_nan=True)
    x = x.nan_to_num(posinf=30.0)
    a, ya = _round_trip(x, 8, (x.dim() - 1,), 1, rows=rows)
    b, yb = _round_trip(x, 8, (x.dim() - 1,), 1, rows=rows, impl=fused)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert torch.equal(ya, yb)


# (each setting compiles its own functions: a few seconds each on 2 cores)
@pytest.mark.parametrize("dtype,rows,axes,group_size", [
    (torch.float32, None, (2,), 1),
    (torch.bfloat16, "row", (2,), 1),
    (torch.float32, "scaled", (2,), 5),
    (torch.bfloat16, None, (1, 2), 16),
])
def test_fused_equals_reference_with_running_ranges(dtype, rows, axes, group_size):
    """The fused path compiles the whole keep: statistics, per-group
    bookkeeping and the running-range step. Fresh, updated and reused
    (recomputed in backward) estimates, on trained-like inputs whose range
    drifts between steps, with a NaN step in between: codes, ranges and
    estimates all bit for bit."""
    runs = {impl: quant.RunningRange(momentum=0.9) for impl in ("reference", "compiled")}
    steps = [with_outliers(4, 16, 48, dtype=dtype, requires_grad=False, seed=s) * (1 + s) for s in range(3)]
    steps.insert(2, steps[1].clone())
    steps[2][0, 0, 0] = float("nan")
    for i, x in enumerate(steps):
        out = {}
        for impl, r in runs.items():
            saved, layout = quant.compress(x, 8, axes, group_size, running=r, kernel=impl, rows=rows)
            out[impl] = (tuple(saved), quant.expand(saved, layout), r.lo.clone(), r.span.clone())
        a, b = out["reference"], out["compiled"]
        for u, v in zip(a[0] + a[1:], b[0] + b[1:]):  # (NaN where the input had one)
            torch.testing.assert_close(u, v, rtol=0, atol=0, equal_nan=True, msg=f"step {i}")
    # a forward recomputed in backward uses the estimate without updating it
    # (running.plan: "use"), the same in both paths
    for r in runs.values():
        r.updated_in_forward = True
    x = steps[-1] * 2
    import unittest.mock as mock

    with mock.patch("torch_mesa.quant.running.in_backward", return_value=True):
        got = [quant.compress(x, 8, axes, group_size, running=r, kernel=impl, rows=rows)[0]
               for impl, r in runs.items()]
    for u, v in zip(*got):
        assert torch.equal(u, v)
    assert all(not r.updated_in_forward for r in runs.values())


@pytest.mark.parametrize("shape", [(64, 17, 256), (3, 5, 7), (1,), (2, 9), (0, 4)])
def test_fused_masks_equal_reference(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(1)) > 0.3
    packed = quant.pack_bits(mask)
    assert torch.equal(packed, ref.pack_bits(mask)) if mask.numel() else packed.numel() == 0
    back = quant.unpack_bits(packed, shape)
    assert back.dtype == torch.bool and torch.equal(back, mask)


def _same_bits(a, b):
    """Equal element for element, the sign of zeros and NaN included."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.isnan(), b.isnan())
    assert torch.equal(torch.signbit(a)[~a.isnan()], torch.signbit(b)[~b.isnan()])  # (a NaN's sign means nothing)
    assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("layout", ["mlp", "scores", "odd", "transposed", "transposed, odd", "one", "wide"])
def test_apply_bits_is_dropout_backward_bit_for_bit(dtype, layout):
    """A dropout's and a ReLU's masks are applied from their packed bits in
    one compiled pass (``quant.apply_bits``): the result must be ATen's
    ``native_dropout_backward`` with the boolean mask (and the product with
    it, without a scale) bit for bit, in the compiled path and the reference,
    for every scale a dropout takes, on trained-like values with outliers,
    infinities, NaN and signed zeros; on a tensor large enough for the
    compiled loop to run on two threads too ("wide")."""
    shape = {"mlp": (16, 17, 256), "scores": (4, 3, 17, 17), "odd": (3, 5, 7), "transposed": (32, 20),
             "transposed, odd": (33, 21), "one": (1,), "wide": (8, 197, 384)}[layout]
    g = torch.Generator().manual_seed(3)
    x = with_outliers(*shape, dtype=dtype, seed=3, requires_grad=False) if len(shape) > 1 \
        else torch.tensor([-2.5], dtype=dtype)
    if layout.startswith("transposed"):
        x = x.t()  # (a gradient need not be contiguous)
    flat = x.reshape(-1) if x.is_contiguous() else None
    if flat is not None and flat.numel() >= 6:
        flat[:6] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 0.0, -1e-30], dtype=dtype)
    for p in (0.1, 0.25, 0.5, 0.9):
        mask = torch.rand(x.shape, generator=g) > p
        mask[..., 0] = False  # (dropped infinities, NaN and negative values)
        scale = 1.0 / (1.0 - p)
        packed = quant.pack_bits(mask)
        want = torch.ops.aten.native_dropout_backward(x, mask, scale)
        _same_bits(quant.apply_bits(x, packed, scale), want)
        _same_bits(ref.apply_bits(x, packed, scale), want)
        _same_bits(quant.apply_bits(x, packed), x * mask)



def _variants(compiled) -> int:
    """How many graphs Dynamo has compiled for a setting's function (0 where
    every call so far ran a graph compiled directly)."""
    if compiled.impl is None:
        return 0
    code = compiled.impl._torchdynamo_orig_callable.__code__
    return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(code))


@pytest.mark.parametrize("memory", ["contiguous", "channels last"])
def test_masks_of_a_cnns_feature_maps_share_their_compiled_code(memory):
    """A CNN keeps a ReLU's (or a dropout's) mask for each of its feature
    maps, one shape per stage and width, and all of them share one setting of
    the compiled mask functions. Compiled for the 4-d shapes, the reshapes
    to and from eight-element rows made Dynamo guard on how the sizes
    divide: RexNet's masks used up the setting's recompile limit (8) in one
    step and the rest ran the eager reference, with Dynamo's warning. Twenty
    feature maps here, in both memory formats, as a CNN's backward passes its
    gradients: bit for bit the reference, at most three Dynamo graphs."""
    for f in (fused._pack_bits, fused._unpack_bits, fused._apply_bits):
        f.cache_clear()
    g = torch.Generator().manual_seed(0)
    shapes = [(2, c, s, s) for c, s in [(16, 32), (27, 16), (38, 16), (50, 8), (61, 8), (72, 4), (84, 4),
                                        (95, 2), (106, 2), (117, 2), (128, 2), (140, 3), (151, 1), (162, 1),
                                        (174, 5), (185, 7), (16, 31), (3, 9), (1280, 1), (7, 7)]]
    for shape in shapes:
        x = with_outliers(*shape, seed=len(shape) + shape[1], requires_grad=False)
        if memory == "channels last":
            x = x.contiguous(memory_format=torch.channels_last)
        mask = torch.rand(shape, generator=g) > 0.5
        packed = fused.pack_bits(mask)
        assert torch.equal(packed, ref.pack_bits(mask)), shape
        assert torch.equal(fused.unpack_bits(packed, shape), mask), shape
        _same_bits(fused.apply_bits(x, packed, 2.0), torch.ops.aten.native_dropout_backward(x, mask, 2.0))
    settings = {"pack": fused._pack_bits(4, True), "unpack": fused._unpack_bits(4, True),
                "apply": fused._apply_bits(4, torch.float32, True)}
    graphs = {name: _variants(c) for name, c in settings.items()}
    assert all(n <= 3 for n in graphs.values()), f"Dynamo graphs per setting: {graphs}"
    assert not any(c in fused._failed for c in settings.values())


def test_a_new_dropout_probability_compiles_nothing(monkeypatch):
    """The dropout factor is an input of the compiled mask application, not
    a constant of it: a schedule that changes ``p`` every step (annealed or
    early dropout) once compiled a graph per value, about 1.4 s a step on a
    2-core CPU. Five probabilities, forward and gradient still bit for bit
    ``F.dropout``'s, and the first one compiles the only graph."""
    from torch_mesa import MesaConfig, ops

    monkeypatch.setenv("TORCH_MESA_KERNEL", "compiled")
    compiles = []
    real = fused._Compiled._compile_direct

    def counted(self, args):
        compiles.append(self.tag)
        return real(self, args)

    monkeypatch.setattr(fused._Compiled, "_compile_direct", counted)
    x = with_outliers(3, 11, 40, seed=2)
    g = with_outliers(3, 11, 40, seed=4, requires_grad=False)
    seen = []
    for p in (0.1, 0.137, 0.2, 0.31, 0.5):
        torch.manual_seed(7)
        out = ops.dropout(x, p, True, config=MesaConfig())
        torch.manual_seed(7)
        want = torch.nn.functional.dropout(x, p, True)
        assert torch.equal(out, want)
        assert torch.equal(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(want, x, g)[0])
        seen.append(len(compiles))
    assert seen[1:] == seen[:1] * 4, f"compiled again for a new probability: {compiles}"

def test_fused_stochastic_rounding_is_unbiased():
    x = torch.randn(64, 32)
    draws = 400
    total = torch.zeros_like(x)
    for _ in range(draws):
        saved, y = _round_trip(x, 2, (1,), 1, stochastic=True, impl=fused)
        total += y
    step = ref.to_channels(saved[2], (64, 32), (1,), 1)
    assert (((total / draws) - x).abs() / step).mean() < 0.04


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_fused_stochastic_equals_reference_for_the_same_seed(bits, monkeypatch):
    """The rounding noise is a hash of (element index, seed): both paths given
    the same place in the private seed stream round identically."""
    import itertools

    x = with_outliers(3, 7, 37, 65, requires_grad=False)
    monkeypatch.setattr(ref, "_seeds", itertools.count(5))
    a, ya = _round_trip(x, bits, (3,), 1, stochastic=True)
    monkeypatch.setattr(ref, "_seeds", itertools.count(5))
    b, yb = _round_trip(x, bits, (3,), 1, stochastic=True, impl=fused)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert torch.equal(ya, yb)


def test_hash_noise_is_uniform():
    u = ref.uniform_from_seed((1 << 20,), torch.tensor(12345))
    assert 0.0 <= u.min() and u.max() < 1.0
    hist = torch.histc(u, bins=64, min=0.0, max=1.0)
    expected = u.numel() / 64
    chi2 = ((hist - expected) ** 2 / expected).sum().item()
    assert chi2 < 120  # 63 degrees of freedom: p < 1e-5 above ~120
    # neighbouring elements are uncorrelated
    corr = torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].abs().item()
    assert corr < 0.01
    v = ref.uniform_from_seed((1 << 20,), torch.tensor(12346))
    assert torch.corrcoef(torch.stack([u, v]))[0, 1].abs().item() < 0.01


def test_kernel_env_override(monkeypatch):
    monkeypatch.setenv("TORCH_MESA_KERNEL", "reference")
    _, layout = quant.compress(torch.randn(4, 4), 8)
    assert layout.kernel == "reference"
    monkeypatch.setenv("TORCH_MESA_KERNEL", "fast")
    with pytest.raises(ValueError, match="TORCH_MESA_KERNEL"):
        quant.compress(torch.randn(4, 4), 8)


@pytest.mark.slow
def test_more_than_2_to_the_31_elements():
    """int32 index overflow would corrupt the tail of a huge tensor. ~11 GiB
    of memory: run with ``pytest -m slow`` (not in the default run)."""
    n = 2**31 + 4099
    x = torch.empty(n // 4099, 4099, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    for i in range(0, x.shape[0], 65536):  # fill in chunks: no fp32 copy of the whole
        x[i:i + 65536] = torch.randn(min(65536, x.shape[0] - i), 4099, generator=g).to(torch.bfloat16)
    saved, layout = quant.compress(x, 8, axes=-1, group_size=1)
    assert saved[0].numel() == x.numel()
    lo, scale = saved[1], saved[2]
    for rows in (slice(0, 3), slice(x.shape[0] // 2, x.shape[0] // 2 + 3), slice(-3, None)):
        xs = x[rows].float()
        expected = torch.clamp(torch.round((xs - lo) / scale), 0, 255).to(torch.uint8)
        codes = saved[0].view(x.shape)[rows]
        assert torch.equal(codes, expected)
    y = quant.expand(saved, layout)
    tail = slice(-3, None)
    assert torch.equal(y[tail], (saved[0].view(x.shape)[tail].float() * scale + lo).to(torch.bfloat16))


@pytest.mark.parametrize("dtype,rows", [(torch.float32, None), (torch.bfloat16, "scaled")])
def test_each_input_layout_runs_the_graph_compiled_for_it(dtype, rows):
    """The first layouts of a setting run graphs compiled for exactly that
    layout, with no guard: a view of the same shape with other strides, or
    at an unaligned offset, must get its own graph or one that reads it
    right, and further shapes go through Dynamo. Every result equals the
    eager reference bit for bit, keep and expand alike."""
    setting = dict(bits=8, axes=(2,), group_size=1, rows=rows, running=None)

    def keep(x):
        return ref.quantize_core(x, None, None, None, None, **setting)

    def expand(shape, *saved):
        return ref.dequantize_core(saved, shape=shape, dtype=dtype, bits=8, axes=(2,), group_size=1, rows=rows)

    k, e = fused._Compiled(keep, f"test_keep_{rows}"), fused._Compiled(expand, f"test_expand_{rows}")
    base = with_outliers(5, 33, 65, dtype=dtype, requires_grad=False)
    buffer = torch.empty(base.numel() + 3, dtype=dtype)
    unaligned = buffer[3:].view(base.shape).copy_(base.flip(0))  # same layout as base, 6 or 12 bytes off
    inputs = [
        base,                                                                   # direct
        with_outliers(5, 65, 33, dtype=dtype, requires_grad=False).transpose(1, 2),  # same shape, other strides
        unaligned,                                                              # base's layout and graph
        with_outliers(3, 40, 65, dtype=dtype, requires_grad=False),            # more shapes: Dynamo
        with_outliers(7, 9, 65, dtype=dtype, requires_grad=False),
    ]
    for x in inputs:
        want, got = keep(x), k(x)
        assert len(want) == len(got)
        for u, v in zip(want, got):
            assert torch.equal(u, v)
        assert torch.equal(expand(tuple(x.shape), *want), e(tuple(x.shape), *got))
    assert len(k.direct) == len(e.direct) == fused._DIRECT_LAYOUTS == 2
    assert k.dynamic and k.impl is not None


@pytest.mark.parametrize("kind", ["mask", "4 bits", "2 bits, stochastic", "8 bits, stochastic, scaled"])
def test_every_kind_of_setting_compiles_directly(kind):
    """Every setting's first layouts run graphs compiled for them, without
    Dynamo: the keep and the expansion of 1-bit masks, of 4 and 2 bits and of
    stochastic rounding too. Those make tensors inside (the shifts that
    unpack codes, the counter that seeds the noise); traced outside the fake
    mode, such a tensor came out real and the direct compile failed, so they
    went through Dynamo on every call. The results equal the reference bit
    for bit."""
    fused._quantize.cache_clear()
    fused._dequantize.cache_clear()
    fused._pack_bits.cache_clear()
    fused._unpack_bits.cache_clear()
    x = with_outliers(4, 17, 64, requires_grad=False)
    if kind == "mask":
        mask = x > 0.3
        packed = fused.pack_bits(mask)
        assert torch.equal(packed, ref.pack_bits(mask))
        assert torch.equal(fused.unpack_bits(packed, mask.shape), mask)
        made = [fused._pack_bits(3, True), fused._unpack_bits(3, True)]
    else:
        bits = 8 if "8" in kind else int(kind[0])
        stochastic = "stochastic" in kind
        rows = "scaled" if "scaled" in kind else None
        seed = ref.next_seed(x.device) if stochastic else None
        settings = dict(bits=bits, axes=(2,), group_size=1, rows=rows, running=None)
        a = ref.quantize_core(x, seed, None, None, None, **settings)
        b = fused._quantize_core(x, seed, None, None, None, **settings)
        for u, v in zip(a, b):
            assert torch.equal(u, v)
        assert torch.equal(ref.dequantize(a, x.shape, x.dtype, bits, (2,), 1, rows=rows),
                           fused.dequantize(b, x.shape, x.dtype, bits, (2,), 1, rows=rows))
        # one setting each, so the lookups below return the objects just used
        assert fused._quantize.cache_info().currsize == fused._dequantize.cache_info().currsize == 1
        made = [fused._quantize(torch.float32, 3, bits, (2,), 1, rows, None, stochastic, True),
                fused._dequantize(3, torch.float32, bits, (2,), 1, rows, True)]
    for compiled in made:
        assert compiled.direct, f"{compiled.tag}: no graph compiled directly"
        assert compiled.impl is None, f"{compiled.tag}: went through Dynamo"


def test_a_graph_compiled_for_one_tensor_passed_twice_never_serves_two():
    """A running estimate's first step passes one zero tensor as both its
    low end and its span; the graph compiled then reads one input for both.
    The same layout with two different tensors (every later step), or with
    the tensor in other positions, must get graphs of their own."""
    def fn(a, b, c):
        return a * 2 + b - c

    compiled = fused._Compiled(fn, "test_passed_twice")
    z, u, v = torch.zeros(6), torch.randn(6), torch.randn(6)
    for args in [(z, z, u), (u, v, z), (u, v, v), (v, u, v), (u, u, u)]:
        assert torch.equal(compiled(*args), fn(*args))


@pytest.mark.parametrize("fails", ["every size dynamic", "every size dynamic, then automatic too"])
def test_a_failed_dynamic_trace_tries_sizes_made_dynamic_as_they_vary(monkeypatch, fails):
    """PyTorch 2.11's Dynamo failed to trace a setting's third layout with
    every size dynamic, after its first two were compiled directly ("RuntimeError
    when making fake tensor call"): the setting fell back to the eager
    reference for the rest of the process, with a warning. Dynamo's default
    (sizes made dynamic as they vary) traces it there, so that is tried
    before giving up; where it fails too, the reference takes over as before,
    with the warning. Simulated here (this PyTorch traces it): the compile
    with every size dynamic raises Dynamo's error."""
    import warnings

    monkeypatch.setattr(fused, "_broken", None)
    monkeypatch.setattr(fused, "_failed", set())
    real_make = fused._Compiled._make

    def make(self, dynamic):
        if dynamic is True or fails.endswith("too"):
            def broken(*args):
                raise RuntimeError("TorchRuntimeError: RuntimeError when making fake tensor call")
            return broken
        return real_make(self, dynamic)

    monkeypatch.setattr(fused._Compiled, "_make", make)

    def keep(x):
        return ref.quantize_core(x, None, None, None, None, bits=8, axes=(2,), group_size=1, rows=None, running=None)

    compiled = fused._Compiled(keep, f"test_automatic_{len(fails)}")
    shapes = [(2, 9, 24), (3, 9, 24), (4, 9, 24), (5, 11, 24), (6, 7, 24)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for shape in shapes:
            x = with_outliers(*shape, requires_grad=False)
            got = fused._run(compiled, keep, x)
            for u, v in zip(keep(x), got):
                assert torch.equal(u, v)
    fell_back = [w for w in caught if "compiling the fused quantizer failed" in str(w.message)]
    if fails.endswith("too"):
        assert len(fell_back) == 1 and compiled in fused._failed
    else:
        assert not fell_back and fused.available() and compiled not in fused._failed
        assert compiled.automatic and len(compiled.direct) == fused._DIRECT_LAYOUTS


@pytest.mark.parametrize("names", [("optimization_hint", "size_hint", "hint_int"), ("size_hint", "hint_int"),
                                   ("hint_int",)])
def test_symbolic_sizes_are_read_with_the_newest_hint_function(monkeypatch, names):
    """A symbolic size's example value is read with the newest of PyTorch's
    names for it: 2.11 has ``size_hint`` and still ``hint_int``, which warns
    (FutureWarning) on every call, once per graph the quantizer compiled."""
    import warnings

    from torch.fx.experimental import symbolic_shapes

    def hint(value, name):
        def read(n, fallback=None):
            if name != names[0]:
                warnings.warn(f"{name} used instead of {names[0]}", FutureWarning)
            return value
        return read

    for i, name in enumerate(("optimization_hint", "size_hint", "hint_int")):
        if name in names:
            monkeypatch.setattr(symbolic_shapes, name, hint(7 + i, name), raising=False)
        else:
            monkeypatch.delattr(symbolic_shapes, name, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fused._size_hint(object()) == 7 + ("optimization_hint", "size_hint", "hint_int").index(names[0])


def test_compile_failure_falls_back_to_the_reference_with_one_warning(monkeypatch):
    import warnings

    monkeypatch.setattr(fused, "_broken", None)
    monkeypatch.setattr(fused, "_failed", set())

    def broken_compiler(*args):
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

    x = torch.randn(5, 7)
    with pytest.warns(RuntimeWarning, match="compiling the fused quantizer failed"):
        out = fused._run(broken_compiler, lambda t: t * 2, x)
    assert torch.equal(out, x * 2)
    assert not fused.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert torch.equal(fused._run(broken_compiler, lambda t: t * 3, x), x * 3)
    # an error the eager code raises too is the input's fault: it surfaces
    monkeypatch.setattr(fused, "_failed", set())

    def bad_input(t):
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        fused._run(bad_input, bad_input, x)


@pytest.mark.parametrize("rows,group_size,running", [(None, 1, None), ("row", 1, None), ("scaled", 1, None),
                                                     ("scaled", 8, "update"), (None, None, None)])
def test_each_divisor_is_computed_once_with_rounded_widths_kept(rows, group_size, running):
    """The compiled quantizer computes each divisor's reciprocal once, into a
    buffer (``fused._realize_divisors``), instead of once per element in
    every pass; and it does so only together with Inductor's option that
    keeps casts to a narrower dtype (the token scale's bf16 widths: the codes
    must use the rounded width the expansion uses; with the cast elided they
    did not, and the bit-for-bit tests above failed, before the widths were
    rounded on their bits). Every reciprocal the
    quantizer takes is of a per-channel, per-row or per-group value: a
    buffer of at most an eighth of the tensor, never of the tensor itself."""
    from torch.fx.experimental.proxy_tensor import make_fx

    options = fused._options(False)
    if not options or "post_grad_custom_post_pass" not in options:
        pytest.skip("this PyTorch takes no custom Inductor pass")
    assert options["emulate_precision_casts"] is True
    assert fused._options(True)["emulate_precision_casts"] is True
    x = with_outliers(8, 50, 96, dtype=torch.bfloat16, requires_grad=False)
    state = (torch.zeros(96 // (group_size or 96)), torch.zeros(96 // (group_size or 96)),
             torch.tensor(0.9)) if running else (None, None, None)
    graph = make_fx(lambda t, *s: ref.quantize_core(t, None, *s, bits=8, axes=(2,), group_size=group_size,
                                                    rows=rows, running=running))(x, *state).graph
    recips = [n for n in graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.reciprocal.default]
    assert recips, "the keep divides nothing: the pass has nothing to do"
    for n in recips:
        assert 8 * n.meta["val"].numel() <= x.numel(), n.meta["val"].shape
    fused._realize_divisors(graph)
    assert all(n.meta.get("inductor_realize_to_strides") for n in recips)


@pytest.mark.parametrize("kind", ["every exponent", "ties", "edges"])
def test_row_widths_round_on_their_bits_as_a_bf16_cast_does(kind):
    """The token scale's widths are rounded to bf16 by integer arithmetic
    (a compiler may elide a pair of casts, never that): the same values as
    ``.to(torch.bfloat16).float()``, ties to even, up to overflow to inf,
    NaN kept NaN."""
    g = torch.Generator().manual_seed(0)
    if kind == "every exponent":  # random normal fp32 bit patterns, all exponents
        t = torch.randint(0x00800000, 0x7F800000, (1_000_000,), generator=g, dtype=torch.int32).view(torch.float32)
    elif kind == "ties":  # exactly halfway between two bf16 values, even and odd below
        t = ((torch.randint(0x0080, 0x7F7F, (100_000,), generator=g, dtype=torch.int32) << 16) | 0x8000)
        t = t.view(torch.float32)
    else:
        t = torch.tensor([1.0, 0.99999994, torch.finfo(torch.float32).tiny, 3.3895314e38,
                          torch.finfo(torch.float32).max, float("inf"), float("nan")])
    got, want = ref._bf16_exact(t), t.to(torch.bfloat16).float()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~got.isnan()], want[~want.isnan()])
