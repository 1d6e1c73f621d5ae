"""The same fine-tune on a Ray cluster: Ray Train's ``TorchTrainer`` runs ``finetune`` in each of
``workers`` processes, one per GPU, wherever the cluster has them.

Ray Train starts the processes, sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` and the
``torch.distributed`` process group, exactly what ``torchrun`` does on one machine, and
``transformers.Trainer`` trains with DDP inside it: ``finetune`` runs unchanged, no Ray-specific
callback is needed (checkpoints, resume and the summary stay in ``output_dir``).  The dataset,
``output_dir`` and the model cache must be on storage every worker sees (a shared filesystem),
and every node needs this project installed.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from tasks.adapt.finetune import SUMMARY, FinetuneConfig, finetune


def _worker(config: dict) -> None:
    cfg = FinetuneConfig(**config["cfg"] | {"target_modules": tuple(config["cfg"]
                                                                   ["target_modules"])})
    finetune(config["dataset_dir"], config["output_dir"], cfg, config["cache_dir"],
             device=None if config["use_gpu"] else "cpu")


def finetune_on_ray(dataset_dir: str | Path, output_dir: str | Path, cfg: FinetuneConfig,
                    cache_dir: str, workers: int, use_gpu: bool = True) -> dict:
    """Train on ``workers`` Ray workers (one GPU each with ``use_gpu``) of the connected
    cluster (``ray.init`` first, or ``init_ray``); returns the summary the first worker wrote."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    output_dir = Path(output_dir).resolve()
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"dataset_dir": str(Path(dataset_dir).resolve()),
                           "output_dir": str(output_dir), "cache_dir": cache_dir,
                           "use_gpu": use_gpu, "cfg": asdict(cfg)},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=RunConfig(name="finetune", storage_path=str(output_dir / "ray")))
    trainer.fit()
    return json.loads((output_dir / SUMMARY).read_text())
