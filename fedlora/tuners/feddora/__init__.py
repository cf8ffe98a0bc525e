"""FedDoRA: LoRA with both factors split into a magnitude vector and a column-normalised direction."""

from peft.utils import register_peft_method

from fedlora.tuners.feddora.config import PAPER_TENSOR_ROLES, TENSORS, FedDoRAConfig
from fedlora.tuners.feddora.layer import FedDoRALayer, Linear, MagnitudeDirection
from fedlora.tuners.feddora.model import FedDoRAModel
from fedlora.tuners.feddora.peft_type import FEDDORA

register_peft_method(name="feddora", config_cls=FedDoRAConfig, model_cls=FedDoRAModel)

__all__ = [
    "FEDDORA",
    "PAPER_TENSOR_ROLES",
    "TENSORS",
    "FedDoRAConfig",
    "FedDoRALayer",
    "FedDoRAModel",
    "Linear",
    "MagnitudeDirection",
]
