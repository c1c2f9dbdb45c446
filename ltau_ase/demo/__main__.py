"""``python -m ltau_ase.demo``: see :mod:`ltau_ase.demo`."""
import sys

from ltau_ase.demo import main

sys.exit(main())
