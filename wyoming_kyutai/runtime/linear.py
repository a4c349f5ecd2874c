"""Matrix products of the runtime: :class:`Dense` (float32 or bfloat16 weights prepacked for
oneDNN: Mimi's products, and every float product of the LM) and :class:`Linear` (float32
through :class:`Dense`, or int8 weights with a per-stream activation grid: the LM's).

Every product here gives a row (a stream's position) the same bits whatever other rows share
its call: a stream's transcript must not depend on who else is talking. Libraries do not
promise that: MKL's and oneDNN's float kernels pick their algorithm (and so their rounding)
by the number of rows, differently on each CPU (on AMD Zen 4, MKL rounds 2-3 rows one way
and 4 or more another; on Intel AMX, bfloat16 rows take AMX tiles or not by count). So:

- int8 and 4-bit products accumulate exactly (integers) or in a fixed per-output order, by
  construction (see :class:`Linear`, :class:`Int4Linear`);
- float products (:class:`Dense`) run through oneDNN with prepacked weights, a single row as
  two (oneDNN's one-row kernel rounds otherwise), and at construction :func:`rows_agree`
  checks on this CPU, at this thread count, that rows give the same bits in calls of 1 to
  :data:`ROW_COUNTS_CHECKED`'s rows at any offset. Where they do not, that product computes
  every row alone (a batch of one-row products in one call: :data:`PER_ROW`), which is
  batch-independent by construction, and slower; one log line says so.

int8 uses PyTorch's dynamic quantized linear (fbgemm/x86 on x86, qnnpack on ARM): int8 weights
per output channel, activations quantized to uint8 at run time. That op picks one activation
scale for its whole input, which would make one stream's result depend on the others in the
batch. So every row (stream) is first scaled into [-1, 1] by its own largest magnitude, and a
guard row holding exactly -1 and +1 goes in front of them: the activation grid is then the same
fixed one whatever else is in the batch, and each row's own scale is multiplied back afterwards
(the layers have no bias). A stream's output depends only on its own input, bit for bit. That
needs an engine whose rows are computed independently: x86/fbgemm or qnnpack, not onednn's
quantized engine (:func:`pick_quantized_engine`, called before int8 weights are packed).
"""

from __future__ import annotations

import functools
import logging
import threading
import warnings
from collections.abc import Callable

import torch

# the op's overload itself: calling it skips the per-call overload resolution (~4 us a call)
_LINEAR_DYNAMIC = torch.ops.quantized.linear_dynamic.default
_PREPACK = torch.ops.quantized.linear_prepack.default


QUANTIZED_ENGINES = ("x86", "fbgemm", "qnnpack")
"""The int8 engines :class:`Linear` runs on, best first (rows computed independently)."""


def quantized_engine(engines: list[str] | None = None) -> str | None:
    """The int8 engine :func:`pick_quantized_engine` would select, or None where this torch
    has none for this CPU (torch lists fbgemm/x86 only on CPUs their kernels run on);
    selects nothing. ``engines``: torch's ``supported_engines`` (tests give others)."""
    if engines is None:
        engines = torch.backends.quantized.supported_engines
    return next((name for name in QUANTIZED_ENGINES if name in engines), None)


def pick_quantized_engine() -> str:
    """Select the fastest quantized engine this torch has (x86/fbgemm, else qnnpack)."""
    name = quantized_engine()
    if name is None:
        raise RuntimeError("this build of torch has no quantized engine; use quantize none")
    if torch.backends.quantized.engine != name:
        torch.backends.quantized.engine = name
    return name


