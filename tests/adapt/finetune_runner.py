"""One CPU fine-tune of the tiny LLaVA, run as a subprocess by the kill-and-resume test::

    python tests/adapt/finetune_runner.py DATASET OUTPUT_DIR CACHE_DIR [STEP_DELAY_S]

The configuration is fixed (6 steps, a checkpoint and an evaluation every 2, LoRA dropout on, so
the RNG state matters); a second run on the same OUTPUT_DIR resumes from its last checkpoint
like ``mmrag finetune`` does.  ``STEP_DELAY_S`` slows every optimizer step through a Trainer
callback (the production code has no test hooks), so that the test can kill the process after
its first checkpoint and before its last step.  The summary is printed as JSON on success.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from transformers import TrainerCallback  # noqa: E402

from tasks.adapt.finetune import FinetuneConfig, finetune  # noqa: E402

CONFIG = dict(base="tiny", rank=4, alpha=8, dropout=0.1, lr=1e-2, batch_size=1, grad_accum=2,
              max_steps=6, warmup_steps=1, save_steps=2, eval_steps=2, seed=3)


class SlowSteps(TrainerCallback):
    def __init__(self, delay: float):
        self.delay = delay

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.delay)


def main() -> None:
    dataset, out, cache = sys.argv[1:4]
    delay = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    summary = finetune(dataset, out, FinetuneConfig(**CONFIG), cache, device="cpu",
                       callbacks=[SlowSteps(delay)] if delay else [])
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
