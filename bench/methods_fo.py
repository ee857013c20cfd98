"""The first-order reference of :mod:`bench.methods`: AdamW with autograd on the same
model, data and batches as the ZO methods, and a plain-model evaluator for the pipeline."""

from __future__ import annotations

FO_FORWARDS_PER_STEP = 3  # one forward + one backward, counted as 3 forward-equivalents


class _PlainEval:
    """Duck-types ``engine.evaluate`` for the pipeline: accuracy of a plain (autograd) model."""

    def __init__(self, model, objective) -> None:
        self.model, self.objective = model, objective

    def evaluate(self, batches) -> dict:
        import torch

        from zo2.loss import positions_to_keep

        right = seen = 0
        total, n = 0.0, 0
        with torch.no_grad():
            for b in batches:
                labels = b["labels"]
                logits = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                    logits_to_keep=positions_to_keep(labels),
                                    use_cache=False).logits
                k = int((labels != -100).sum())
                total += float(self.objective.loss(logits, labels)) * k
                n += k
                r, s = self.objective.correct(logits, labels)
                right, seen = right + r, seen + s
        return {"loss": total / max(n, 1), "accuracy": right / max(seen, 1)}


def first_order(cfg, lr: float, budget: int) -> dict:
    """First-order AdamW with autograd on the model and data of ``cfg``, the reference: the
    fields of :class:`bench.methods.Run`."""
    import torch

    from zo2.data.pipeline import build
    from zo2.data.tasks import load_task
    from zo2.loss import positions_to_keep
    from zo2.models import load_model

    model, tok = load_model(cfg.model.name, dtype=cfg.model.dtype)
    t = cfg.task
    task = load_task(t.name, seed=t.seed, n_train=t.n_train, n_dev=t.n_dev, n_test=t.n_test,
                     balanced=t.balanced)
    pipe = build(task, tok, objective=t.objective, batch_size=cfg.optim.batch_size,
                 eval_batch_size=cfg.eval_batch_size, seed=cfg.seed, max_length=t.max_length)
    model.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    numel = sum(p.numel() for p in model.parameters())
    info = {"settings": {"optimizer": "torch.optim.AdamW", "lr": lr, "weight_decay": 0.0,
                         "schedule": "constant", "batch_size": cfg.optim.batch_size},
            "trainable_params": numel,
            "state_bytes": 2 * numel * 4,  # exp_avg, exp_avg_sq (fp32)
            "grad_bytes": numel * 4}
    evaluator = _PlainEval(model, pipe.objective)

    def step() -> float:
        b = next(pipe.train)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       logits_to_keep=positions_to_keep(b["labels"]), use_cache=False).logits
        loss = pipe.objective.loss(logits, b["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return {"step": step, "evaluate": lambda split: pipe.evaluate(evaluator, split),
            "steps": budget // FO_FORWARDS_PER_STEP, "per_step": FO_FORWARDS_PER_STEP,
            "info": info}