class Linear:
    """``y = x @ W.T`` without bias; ``int8`` stores W as int8 per output channel, float32
    runs as a :class:`Dense` product (rows independent of each other; not PyTorch's
    ``F.linear``, whose MKL kernels round by the number of rows).

    The float32 weight is not kept once the int8 one is made.
    """

    def __init__(self, weight: torch.Tensor, int8: bool = False) -> None:
        if weight.dim() != 2:
            raise ValueError("a linear weight is 2-D [out, in]")
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        self.int8 = int8
        self.weight: torch.Tensor | None = None  # no float copy kept (int8) or Dense's
        self.packed: object | None = None
        self.dense: Dense | None = None
        if int8:
            if self.in_features < 2:
                raise ValueError("int8 linears need at least 2 input features")
            self.packed = _prepack(weight.float())
            self._reduce_range = _needs_reduced_range(torch.backends.quantized.engine)
            self._buffers = threading.local()
        else:
            self.dense = Dense(weight.float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            return self.dense(x)
        shape = x.shape
        rows = torch.nan_to_num(x.reshape(-1, self.in_features).float())  # one bad row ≠ all
        count = rows.shape[0]
        buffer = self._input_buffer(count)[: count + 1]
        scale = rows.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12)
        torch.div(rows, scale, out=buffer[1:])
        out = _LINEAR_DYNAMIC(buffer, self.packed, self._reduce_range)[1:] * scale
        return out.reshape(*shape[:-1], self.out_features)

    def _input_buffer(self, count: int) -> torch.Tensor:
        """This thread's input buffer, at least [count + 1, in]: row 0 is the guard (+1, -1),
        the rows of a call go at 1..count. One per thread, grown to the most rows seen."""
        buffer: torch.Tensor | None = getattr(self._buffers, "rows", None)
        if buffer is None or buffer.shape[0] < count + 1:
            # a normal tensor even when made under inference_mode, so that calls outside it
            # (which write into the buffer) keep working
            with torch.inference_mode(False):
                buffer = torch.zeros(count + 1, self.in_features)
                buffer[0, 0], buffer[0, 1] = 1.0, -1.0
            self._buffers.rows = buffer
        return buffer

    @property
    def resident_bytes(self) -> int:
        """Resident bytes of the weights (int8: one byte per weight plus per-channel scales)."""
        if self.dense is not None:
            return self.dense.resident_bytes
        return self.out_features * self.in_features + self.out_features * 12


def _has_onednn() -> bool:
    """Whether this torch can prepack a weight for oneDNN's matrix product (x86 and ARM
    builds normally can)."""
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


ONEDNN = _has_onednn()
"""Dense products go through oneDNN with prepacked weights (else a plain ``matmul``)."""


ROW_COUNTS_CHECKED = (1, 2, 3, 4, 5, 8, 16, 17, 32, 33)
"""Row counts whose calls :func:`rows_agree` compares, row by row, with one call of all rows:
around where kernels for few rows switch (1/2 in oneDNN, 3/4 in MKL on AMD Zen 4, 16 on
Intel AMX) and the blocks they use. Few on purpose: oneDNN keeps a compiled kernel for every
row count it has seen (about 0.3 MB each), so every count checked costs resident memory for
every product shape (the full sweep is the test suite's, tests/test_batch_invariance.py)."""

PER_ROW = "rows"
""":attr:`Dense.kernel` of a product that computes every row alone (see :func:`rows_agree`)."""

_ROWS_AGREE: dict[tuple[object, ...], bool] = {}  # rows_agree's verdicts, by call shape

log = logging.getLogger(__name__)


