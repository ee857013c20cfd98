"""The training entry point as a Ray Train job: ``TorchTrainer`` + ``ScalingConfig``.

Every worker runs :func:`zo2.train.run` with the same config that ``zo2-train`` composes
(the same Hydra presets and overrides), so a config means the same thing under Ray as
under torchrun or the deepspeed launcher. Ray starts the workers, sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` and builds the process group (gloo
on CPUs, NCCL on GPUs), which zo2's mesh joins. Each evaluation is reported to Ray as
metrics; each zo2 checkpoint (``checkpoint.every``) is reported as a Ray checkpoint, so
Ray's ``FailureConfig`` restarts resume from it, on any node.

Submit to a running cluster (the entrypoint runs on the head node, ``RAY_ADDRESS`` set)::

    ray job submit --address http://HEAD:8265 -- python -m zo2.launch.ray_job \\
        --workers 8 --gpu --storage /shared/zo2-runs -- parallel=ddp offload=cpu

or run it where Ray can start a local cluster (``--local-cpus N``). Options before
``--`` are Ray's; everything after is a ``zo2-train`` override.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from zo2.config import compose, validate  # noqa: E402
from zo2.errors import ZO2Error  # noqa: E402
from zo2.train import run  # noqa: E402
from zo2.trainer import Callback  # noqa: E402


class RayReporter(Callback):
    """Evaluations as Ray metrics; zo2 checkpoints as Ray checkpoints, from the main rank
    (every rank reports, as Ray requires)."""

    def on_evaluate(self, trainer, step: int, metrics: dict) -> None:
        import ray.train

        ray.train.report({"step": step, "dev_accuracy": metrics["accuracy"]})

    def on_save(self, trainer, step: int, folder: Path) -> None:
        import ray.train

        checkpoint = (ray.train.Checkpoint.from_directory(str(folder))
                      if trainer.mesh.is_main else None)
        ray.train.report({"step": step}, checkpoint=checkpoint)


def worker(config: dict) -> None:
    """One Ray Train worker: resume from Ray's latest checkpoint if there is one, run."""
    import logging
    from dataclasses import replace

    import ray.train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = config["cfg"]
    checkpoint = ray.train.get_checkpoint()  # set after a failure restart
    if checkpoint is None:
        run(cfg, config["output_dir"], callbacks=[RayReporter()])
        return
    with checkpoint.as_directory() as folder:  # local on every worker, any node
        resumed = replace(cfg, checkpoint=replace(cfg.checkpoint, resume=str(folder)))
        run(resumed, config["output_dir"], callbacks=[RayReporter()])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m zo2.launch.ray_job",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (ranks)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--storage", default="runs/ray",
                        help="Ray's storage path (shared by all nodes on a cluster)")
    parser.add_argument("--name", default=None, help="run name (default: zo2-<time>)")
    parser.add_argument("--max-failures", type=int, default=1,
                        help="worker-group restarts, each resuming from the last checkpoint")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: RAY_ADDRESS, else a local one)")
    parser.add_argument("--local-cpus", type=int, default=None,
                        help="CPUs of the local cluster started when there is no address")
    args = parser.parse_args(argv[:split])

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer


    try:
        cfg = validate(compose(argv[split + 1:]))
    except ZO2Error as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    name = args.name or datetime.now().strftime("zo2-%Y-%m-%d-%H-%M-%S")
    storage = Path(args.storage).resolve()
    output_dir = cfg.output_dir or str(storage / name / "output")
    ray.init(address=args.address, num_cpus=args.local_cpus, log_to_driver=True)
    trainer = TorchTrainer(
        worker,
        train_loop_config={"cfg": cfg, "output_dir": output_dir},
        torch_config=TorchConfig(backend="nccl" if args.gpu else "gloo",
                                 timeout_s=int(cfg.parallel.timeout_s)),
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=args.gpu,
                                     resources_per_worker={"CPU": args.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=args.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep)),
    )
    result = trainer.fit()
    summary_file = Path(output_dir) / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    print(json.dumps({"output_dir": output_dir, "ray_checkpoint": str(result.checkpoint.path)
                      if result.checkpoint else None, "metrics": result.metrics,
                      "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
