"""The model half of the tests' calibration scripts: a 3→12→12→1 tanh MLP loaded from the base.safetensors
beside the script. Test modules append their own batches(), loss() and evaluate()."""

MODEL_SOURCE = """
import torch
from pathlib import Path
from safetensors.torch import load_file

class TinyMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(3, 12)
        self.fc2 = torch.nn.Linear(12, 12)
        self.out = torch.nn.Linear(12, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))

def load_model():
    model = TinyMLP()
    model.load_state_dict(load_file(str(Path(__file__).parent / "base.safetensors")))
    return model
"""
