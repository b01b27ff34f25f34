r"""Calibration script for adapter_eps0p3 (allen_cahn, eps = 0.3); see ../pinn.py.

    sublora prune sample_checkpoints/allen_cahn/adapter_eps0p3 \
        --calib sample_checkpoints/allen_cahn/calib_eps0p3.py --budget 50 --out /tmp/allen_cahn_eps0p3_b50
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tool loads this file by path
from pinn import calibration  # noqa: E402

load_model, batches, heldout_batches, loss, per_sample_loss, evaluate, exact = calibration(
    "allen_cahn", Path(__file__).parent, eps=0.3
)
