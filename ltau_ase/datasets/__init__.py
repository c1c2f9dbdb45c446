"""Generated datasets with a cheap reference calculator (OC20-like adsorbate/slab systems with EMT)."""
from ltau_ase.datasets.catalysis import *  # noqa: F401,F403  (the public names are catalysis.__all__)
from ltau_ase.datasets.catalysis import __all__  # noqa: F401
