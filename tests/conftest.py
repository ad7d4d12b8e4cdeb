"""Shared test set-up: the tests use tiny tensors, for which one thread is fastest
(two threads spend more time synchronising than computing on a 2-core machine)."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)
