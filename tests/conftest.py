"""Shared test set-up: the tests use tiny tensors, for which one thread is fastest
(two threads spend more time synchronising than computing on a 2-core machine)."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "recipes"))   # the recipes import as modules: import kim_rush
torch.set_num_threads(1)
