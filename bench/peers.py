"""The tools a diffusers user would pick instead of diffusion-ao, run on the bench's samples and metrics.

Each peer quantizes the eager diffusers denoiser as its own docs show, calibrating (where it has a calibration) on
the bench's calibration trajectories:

* torchao `quantize_` (what diffusers' `TorchAoConfig` runs): int8 dynamic activations + int8 weights (diffusers'
  "int8dq"), int8 weight-only, and the int4 weight-only config that has a CPU kernel in this torchao
  (`PrototypeInt4WeightOnlyConfig`: torch's `_weight_int4pack_mm_for_cpu`). Its default filter takes `nn.Linear`
  only. DA8W4 needs torchao's CPU extension, which its PyPI wheel does not ship (`peer_notes` says so).
* optimum-quanto: qint8 weights with qint8 activations (calibrated with `Calibration()`), qint4 weights with and
  without qint8 activations, then `freeze`. It takes Linear and Conv2d.
* NVIDIA ModelOpt (`mtq.quantize` with a `forward_loop` over the calibration data): INT8_DEFAULT_CFG,
  INT8_SMOOTHQUANT_CFG, INT4_AWQ_CFG, W4A8_AWQ_BETA_CFG. On a CPU it is fake quantization (its kernels are CUDA /
  TensorRT): quality only, no latency.

The packages are optional (`pip install -e '.[peers]'`; torchao is always there): a missing one leaves out its rows
with one line that says so.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import io
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from diffusion_ao import CalibrationData
from diffusion_ao.denoisers import adapter_for

CALIBRATION_BATCH = 64  # rows per forward while a peer calibrates


@dataclass
class PeerModel:
    """A peer's quantized denoiser and what the bench reports about it.

    Attributes:
        module: the quantized eager denoiser, called like the original.
        quantized: {"Linear": n, "Conv2d": m}: the layers the peer quantized.
        present: the same counts in the floating-point model.
        kernels: what runs: "int8", "int4 weight-only", "int8 weight-only", "dequantized" (integer weights turned
            back into floating point for every call) or "simulated" (fake quantization).
        timed: whether latency is measured (a deployable path on this CPU; not for fake quantization).
        compile: whether the row is compiled (`compile_for_cpu`, where the peer's docs advise torch.compile).
        size_bytes: the bytes of `torch.save(state_dict)` of the quantized model, or None where the peer has no
            packed save on this path.
        inductor_options: the torch._inductor.config options the peer's quantize call set for its compile
            (torchao's `set_inductor_config`), applied to this row's compile only.
    """

    module: torch.nn.Module
    quantized: dict[str, int]
    present: dict[str, int]
    kernels: str
    timed: bool
    compile: bool
    size_bytes: Optional[int]
    inductor_options: dict = field(default_factory=dict)


Builder = Callable[[torch.nn.Module, CalibrationData], PeerModel]


@dataclass(frozen=True)
class Peer:
    """One peer configuration.

    Attributes:
        name: the row name (e.g. "torchao-int8dq").
        package: the distribution it needs (its version is reported).
        config: the configuration in the peer's own words (e.g. "Int8DynamicActivationInt8WeightConfig()").
        weight_bits, act_bits: the bit widths (32: floating point).
        family: "torchao", "quanto" or "modelopt".
        build: quantizes a copy of the FP denoiser with the calibration data.
        default: in the default bench run (one W8A8 and one 4-bit-weight row per family).
        data_free: the quantized model does not depend on the calibration data (weight-only or dynamic
            activation ranges), so every calibration seed gives the same row: the bench builds it once.
    """

    name: str
    package: str
    config: str
    weight_bits: int
    act_bits: int
    family: str
    build: Builder
    default: bool = False
    data_free: bool = False

    def version(self) -> Optional[str]:
        try:
            return importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            return None


def layer_counts(model: torch.nn.Module, quantized: Callable[[torch.nn.Module], bool]) -> tuple[dict, dict]:
    """({"Linear": n, "Conv2d": m} quantized, the same present) for the layers `quantized` says yes to."""
    kinds = {"Linear": (torch.nn.Linear,), "Conv2d": (torch.nn.Conv2d,)}
    present, done = {k: 0 for k in kinds}, {k: 0 for k in kinds}
    for module in model.modules():
        for kind, classes in kinds.items():
            if isinstance(module, classes) or type(module).__name__ in (f"Q{kind}", f"Quant{kind}"):
                present[kind] += 1
                done[kind] += bool(quantized(module))
    return done, present


def saved_bytes(model: torch.nn.Module) -> Optional[int]:
    """Bytes of `torch.save(model.state_dict())`, or None where the quantized tensors cannot be saved."""
    buffer = io.BytesIO()
    try:
        torch.save(model.state_dict(), buffer)
    except Exception:  # noqa: BLE001 (a peer's tensor type without serialisation: no packed save)
        return None
    return buffer.tell()


def calibration_calls(model: torch.nn.Module, data: CalibrationData):
    """Calls `model` on every calibration step, `CALIBRATION_BATCH` rows at a time (its forward's own arguments)."""
    adapter = adapter_for(model)
    with torch.no_grad():
        for step, inputs in data.batches(CALIBRATION_BATCH):
            model(**adapter.forward_kwargs(inputs), return_dict=False)


def _weight_module(module: torch.nn.Module) -> str:
    weight = getattr(module, "weight", None)
    return type(weight).__module__ if weight is not None else ""


# torchao quantize_ ---------------------------------------------------------------------------------------------

def _int4_packable(module: torch.nn.Module, fqn: str, group_size: int = 32) -> bool:
    """The linears torchao's CPU int4 kernel takes: out features a multiple of 16, in features of the group."""
    return (isinstance(module, torch.nn.Linear) and module.out_features % 16 == 0
            and module.in_features % group_size == 0)


def torchao_peer(make_config: Callable[[], object], kernels: str, filter_fn=None) -> Builder:
    def build(model: torch.nn.Module, data: CalibrationData) -> PeerModel:
        from torchao.quantization import quantize_

        quantize_(model, make_config(), filter_fn=filter_fn)
        done, present = layer_counts(model, lambda m: _weight_module(m).startswith("torchao"))
        return PeerModel(model, done, present, kernels, timed=True, compile=True, size_bytes=saved_bytes(model))
    return build


def _int8dq():
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig
    return Int8DynamicActivationInt8WeightConfig()


def _int8wo():
    from torchao.quantization import Int8WeightOnlyConfig
    return Int8WeightOnlyConfig()


def _int4wo():
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    return PrototypeInt4WeightOnlyConfig(group_size=32)


# optimum-quanto -------------------------------------------------------------------------------------------------

def quanto_peer(weights: str, activations: Optional[str], kernels: str) -> Builder:
    def build(model: torch.nn.Module, data: CalibrationData) -> PeerModel:
        from optimum import quanto

        quanto.quantize(model, weights=getattr(quanto, weights),
                        activations=getattr(quanto, activations) if activations else None)
        if activations:
            with quanto.Calibration(momentum=0.9):
                calibration_calls(model, data)
        quanto.freeze(model)
        done, present = layer_counts(model, lambda m: isinstance(m, quanto.QModuleMixin))
        return PeerModel(model, done, present, kernels, timed=True, compile=False, size_bytes=saved_bytes(model))
    return build


# NVIDIA ModelOpt ------------------------------------------------------------------------------------------------

def modelopt_peer(config_name: str) -> Builder:
    def build(model: torch.nn.Module, data: CalibrationData) -> PeerModel:
        import modelopt.torch.quantization as mtq

        model = mtq.quantize(model, getattr(mtq, config_name), lambda m: calibration_calls(m, data))

        def quantized(module):
            q = getattr(module, "weight_quantizer", None)
            return q is not None and getattr(q, "is_enabled", False)

        done, present = layer_counts(model, quantized)
        return PeerModel(model, done, present, "simulated", timed=False, compile=False, size_bytes=None)
    return build


PEERS = [
    Peer("torchao-int8dq", "torchao", "Int8DynamicActivationInt8WeightConfig()", 8, 8, "torchao",
         torchao_peer(_int8dq, "int8"), default=True, data_free=True),
    Peer("torchao-int8wo", "torchao", "Int8WeightOnlyConfig()", 8, 32, "torchao",
         torchao_peer(_int8wo, "int8 weight-only"), data_free=True),
    Peer("torchao-int4wo", "torchao", "PrototypeInt4WeightOnlyConfig(group_size=32) on the linears its CPU kernel "
         "takes", 4, 32, "torchao", torchao_peer(_int4wo, "int4 weight-only", filter_fn=_int4_packable),
         default=True, data_free=True),
    Peer("quanto-w8a8", "optimum-quanto", "quantize(weights=qint8, activations=qint8) + Calibration()", 8, 8,
         "quanto", quanto_peer("qint8", "qint8", "int8"), default=True),
    Peer("quanto-w4", "optimum-quanto", "quantize(weights=qint4)", 4, 32, "quanto",
         quanto_peer("qint4", None, "dequantized"), default=True, data_free=True),
    Peer("quanto-w4a8", "optimum-quanto", "quantize(weights=qint4, activations=qint8) + Calibration()", 4, 8,
         "quanto", quanto_peer("qint4", "qint8", "dequantized")),
    Peer("modelopt-int8", "nvidia-modelopt", "mtq.INT8_DEFAULT_CFG", 8, 8, "modelopt", modelopt_peer("INT8_DEFAULT_CFG"),
         default=True),
    Peer("modelopt-int8-smoothquant", "nvidia-modelopt", "mtq.INT8_SMOOTHQUANT_CFG", 8, 8, "modelopt",
         modelopt_peer("INT8_SMOOTHQUANT_CFG")),
    Peer("modelopt-int4-awq", "nvidia-modelopt", "mtq.INT4_AWQ_CFG", 4, 32, "modelopt",
         modelopt_peer("INT4_AWQ_CFG"), default=True),
    Peer("modelopt-w4a8-awq", "nvidia-modelopt", "mtq.W4A8_AWQ_BETA_CFG (FP8 activations)", 4, 8, "modelopt",
         modelopt_peer("W4A8_AWQ_BETA_CFG")),
]
# One sentence per tool on what it does differently from diffusion-ao (scope, calibration, kernels).
PEER_NOTES = {
    "torchao": "**torchao `quantize_`** quantizes `nn.Linear` only (its default filter; convs stay FP32), with "
               "per-row weight scales and, for int8dq, activation scales computed at every call (dynamic, no "
               "calibration); int8dq runs on int8 kernels (`torch._int_mm`, oneDNN qlinear under inductor "
               "freezing), int4 weight-only on torch's CPU int4 kernel for the linears it can pack. Its DA8W4 "
               "(Int8DynamicActivationInt4WeightConfig) needs torchao's CPU extension (da8w4_linear_cpu), which "
               "the PyPI wheel does not ship: not run.",
    "quanto": "**optimum-quanto** swaps Linear and Conv2d for its own modules, with static per-tensor activation "
              "scales from an EMA over the calibration data (`Calibration(momentum=0.9)`), one range for all "
              "timesteps; its int8 x int8 linears run `torch._int_mm`, its convs and 4-bit weights dequantize to "
              "FP32 on a CPU, and its docs do not support torch.compile (run eager).",
    "modelopt": "**NVIDIA ModelOpt** inserts fake quantizers into Linear and Conv2d and calibrates them with "
                "max (INT8), SmoothQuant or AWQ over the `forward_loop` (the same calibration data, one range for "
                "all timesteps); its kernels are for TensorRT on NVIDIA GPUs, so on a CPU the rows are quality only "
                "(no latency, no packed size).",
}
INSTALL_HINT = "pip install -e '.[peers]'"


def available_peers(names: Optional[list[str]] = None, default_only: bool = False) -> tuple[list[Peer], list[str]]:
    """The peers whose package is installed (by name, or the default ones), and one line per family left out."""
    chosen = [p for p in PEERS if (names is None or p.name in names) and (not default_only or p.default)]
    missing = sorted({p.package for p in chosen if p.version() is None})
    notes = [f"peers: {package} is not installed, its rows are left out ({INSTALL_HINT})" for package in missing]
    return [p for p in chosen if p.version() is not None], notes


class TensorDenoiser(torch.nn.Module):
    """A diffusers denoiser called as the bench calls graphs: `fn(sample, timestep, **conditioning)` -> tensor."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, **conditioning: torch.Tensor) -> torch.Tensor:
        return self.model(sample, timestep, return_dict=False, **conditioning)[0]


class SamplerDenoiser:
    """What the bench's sampler calls (`unet(x, t, return_dict=False, **conditioning)[0]`), around a function of
    (sample, timestep, **conditioning) -> tensor."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn

    def __call__(self, sample, timestep, return_dict=False, **conditioning):
        # One float vector per call, as the graphs get it: a compiled peer recompiles on a new dtype or shape.
        t = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device)
        return (self.fn(sample, t.expand(sample.shape[0]) if t.ndim == 0 else t, **conditioning),)


def build(peer: Peer, model: torch.nn.Module, data: CalibrationData) -> PeerModel:
    """The peer's quantized `model`. The inductor options its quantize call sets globally (torchao's
    `set_inductor_config`) are kept in `PeerModel.inductor_options` for its own compile and undone here, so that
    they change no other row."""
    import torch._inductor.config as inductor_config

    before = inductor_config.get_config_copy()
    try:
        built = peer.build(model, data)
        after = inductor_config.get_config_copy()
        built.inductor_options = {k: v for k, v in after.items() if before.get(k) != v}
    finally:
        inductor_config.load_config(before)
    return built


def import_check(peer: Peer) -> None:
    """Imports the peer's module (fails early, before any work, where the installed version is broken)."""
    importlib.import_module({"torchao": "torchao.quantization", "optimum-quanto": "optimum.quanto",
                             "nvidia-modelopt": "modelopt.torch.quantization"}[peer.package])


# diffusers' own quantization path -------------------------------------------------------------------------------

# What a diffusers user writes: `Model.from_pretrained(path, quantization_config=...)`, by row name.
def _diffusers_configs() -> dict[str, Callable[[], object]]:
    from diffusers import QuantoConfig, TorchAoConfig

    return {"diffusers-torchao-int8dq": lambda: TorchAoConfig(_int8dq()),
            "diffusers-torchao-int8wo": lambda: TorchAoConfig(_int8wo()),
            "diffusers-quanto-int8": lambda: QuantoConfig(weights_dtype="int8"),
            "diffusers-quanto-int4": lambda: QuantoConfig(weights_dtype="int4")}


DIFFUSERS_PATHS = ("diffusers-torchao-int8dq", "diffusers-torchao-int8wo", "diffusers-quanto-int8",
                   "diffusers-quanto-int4")


def load_through_diffusers(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, dict, dict]:
    """`model` saved and loaded again through diffusers with the quantization config `name` (one of
    DIFFUSERS_PATHS), as a user loads a checkpoint; returns (quantized model, layers quantized, layers present).

    Raises:
        ImportError: where diffusers' path needs a package that is not installed (accelerate, optimum-quanto).
    """
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        # in the pipeline's dtype (diffusers' torchao path would pick bfloat16, which the FP32 pipeline cannot feed)
        quantized = type(model).from_pretrained(folder, quantization_config=_diffusers_configs()[name](),
                                                torch_dtype=model.dtype)
    quantized.eval()
    done, present = layer_counts(quantized, lambda m: _weight_module(m).startswith(("torchao", "optimum"))
                                 or type(m).__name__.startswith("Q"))
    return quantized, done, present

