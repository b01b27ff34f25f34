"""The settings' names and defaults that several layers share (the options schema, the model layer that applies
them, the help text). Plain values with no imports from the package, so the options schema can be read without
importing a single compute module.
"""

AUTO = "auto"  # --curvature auto: the cheapest kind that meets the methods' need (model/curvature.resolve_kind)
AUTO_PLACEMENT = "auto"  # --device/--dtype auto: keep the model where and as load_model() returned it
MODEL_DTYPES = ("float32", "float64", "bfloat16", "float16")  # --dtype choices besides auto (model/calibrated.py)
AUTO_MAX_HVPS = 2048  # `auto` computes the exact Hessian up to this many HVPs (R × batches), else the Fisher
DEFAULT_MAX_BATCHES = 10_000  # --max-batches: a batches() that never ends stops here instead of filling the memory
OUTPUT_DTYPES = ("same", "fp16", "bf16", "fp32")  # --dtype-out: same keeps every tensor as the input stored it
DEFAULT_MAX_HESSIAN_GB = 4.0  # --max-hessian-gb: an R×R float64 matrix larger than this is refused before it starts
META_DEVICE = "meta tensors hold shapes but no values, so no loss can be computed on them"  # why --device meta fails
