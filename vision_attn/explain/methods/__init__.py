"""The built-in explain methods, one module each; importing this package registers them, in this order (the order
of ``list_methods()``, the CLI's help and the docs' table)."""

# isort: off
from vision_attn.explain.methods import rollout  # noqa: F401  (each module registers its methods)
from vision_attn.explain.methods import gradient_rollout  # noqa: F401
from vision_attn.explain.methods import transformer_attribution  # noqa: F401
from vision_attn.explain.methods import attnlrp  # noqa: F401
from vision_attn.explain.methods import attention  # noqa: F401
from vision_attn.explain.methods import gradcam  # noqa: F401
from vision_attn.explain.methods import spatial  # noqa: F401
from vision_attn.explain.methods import captum_baselines  # noqa: F401
from vision_attn.explain.methods import random_baseline  # noqa: F401
# isort: on
