"""Train and evaluate image classifiers with LightningCLI (same as the ``vision-attn`` console script)::

python train.py fit --config configs/default.yaml
python train.py fit --config configs/default.yaml --ckpt_path last      # resume
python train.py test --config configs/default.yaml --ckpt_path best
"""

import sys

from vision_attn.cli import main  # bad input exits with code 2 and a one-line message

if __name__ == "__main__":
    sys.exit(main())
