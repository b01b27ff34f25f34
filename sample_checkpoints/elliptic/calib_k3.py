r"""Calibration script for adapter_k3 (elliptic, k = 3.0); see ../pinn.py.

    sublora prune sample_checkpoints/elliptic/adapter_k3 \
        --calib sample_checkpoints/elliptic/calib_k3.py --budget 50 --out /tmp/elliptic_k3_b50
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tool loads this file by path
from pinn import calibration  # noqa: E402

load_model, batches, heldout_batches, loss, per_sample_loss, evaluate, exact = calibration(
    "elliptic", Path(__file__).parent, k=3.0
)
