r"""Calibration script for adapter_beta4 (hyperbolic, beta = 4.0); see ../pinn.py.

    sublora prune sample_checkpoints/hyperbolic/adapter_beta4 \
        --calib sample_checkpoints/hyperbolic/calib_beta4.py --budget 50 --out /tmp/hyperbolic_beta4_b50
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tool loads this file by path
from pinn import calibration  # noqa: E402

load_model, batches, heldout_batches, loss, per_sample_loss, evaluate, exact = calibration(
    "hyperbolic", Path(__file__).parent, beta=4.0
)
