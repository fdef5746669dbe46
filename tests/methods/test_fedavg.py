"""fedavg (HomLoRA): one rank for all."""

import pytest

from hetlora import aggregate
from tests.methods.helpers import mixed_round


def test_fedavg_refuses_mixed_ranks():
    with pytest.raises(ValueError, match="one rank"):
        aggregate("fedavg", mixed_round(), r_max=6)
