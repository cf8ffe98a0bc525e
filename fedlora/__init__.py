"""fedlora: the FedDoRA PEFT adapter and federated fine-tuning (FedLoRA-Optimizer, arXiv 2510.11274).

Importing this package registers the ``FEDDORA`` adapter type with PEFT, so ``get_peft_model``,
``PeftModel.from_pretrained`` and ``AutoPeftModelForCausalLM`` accept FedDoRA configs and checkpoints.
"""

from fedlora.tuners.feddora import FEDDORA, FedDoRAConfig, FedDoRAModel

__version__ = "0.1.0"
__all__ = ["FEDDORA", "FedDoRAConfig", "FedDoRAModel", "__version__"]
