r"""Calibration script for adapter_k4 (elliptic, k = 4.0); see ../pinn.py.

    sublora prune sample_checkpoints/elliptic/adapter_k4 \
        --calib sample_checkpoints/elliptic/calib_k4.py --budget 50 --out /tmp/elliptic_k4_b50
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tool loads this file by path
from pinn import calibration  # noqa: E402

load_model, batches, heldout_batches, loss, per_sample_loss, evaluate, exact = calibration(
    "elliptic", Path(__file__).parent, k=4.0
)
