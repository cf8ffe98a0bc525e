"""How fedlora's tensors and round numbers map onto Flower records.

Messages carry the shared tensors in one :class:`~flwr.app.ArrayRecord` (``"arrays"``), the round (and the round
of the client state to start from) in a :class:`~flwr.app.ConfigRecord` (``"config"``) and results in a
:class:`~flwr.app.MetricRecord` (``"metrics"``); this single-record layout is what Flower's DP strategy wrappers and
client mods expect. A client's personal tensors and optimizer state never travel: the node keeps them on its disk.
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import ArrayRecord
from torch import Tensor

ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"
ROUND = "server-round"
STATE_ROUND = "state-round"  # the round after which the client's state to use was kept (0: its initial state)
NUM_EXAMPLES = "num-examples"
CLIENT_ID = "client-id"
SCORE_GLOBAL = "score-global"  # in one evaluate message a round: also score the global model on the global test set


def to_record(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    """An ArrayRecord of the tensors, in their order."""
    return ArrayRecord({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()})


def to_tensors(record: ArrayRecord) -> dict[str, Tensor]:
    """The tensors of an ArrayRecord, in their order."""
    return dict(record.to_torch_state_dict())
