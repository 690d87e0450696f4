"""``python -m selective_amnesia.cli`` (``torchrun``/``accelerate launch -m selective_amnesia.cli``)."""

import sys

from selective_amnesia.cli.app import main

sys.exit(main())
