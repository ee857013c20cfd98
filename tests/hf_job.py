"""ZOTrainer under torchrun, for tests/test_integrations.py (data parallel over ranks).

    torchrun --standalone --nproc_per_node=N tests/hf_job.py OUT PER_DEVICE_BATCH STEPS

Each rank trains the tiny model with its own shard of every batch (the Trainer's data
loader); rank 0 writes ``OUT/run.pt``: the final weights and each step's global batch (as
the engine received it) and lr.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_integrations import Recording, arguments, tiny, token_rows  # noqa: E402
from transformers import DataCollatorForLanguageModeling  # noqa: E402


def main() -> None:
    out, per_device, steps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    model, tokenizer = tiny()
    trainer = Recording(model=model, args=arguments(out, per_device_train_batch_size=per_device,
                                                    max_steps=steps),
                        train_dataset=token_rows(tokenizer), processing_class=tokenizer,
                        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
    assert trainer.model_wrapped is trainer.model, type(trainer.model_wrapped)  # no DDP
    weights = {k: v.clone() for k, v in trainer.engine.export_state_dict().items()}
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"weights": weights, "steps": trainer.seen}, out / "run.pt")
    dist.barrier()


if __name__ == "__main__":
    main()
