"""Registers ltau-ase's data fields with nequip.

This module is nequip's ``nequip.extension`` entry point (see setup.cfg): nequip imports it on
``import nequip``, so the fields exist in every process that builds a dataset from a config,
including ``nequip-package`` and ``nequip-compile`` rebuilding data from a checkpoint.

Fields:
    frame_id: per-frame (graph) long integer, stable across files, shuffles and splits;
        set it as ``atoms.info["frame_id"]`` and list it in the data module's ``include_keys``.
    ltau_weight: per-atom float loss weight (dataset cartography re-weighting).
"""
from nequip.data._key_registry import register_fields

from ltau_ase.core.atom_ids import FRAME_ID_KEY
ATOM_WEIGHT_KEY = "ltau_weight"

register_fields(graph_fields=[FRAME_ID_KEY], long_fields=[FRAME_ID_KEY], node_fields=[ATOM_WEIGHT_KEY])
