"""What differs between denoiser families, in one small dataclass: `DenoiserAdapter`.

Every denoiser becomes a graph whose inputs are named after its forward arguments, with two fixed names:
`sample` for the noisy latent (diffusers calls it `sample` in UNets and `hidden_states` in transformers) and
`timestep`, a float tensor of shape (batch,). A dict-valued argument is flattened into one input per entry,
named `<argument>__<key>` (SDXL's `added_cond_kwargs__text_embeds`). Non-tensor arguments cannot be traced:
they must be None or keep their default.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

SAMPLE, TIMESTEP = "sample", "timestep"
CLASS_LABELS = "class_labels"  # the class-conditional input (UNet2DModel, DiT): a finite set of integers
SEPARATOR = "__"  # between a dict-valued argument and its key in a flattened input name
RETURN_DICT = "return_dict"


@dataclass(frozen=True)
class DenoiserAdapter:
    """How one diffusers denoiser family maps onto the exported graph's named inputs.

    Attributes:
        model_class: the diffusers class (subclasses match too).
        sample_arg: the forward argument holding the noisy latent; the graph calls it `sample`.
        output_class: what the drop-in wrapper returns with `return_dict=True` (built as `output_class(sample=..)`).
        shared_args: tensor arguments without a batch dimension (Flux's `img_ids`, `txt_ids`): graph inputs of
            fixed shape, the same for every sample.
        wrapper_attributes: dotted attribute paths of plain values that pipelines read from their denoiser
            besides `config`, `dtype` and `device`; the drop-in wrapper copies them from the original model.

    Example:
        >>> from diffusers import DiTTransformer2DModel
        >>> from diffusers.models.modeling_outputs import Transformer2DModelOutput
        >>> ADAPTER = DenoiserAdapter(DiTTransformer2DModel, "hidden_states", Transformer2DModelOutput)
    """

    model_class: type
    sample_arg: str
    output_class: type
    shared_args: tuple[str, ...] = ()
    wrapper_attributes: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.model_class.__name__

    def graph_name(self, argument: str, key: str | None = None) -> str:
        """The graph input name of a forward argument (or of one entry of a dict-valued argument)."""
        if key is not None:
            return f"{argument}{SEPARATOR}{key}"
        return SAMPLE if argument == self.sample_arg else argument

    def forward_kwargs(self, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The inverse of `flatten_call`: graph inputs back to the denoiser's forward keyword arguments."""
        kwargs: dict[str, Any] = {}
        for name, value in inputs.items():
            if name == SAMPLE:
                kwargs[self.sample_arg] = value
            elif SEPARATOR in name:
                argument, key = name.split(SEPARATOR, 1)
                kwargs.setdefault(argument, {})[key] = value
            else:
                kwargs[name] = value
        return kwargs

    def flatten_call(self, signature: inspect.Signature, args: tuple, kwargs: dict) -> tuple[dict[str, torch.Tensor],
                                                                                              bool]:
        """The graph inputs of one denoiser call, and its `return_dict`.

        Args:
            signature: `inspect.signature(model.forward)` of the original model.
            args, kwargs: the call's arguments.

        Returns:
            ({graph input name: tensor}, return_dict). `timestep` is a float32 tensor of shape (batch,) (a scalar
            or a 0-d / 1-element timestep is broadcast to the batch).

        Raises:
            TypeError: an argument the graph cannot take (a non-tensor value other than None or its default, a
                list of tensors, a dict with non-tensor values), or no sample / timestep.
        """
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{self.name}.forward does not accept this call: {e}.") from None
        arguments = dict(bound.arguments)
        return_dict = bool(arguments.pop(RETURN_DICT, True))
        inputs: dict[str, torch.Tensor] = {}
        for argument, value in arguments.items():
            if value is None:
                continue
            if isinstance(value, torch.Tensor) or (argument == TIMESTEP and isinstance(value, (int, float))):
                inputs[self.graph_name(argument)] = torch.as_tensor(value)
            elif isinstance(value, dict) and all(v is None or isinstance(v, torch.Tensor) for v in value.values()):
                inputs.update({self.graph_name(argument, k): v for k, v in value.items() if v is not None})
            elif _is_default(signature, argument, value):
                continue
            else:
                raise TypeError(
                    f"{self.name}.forward got {argument}={_short(value)}: only tensors (and dicts of tensors) can "
                    "become inputs of the exported graph; other arguments must be None or keep their default. Leave "
                    f"'{argument}' out (or fold its effect into the model) before quantizing.")
        if SAMPLE not in inputs or TIMESTEP not in inputs:
            raise TypeError(f"A {self.name} call needs '{self.sample_arg}' and '{TIMESTEP}'; got {sorted(arguments)}.")
        sample = inputs[SAMPLE]
        inputs[TIMESTEP] = timestep_batch(inputs[TIMESTEP], len(sample))
        for name, value in inputs.items():
            if name in self.shared_args or name == SAMPLE:
                continue
            if value.dim() == 0 or value.shape[0] != len(sample):
                raise TypeError(f"{self.name} input '{name}' has shape {tuple(value.shape)}: every input except "
                                f"{sorted(self.shared_args) or 'none'} needs the sample's batch ({len(sample)}) "
                                "as its first dimension.")
        return inputs, return_dict


def timestep_batch(timestep: torch.Tensor, batch: int) -> torch.Tensor:
    """A timestep (scalar, 0-d, one element or one per sample) as a float32 tensor of shape (batch,)."""
    t = torch.as_tensor(timestep).to(torch.float32).reshape(-1)
    if t.numel() == 1:
        return t.expand(batch).contiguous()
    if t.numel() != batch:
        raise TypeError(f"timestep has {t.numel()} values for a batch of {batch}: pass one value or one per sample.")
    return t.contiguous()


def _is_default(signature: inspect.Signature, argument: str, value: Any) -> bool:
    default = signature.parameters[argument].default if argument in signature.parameters else inspect.Parameter.empty
    if isinstance(value, (dict, list, tuple)) and not value:
        return True  # an empty container changes nothing
    try:
        return default is not inspect.Parameter.empty and bool(value == default)
    except (TypeError, RuntimeError):
        return False


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
