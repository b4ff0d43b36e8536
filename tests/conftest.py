"""Suite-wide settings: one intra-op thread.

The tests use tiny tensors, where thread start-up costs more than it saves, and several tests
start worker processes; one thread each keeps the 2-core CI machine from oversubscribing.
"""

import torch

torch.set_num_threads(1)
