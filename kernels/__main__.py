"""python -m lora_core.kernels [--recalibrate]: which int8 path runs each product here, and the timings."""
import sys

from .dispatch import main

sys.exit(main())
