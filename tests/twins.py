"""torch's own activations: the tests' oracle for each record of bp_service.activations, written independently.

``tests/test_functions.py`` checks that these cover exactly the table's names.
"""

import torch
import torch.nn.functional as TF

NATIVE_ACTIVATIONS = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "softmax": lambda z: torch.softmax(z, -1),
    "leaky_relu": lambda z: TF.leaky_relu(z, 0.01),
}
