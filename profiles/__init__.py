"""Operator profiles: shipped measurements, roofline / power models and the ProfileDB.

>>> from profiles import ProfileDB
>>> db = ProfileDB.load()
>>> db.latency("mlp_up_proj", "h100", "llama-2-7b", tokens=64)  # ms, one layer
"""
from profiles.db import Estimate, ProfileDB
from profiles.gpus import GPUS, GPUSpec
from profiles.overhead import OverheadModel
from profiles.schema import ProfileError

__all__ = ["ProfileDB", "ProfileError", "Estimate", "GPUSpec", "GPUS", "OverheadModel"]
