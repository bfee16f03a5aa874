"""``vision-attn`` console script: ``fit|validate|test|predict`` (LightningCLI), ``explain``, ``evaluate-maps``,
``export``, ``shard``, ``app``, ``models`` and ``methods``."""

from __future__ import annotations

import os
import pickle
import sys

USAGE = """usage: vision-attn {fit,validate,test,predict,explain,evaluate-maps,export,shard,app,models,methods} ...

  fit|validate|test|predict   train / evaluate with LightningCLI (same as python train.py ...)
  explain                     write attention-map overlays and scores for images
  evaluate-maps               score every explain method on images with boxes / masks (+ sanity checks, cost)
  export                      write a trained model as a timm/HF folder, ONNX, TorchScript or .pt2
  shard                       write a config's dataset as LitData shards (train with data.name: litdata)
  app                         explore a model's attention maps in the browser (a Gradio app; the 'app' extra)
  models [PATTERN]            list the registered model names
  methods [--plugin MODULE]   list the explain methods (what each needs, its options), as a markdown table
"""


# errors that mean "the input is wrong", reported as one line; anything else is a bug and keeps its traceback
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FloatingPointError, pickle.UnpicklingError)


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; returns the process exit code. A bad input exits with code 2 and a one-line message on
    stderr (set ``VISION_ATTN_TRACEBACK=1`` to see the traceback instead)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(argv)
    except USER_ERRORS as err:
        if os.environ.get("VISION_ATTN_TRACEBACK"):
            raise
        command = argv[0] if argv else ""
        print(f"vision-attn {command}: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "models":
        import vision_attn

        print("\n".join(vision_attn.list_models(*rest[:1])))
        return 0
    if command == "methods":
        from vision_attn.explain import registry
        from vision_attn.explain.runner import load_plugins

        if rest[:1] == ["--plugin"] and len(rest) == 2:
            load_plugins(rest[1:])
        elif rest:
            raise ValueError(f"vision-attn methods takes no arguments but --plugin MODULE, got {rest}")
        print(registry.methods_markdown())
        return 0
    if command == "evaluate-maps":
        from vision_attn.explain.evaluate_cli import main as evaluate_main

        return evaluate_main(rest)
    if command == "explain":
        from vision_attn.explain.cli import main as explain_main

        return explain_main(rest)
    if command == "export":
        from vision_attn.export.cli import main as export_main

        return export_main(rest)
    if command == "shard":
        from vision_attn.data.shard_cli import main as shard_main

        return shard_main(rest)
    if command == "app":
        from vision_attn.app.cli import main as app_main

        return app_main(rest)
    if command in ("fit", "validate", "test", "predict"):
        from vision_attn.training.cli import main as train_main

        return train_main(argv)
    print(f"vision-attn: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
