"""The settings' names and defaults that several layers share (the options schema, the model layer that applies
them, the help text). Plain values with no imports from the package, so the options schema can be read without
importing a single compute module.
"""

AUTO = "auto"  # --curvature auto: the cheapest kind that meets the methods' need (model/curvature.resolve_kind)
AUTO_PLACEMENT = "auto"  # --device/--dtype auto: keep the model where and as load_model() returned it
MODEL_DTYPES = ("float32", "float64", "bfloat16", "float16")  # --dtype choices besides auto (model/calibrated.py)
AUTO_MAX_HVPS = 2048  # `auto` computes the exact Hessian up to this many HVPs (R × batches), else the Fisher
# ... and only while its estimated time is at most this: on a real encoder (MiniLM, R = 296, 4 batches) 1,184 HVPs
# took 33 min against ~100 s for the Fisher, for held-out losses within 2e-4 of each other (issue 20).
AUTO_MAX_EXACT_SECONDS = 60.0
HOLDOUT_AUTO = "auto"  # --holdout auto: the script's heldout_batches(), else a share of batches() (model/holdout.py)
DEFAULT_HOLDOUT_FRACTION = 0.25  # auto holds out a quarter of batches() ...
MIN_BATCHES_TO_SPLIT = 4  # ... when there are at least this many, so the fit keeps three or more
DEFAULT_MAX_BATCHES = 10_000  # --max-batches: a batches() that never ends stops here instead of filling the memory
OUTPUT_DTYPES = ("same", "fp16", "bf16", "fp32")  # --dtype-out: same keeps every tensor as the input stored it
DEFAULT_MAX_HESSIAN_GB = 4.0  # --max-hessian-gb: an R×R float64 matrix larger than this is refused before it starts
META_DEVICE = "meta tensors hold shapes but no values, so no loss can be computed on them"  # why --device meta fails
