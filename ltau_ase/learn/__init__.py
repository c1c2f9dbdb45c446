"""Active learning with LTAU: explore, flag, select, label, retrain, refit, recalibrate, report.

    from ltau_ase.learn import Campaign, CampaignSettings, CalculatorFactory
    campaign = Campaign("al_run", CampaignSettings(type_names=("Cu", "O", "H")), train="train.extxyz",
                        val="val.extxyz", calibration="cal.extxyz", seeds="seeds.extxyz",
                        reference=CalculatorFactory("ase.calculators.emt:EMT"))
    campaign.run()   # resumable: run it again after a crash or kill

See :mod:`ltau_ase.learn.campaign` for the working directory layout.
"""
from __future__ import annotations

from ltau_ase.learn.campaign import Campaign, CampaignSettings, TrainingSettings
from ltau_ase.learn.explore import ExploreSettings, explore, load_snapshots
from ltau_ase.learn.label import CalculatorFactory, Labels, label_frames, load_labels
from ltau_ase.learn.selection import (
    SELECTION_METHODS,
    farthest_point_sampling,
    select_committee,
    select_ltau,
    select_random,
    structure_feature,
)

__all__ = [
    "CalculatorFactory", "Campaign", "CampaignSettings", "ExploreSettings", "Labels", "SELECTION_METHODS",
    "TrainingSettings", "explore", "farthest_point_sampling", "label_frames", "load_labels", "load_snapshots",
    "select_committee", "select_ltau", "select_random", "structure_feature",
]