class Dense:
    """``y = x @ W.T`` for a fixed float32 or bfloat16 weight ``W`` [out, in], without bias;
    the result in the weight's dtype (bfloat16: the input rounded to bfloat16, float32
    accumulation, the result rounded to bfloat16). A row's result does not depend on the
    other rows of the call, bit for bit (see the module docstring).

    The weight is prepacked once for oneDNN: for the few rows a streaming step multiplies,
    PyTorch's default float32 product (MKL) re-lays out the weight at every call and reads
    it slowly; prepacked, Mimi's products of a frame take about half the time, in float32
    and in bfloat16. oneDNN computes a single row by another kernel than several, which
    rounds differently: a single row runs as two. The same products as moshi's up to
    float32 rounding order. Where this torch has no oneDNN, or it refuses the weight, a
    plain ``matmul`` on the weight laid out [in, out] (``packed=False`` forces that; the
    default is :data:`ONEDNN` at construction). Either way, where :func:`rows_agree` finds
    on this CPU that rows depend on their neighbours, every row is computed alone
    (:attr:`kernel` is :data:`PER_ROW`). :attr:`kernel` names the kernel family: ``onednn``,
    ``onednn-amx`` (oneDNN on a CPU with AMX tiles), ``matmul`` or :data:`PER_ROW`.
    """

    def __init__(
        self, weight: torch.Tensor, dtype: torch.dtype = torch.float32, packed: bool | None = None
    ) -> None:
        if weight.dim() != 2:
            raise ValueError("a dense weight is 2-D [out, in]")
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dense products are float32 or bfloat16, not {dtype}")
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        self.dtype = dtype
        self.packed: torch.Tensor | None = None
        self.matrix: torch.Tensor | None = None
        weight = weight.to(dtype).contiguous()
        if packed if packed is not None else ONEDNN:
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight)
            except RuntimeError:  # e.g. a CPU or shape this oneDNN build does not handle
                self.packed = None
        self.kernel = "matmul"
        if self.packed is not None:
            self.kernel = "onednn-amx" if amx_available() else "onednn"
        else:
            self.matrix = weight.t().contiguous()
        shape = (self.kernel, self.in_features, self.out_features, dtype, torch.get_num_threads())
        if shape not in _ROWS_AGREE:  # asked once per kernel, shape and thread count
            _ROWS_AGREE[shape] = rows_agree(self, self.in_features, dtype)
        if not _ROWS_AGREE[shape]:
            self._compute_rows_alone(weight)

    def _compute_rows_alone(self, weight: torch.Tensor) -> None:
        """Switch to one-row products: each row multiplied alone, in one batched call."""
        log.info(
            "this CPU's %s %s product %dx%d gives a row other bits when other rows share the "
            "call: each row is computed alone (slower)",
            self.kernel,
            str(self.dtype).removeprefix("torch."),
            self.in_features,
            self.out_features,
        )
        self.packed, self.matrix, self.kernel = None, weight.t().contiguous(), PER_ROW
        if not rows_agree(self, self.in_features, self.dtype):
            log.warning(
                "rows of the %dx%d product depend on the batch even one by one on this CPU: "
                "a stream's result may differ in the last bit with others talking",
                self.in_features,
                self.out_features,
            )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        if self.kernel == PER_ROW:
            assert self.matrix is not None
            rows = x.reshape(-1, self.in_features)
            count = rows.shape[0]
            out = torch.bmm(rows.unsqueeze(1), self.matrix.expand(count, -1, -1))
            return out.view(*x.shape[:-1], self.out_features)
        if x.numel() == x.shape[-1]:  # one row: run as two (see the class docstring)
            twice = x.reshape(1, -1).expand(2, -1)
            return self._product(twice.contiguous())[:1].view(*x.shape[:-1], -1)
        return self._product(x)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(
                x.contiguous(), self.packed, None, "none", [], ""
            )
        assert self.matrix is not None
        return torch.matmul(x, self.matrix)

    @property
    def resident_bytes(self) -> int:
        """Bytes of the weight (prepacked or not: the same count of elements)."""
        return self.out_features * self.in_features * (2 if self.dtype == torch.bfloat16 else 4)


def rows_agree(
    product: Callable[[torch.Tensor], torch.Tensor], in_features: int, dtype: torch.dtype
) -> bool:
    """Whether ``product`` gives every row the same bits in a call of any of
    :data:`ROW_COUNTS_CHECKED` rows, starting at any of a few offsets, as in one call of all
    of them: kernels choose by the number of rows, so this is asked of the CPU, at the
    current thread count, not assumed. Random rows, the same for every check."""
    generator = torch.Generator().manual_seed(0)
    most = max(ROW_COUNTS_CHECKED)
    x = torch.randn(most + 8, in_features, generator=generator).to(dtype)
    whole = product(x)
    for count in ROW_COUNTS_CHECKED:
        for start in {0, count % 7 + 1}:
            if not torch.equal(product(x[start : start + count]), whole[start : start + count]):
                return False
    return True


