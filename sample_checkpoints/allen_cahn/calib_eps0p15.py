r"""Calibration script for adapter_eps0p15 (allen_cahn, eps = 0.15); see ../pinn.py.

    sublora prune sample_checkpoints/allen_cahn/adapter_eps0p15 \
        --calib sample_checkpoints/allen_cahn/calib_eps0p15.py --budget 50 --out /tmp/allen_cahn_eps0p15_b50
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tool loads this file by path
from pinn import calibration  # noqa: E402

load_model, batches, heldout_batches, loss, per_sample_loss, evaluate, exact = calibration(
    "allen_cahn", Path(__file__).parent, eps=0.15
)
