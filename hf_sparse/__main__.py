"""``python -m hf_sparse`` / ``accelerate launch -m hf_sparse`` entry point."""

import sys

from .cli import main

sys.exit(main())
