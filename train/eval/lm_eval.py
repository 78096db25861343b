"""``python -m train.eval.lm_eval [lm-eval's CLI arguments]``: lm-evaluation-harness's own CLI with our model.

lm-eval 0.4.13 has no plugin discovery, so ``python -m lm_eval --model internlm_kernels`` cannot see a model
defined outside it. This entry point imports ``train.eval.lm_adapter`` (which registers ``internlm_kernels``) and
then runs ``lm_eval.__main__.cli_evaluate()`` unchanged, so every lm-eval option works:

    python -m train.eval.lm_eval --model internlm_kernels \\
        --model_args pretrained=runs/tiny_cpu/checkpoints/step_00000396/model,dtype=float32 \\
        --tasks ik_arithmetic,ik_choice --include_path train/eval/tasks --device cpu

The shipped offline tasks are under ``train/eval/tasks`` (``--include_path``); lm-eval makes no network call with
``HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1``, which this entry point sets unless they are set already.
"""
from __future__ import annotations

import os


def main() -> None:
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        os.environ.setdefault(var, "1")
    from lm_eval.__main__ import cli_evaluate

    import train.eval.lm_adapter  # noqa: F401  (registers internlm_kernels)

    cli_evaluate()


if __name__ == "__main__":
    main()
