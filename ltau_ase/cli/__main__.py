import sys

from ltau_ase.cli import main

sys.exit(main())