@functools.cache
def amx_available() -> bool:
    """Whether this CPU has AMX tiles (Intel Xeon 4th generation and later), on which oneDNN
    runs bfloat16 and int8 products: named in :attr:`Dense.kernel` and the bench."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None else False


@functools.cache
def _needs_reduced_range(engine: str) -> bool:
    """Whether int8 activations must use 7 bits on ``engine`` (PyTorch's ``reduce_range``).

    fbgemm without VNNI sums pairs of uint8 x int8 products in int16, which full 8-bit
    activations can overflow; with AVX512-VNNI it accumulates in int32, and 8 bits halve the
    activations' rounding step (a 2048-wide product's error drops by about 40 %). Checked
    once, on the kernel itself: a product whose pairs would
    overflow int16 (every activation and weight at its largest) must come out right with 8
    bits. qnnpack takes no such option (and warns if asked)."""
    if engine == "qnnpack":
        return False
    features = 256
    ones = torch.ones(2, features)
    ones[0, 1] = -1.0  # the guard row: activations on the grid of [-1, 1]
    out = _LINEAR_DYNAMIC(ones, _prepack(torch.ones(8, features)), False)[1]
    return not bool(((out - features).abs() < 0.02 * features).all())


def _prepack(weight: torch.Tensor) -> object:
    """Symmetric per-output-channel int8 weights, packed for the current quantized engine."""
    amax = weight.abs().amax(dim=1).clamp_min(1e-12)
    scales = (amax / 127.5).double()
    zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        # quantized tensors are deprecated in favour of torchao, but work in the torch we pin
        warnings.simplefilter("ignore")
        qweight = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
    return _PREPACK(qweight, None)


# --- 4-bit weights ------------------------------------------------------------------------------

INT4_GROUP_SIZES = (32, 64, 128, 256)
"""Group sizes (input features per scale) that both 4-bit kernels take."""

INT4_KERNELS = ("int4pack", "kleidiai")
"""The 4-bit kernels :class:`Int4Linear` runs (see :func:`pick_int4_kernel`)."""

_INT4_OUT_MULTIPLE = 16  # int4pack packs output features in blocks of 16 (checked by the op)


@functools.cache
def kleidiai_available() -> bool:
    """Whether this torch multiplies 4-bit weights with Arm's KleidiAI kernels (int8 dot
    products) rather than with its portable reference implementation.

    Asked of the op itself: torch packs for KleidiAI only on an aarch64 build with KleidiAI
    whose CPU has the dot-product instructions (a Cortex-A72 has not, an A76 has), and packs
    into bytes; anywhere else ``_dyn_quant_pack_4bit_weight`` falls back to its reference,
    which packs into float32 and multiplies element by element (on x86: 1.9 s for the LM's
    64 products at batch 1, never to be used)."""
    backend = getattr(torch.backends, "kleidiai", None)
    if backend is None or not backend.is_available():
        return False
    if not hasattr(torch.ops.aten, "_dyn_quant_pack_4bit_weight"):
        return False
    try:
        codes = torch.full((32, 32), 0x88, dtype=torch.uint8)  # 32 outputs x 64 inputs of 0
        scales = torch.ones(32, 2, dtype=torch.bfloat16)  # groups of 32: 2 per output
        packed = torch.ops.aten._dyn_quant_pack_4bit_weight(codes, scales, None, 32, 64, 32)
    except RuntimeError:
        return False
    return packed.dtype == torch.uint8


def pick_int4_kernel(machine: str | None = None, kleidiai: bool | None = None) -> str:
    """The 4-bit kernel for this CPU: ``"kleidiai"`` on aarch64 where torch really has it
    (:func:`kleidiai_available`), else ``"int4pack"``.

    ``int4pack`` is ``torch.ops.aten._weight_int4pack_mm_for_cpu``: bfloat16 activations, each
    weight decoded to float32 and accumulated in float32 (AVX-512 / AVX2 code on x86, NEON on
    ARM). ``kleidiai`` is ``_dyn_quant_matmul_4bit``: activations quantized to int8 per row,
    int8 dot products (the reason to prefer it on ARM). On x86 that op is a slow reference,
    so x86 always gets ``int4pack``, whatever ``kleidiai`` says. ``machine`` (default
    ``platform.machine()``) and ``kleidiai`` (default: asked of torch) let tests choose the
    answer for another CPU."""
    import platform  # here, not at the top: this module's imports are shared with others

    arch = (machine if machine is not None else platform.machine()).lower()
    arm64 = arch in ("aarch64", "arm64") or arch.startswith("armv8")
    if arm64 and (kleidiai if kleidiai is not None else kleidiai_available()):
        return "kleidiai"
    return "int4pack"


@functools.cache
def int4_available() -> bool:
    """Whether this torch has the 4-bit CPU kernel :func:`pick_int4_kernel` would pick
    (int4pack's ops came with torch 2.6; KleidiAI's are asked of the op itself)."""
    if pick_int4_kernel() == "kleidiai":
        return True
    ops = torch.ops.aten
    return hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(
        ops, "_convert_weight_to_int4pack_for_cpu"
    )


class Int4Linear:
    """``y = x @ W.T`` without bias, with W [out, in] stored in 4 bits: each output feature's
    inputs in groups of ``group_size``, one scale per group (and for ``int4pack`` one offset).
    The float32 weight is not kept; quantized once, at construction.

    ``kernel`` (default :func:`pick_int4_kernel`):

    - ``"int4pack"``: asymmetric codes, ``w = (q - 8) * scale + zero`` with q in 0..15 and
      bfloat16 scale and zero (the op's format); the input is rounded to bfloat16, the sum is
      float32, the result is rounded to bfloat16 and returned as float32 (the op's float32
      and float16 paths are scalar code, 30-100x slower). Each output element is one thread's
      fixed-order sum over its row: a row's result does not depend on the other rows of the
      call, bit for bit (tested).
    - ``"kleidiai"`` (aarch64): symmetric codes, ``w = (q - 8) * scale`` with bfloat16 scales,
      the input quantized to int8 per row at run time. Rows are quantized independently; on
      CPUs with i8mm torch runs one row through another micro-kernel (dot product) than
      several (i8mm), which could round differently, but under emulation (qemu, with and
      without i8mm) a row alone gave the bits it gets batched (tests/test_runtime_int4.py,
      script/test-aarch64). Elsewhere the op is its slow reference: only for tests.

    Input features are padded with zeros to a multiple of the group (inputs too, at each call:
    a copy; the LM's 2048 and 5632 need none), output features to a multiple of 16.
    Resident: about half a byte per weight plus 4 (``int4pack``) or 2 (``kleidiai``) bytes
    per group: 0.53x the int8 :class:`Linear` at group 128.
    """

    int8 = False  # the int8 Linear's flag (callers that single out int8 products skip this)
    weight = None  # no float copy kept

    def __init__(
        self, weight: torch.Tensor, group_size: int = 128, kernel: str | None = None
    ) -> None:
        if weight.dim() != 2:
            raise ValueError("a linear weight is 2-D [out, in]")
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(
                f"4-bit group size must be one of {INT4_GROUP_SIZES}, not {group_size}"
            )
        kernel = kernel if kernel is not None else pick_int4_kernel()
        if kernel not in INT4_KERNELS:
            raise ValueError(f"4-bit kernel must be one of {INT4_KERNELS}, not {kernel!r}")
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        if self.out_features < 1 or self.in_features < 1:
            raise ValueError("a 4-bit linear needs at least one input and one output feature")
        self.group_size = group_size
        self.kernel = kernel
        self._in = -(-self.in_features // group_size) * group_size
        self._out = -(-self.out_features // _INT4_OUT_MULTIPLE) * _INT4_OUT_MULTIPLE
        padded = weight.float()
        if (self._out, self._in) != (self.out_features, self.in_features):
            padded = torch.zeros(self._out, self._in)
            padded[: self.out_features, : self.in_features] = weight
        groups = padded.view(self._out, self._in // group_size, group_size)
        self.scales: torch.Tensor | None = None
        if kernel == "int4pack":
            codes, scale, zero = quantize_int4_asymmetric(groups)
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                codes.view(self._out, self._in).to(torch.int32), 1
            )
            # [in / group, out, 2]: the op's layout of scales and zeros
            self.scales = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
        else:
            codes, scale = quantize_int4_symmetric(groups)
            pairs = codes.view(self._out, self._in // 2, 2)
            nibbles = pairs[..., 0] | (pairs[..., 1] << 4)  # even input in the low nibble
            # KleidiAI's per-channel kernel (one group for the whole row) wants float32 scales
            scales = scale if group_size < self._in else scale.float()
            self.packed = torch.ops.aten._dyn_quant_pack_4bit_weight(
                nibbles.contiguous(), scales.contiguous(), None, group_size, self._in, self._out
            )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features)
        if self._in != self.in_features:
            rows = torch.nn.functional.pad(rows, (0, self._in - self.in_features))
        if rows.shape[0] == 0:
            out = rows.new_zeros(0, self._out, dtype=torch.float32)
        elif self.kernel == "int4pack":
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                rows.to(torch.bfloat16), self.packed, self.group_size, self.scales
            ).float()
        else:
            out = torch.ops.aten._dyn_quant_matmul_4bit(
                rows.float().contiguous(), self.packed, self.group_size, self._in, self._out
            )
        if self._out != self.out_features:
            out = out[:, : self.out_features]
        return out.reshape(*shape[:-1], self.out_features)

    @property
    def resident_bytes(self) -> int:
        """Bytes of the packed weights, with their scales (and zeros)."""
        total = self.packed.numel() * self.packed.element_size()
        if self.scales is not None:
            total += self.scales.numel() * self.scales.element_size()
        return total


def quantize_int4_asymmetric(
    groups: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes for ``w ≈ (q - 8) * scale + zero``: ``groups`` float32 [..., group] -> codes uint8
    in 0..15 [..., group], scale and zero bfloat16 [...] (the group's range in 15 steps; zero is
    the value of code 8). The codes are rounded against the bfloat16 scale and zero the kernel
    uses, not against their float32 values."""
    low = groups.amin(dim=-1)
    high = groups.amax(dim=-1)
    scale = ((high - low) / 15).clamp_min_(1e-30).bfloat16()
    zero = (low + 8 * scale.float()).bfloat16()
    steps = (groups - zero.float()[..., None]) / scale.float()[..., None]
    codes = steps.add_(8).round_().clamp_(0, 15).to(torch.uint8)
    return codes, scale, zero


def quantize_int4_symmetric(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes for ``w ≈ (q - 8) * scale``: ``groups`` float32 [..., group] -> codes uint8 in
    0..15 [..., group] and scale bfloat16 [...]. The largest magnitude maps to 7.5 steps (so
    the codes -8..7 reach both ends within half a step), the scale rounded up to bfloat16."""
    amax = groups.abs().amax(dim=-1)
    scale = (amax / 7.5 * (1 + 2**-8)).clamp_min_(1e-30).bfloat16()
    steps = groups / scale.float()[..., None]
    codes = steps.round_().clamp_(-8, 7).add_(8).to(torch.uint8)
    return codes, scale
