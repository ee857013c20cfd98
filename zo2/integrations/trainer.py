"""Zeroth-order steps inside the Hugging Face ``Trainer``, through its public hooks (and one
method, ``_determine_best_metric``, for the divergence guard).

:class:`ZOTrainerMixin` goes before a ``transformers.Trainer`` (or a subclass such as
TRL's ``SFTTrainer``) in the bases; the Trainer's own loop runs unchanged, and:

* ``create_optimizer`` builds zo2's engine on the model (its trainable parameters: those
  that require grad, unless ``zo2.trainable`` says otherwise) and returns a
  :class:`ZOOptimizer`: one parameter group whose ``lr`` the Trainer's scheduler sets
  (``lr_scheduler_type``, warmup...), a ``step()`` with nothing left to do, and a
  ``state_dict()`` that is the engine's state, so it is saved in and restored from the
  Trainer's ``checkpoint-N`` folders next to the weights;
* ``training_step`` keeps each micro-batch; on the last one of an optimizer step (the
  Trainer's ``sync_gradients``) it joins them into one batch (with several ranks: the
  ranks' batches into the global one), makes one ZO step at the scheduler's lr and
  returns its loss (the earlier micro-batches return 0, so the Trainer's logged loss is
  the steps' loss);
* ``evaluate``, ``predict`` and ``save_model`` first apply the pending update (zo2 fuses
  each update into the next forward), and loading weights into the model (resuming,
  ``load_best_model_at_end``) drops it, through a ``load_state_dict`` pre-hook on the
  model;
* zo2's divergence guard (:mod:`zo2.guard`, ``zo2={"guard": {...}}``) watches each ZO
  step's loss: a :class:`GuardCallback` cancels the checkpoint of a step whose loss is out
  of the guard's bound, an evaluation whose ``eval_loss`` is out of the bound over the
  reference (the evaluation before training, ``eval_on_start``, else the first step's
  training loss) never becomes the best model (``load_best_model_at_end``,
  ``save_strategy="best"``: the one Trainer method overridden that is not a public hook,
  ``_determine_best_metric``), and a diverged run stops: ``train()`` raises zo2's
  :class:`~zo2.errors.TrainingError` with zo2-train's one line (the ``learning_rate`` and
  ``eps`` in force, a tenth of the lr to try, the last sane ``checkpoint-N``), so nothing
  is saved after it and a script does not go on to save diverged weights.

The model only ever runs forward: the accelerator prepares it as for evaluation, so it is
never wrapped in ``DistributedDataParallel``; under ``torchrun`` every rank's batch goes into
one all-gather and zo2's mesh splits it again (data parallel: one all-reduce of the losses
per step; perturbation parallel and offloading through ``zo2``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import torch
import transformers

from zo2.engine import ZOEngine
from zo2.errors import ConfigError, TrainingError
from zo2.guard import DivergenceGuard
from zo2.integrations.arguments import ZOArguments, check_training_arguments
from zo2.integrations.batches import gather, join, zo_batch
from zo2.loss import Objective
from zo2.parallel import LaunchEnv, Mesh

log = logging.getLogger("zo2")


class ZOOptimizer(torch.optim.Optimizer):
    """What the Trainer sees as its optimizer: the lr it schedules and zo2's state.

    Its one parameter group holds a placeholder tensor (a torch optimizer needs one); the
    update is the engine's, made by :meth:`ZOTrainerMixin.training_step`.
    """

    def __init__(self, engine: ZOEngine, lr: float,
                 guard: DivergenceGuard | None = None) -> None:
        super().__init__([torch.zeros(())], {"lr": lr})
        self.engine = engine
        self.guard = guard  # saved and restored with zo2's state

    def step(self, closure=None) -> None:  # the ZO update was made in training_step
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:  # there are no gradients
        return None

    def state_dict(self) -> dict:
        """The lr groups and zo2's engine state (with a stateful rule, its moments)."""
        engine = self.engine
        state = {"state": {}, "param_groups": super().state_dict()["param_groups"],
                 "zo2": engine.state_dict()}
        if engine.rule.stateful:
            state["zo2_rule"] = engine.store.rule_state(engine.rule)
        if self.guard is not None:
            state["zo2_guard"] = self.guard.state_dict()
        return state

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict({"state": {}, "param_groups": state["param_groups"]})
        self.engine.load_state_dict(state["zo2"])
        if self.engine.rule.stateful:
            self.engine.store.load_rule_state(self.engine.rule, state["zo2_rule"])
        if self.guard is not None and "zo2_guard" in state:
            self.guard.load_state_dict(state["zo2_guard"])


class GuardCallback(transformers.TrainerCallback):
    """No checkpoint of a step whose loss is out of the divergence guard's bound (the
    Trainer decides ``should_save`` in its flow callback, which runs first)."""

    def __init__(self, guard: DivergenceGuard) -> None:
        self.guard = guard

    def on_step_end(self, args, state, control, **kwargs):
        if self.guard.out_of_bounds and control.should_save:
            log.warning("step %d: the loss is out of the divergence guard's bound: no "
                        "checkpoint", state.global_step)
            control.should_save = False
        return control


class ZOTrainerMixin:
    """Zeroth-order optimisation for a ``transformers.Trainer`` (put it first in the bases).

    Args:
        zo2: zo2's settings (:class:`~zo2.integrations.arguments.ZOArguments` or a dict
            of its fields); the rest is the Trainer's arguments, with their meaning.
    """

    def __init__(self, *args: Any, zo2: ZOArguments | Mapping | None = None,
                 **kwargs: Any) -> None:
        self.zo2 = ZOArguments.of(zo2)
        self.engine: ZOEngine | None = None
        self._micro: list[dict[str, torch.Tensor]] = []
        g = self.zo2.guard
        self.guard = DivergenceGuard(g.factor, g.window, g.margin)
        self._eval_reference: float | None = None  # eval_loss before training (eval_on_start)
        super().__init__(*args, **kwargs)
        check_training_arguments(self.args)
        self.add_callback(GuardCallback(self.guard))

    # ---- the model is only ever run forward --------------------------------------------
    def create_accelerator_and_postprocess(self) -> None:
        """The Trainer's accelerator, preparing models as for evaluation (no DDP wrapper:
        accelerate wraps every model in DDP on a multi-process CPU run, and DDP refuses a
        module with no parameter that requires grad)."""
        super().create_accelerator_and_postprocess()
        self.accelerator.__class__ = _forward_only(type(self.accelerator))

    # ---- the optimizer: zo2's engine ------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.engine = self._build_engine(self.model if model is None else model)
            self.optimizer = ZOOptimizer(self.engine, self.args.learning_rate, self.guard)
        return self.optimizer

    def _build_engine(self, model) -> ZOEngine:
        args, zo = self.args, self.zo2
        env = LaunchEnv.read()
        parallel = zo.parallel
        if parallel.dp == -1 and env.world == 1:  # dp: every rank, of one
            parallel = dataclasses.replace(parallel, dp=1)
        mesh = Mesh(parallel, args.device, env)
        trainable = zo.trainable or _trainable(model)
        global_batch = (args.per_device_train_batch_size * args.gradient_accumulation_steps
                        * env.world)
        engine = ZOEngine(model, zo.optim(args, global_batch), Objective("lm"),
                          seed=args.seed, total_steps=max(args.max_steps, 0),
                          trainable=trainable, offload=zo.offload, device=args.device,
                          mesh=mesh)
        model.register_load_state_dict_pre_hook(lambda *_: engine.pending.set(None))
        return engine

    # ---- the step ---------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """Keep the micro-batch; on the last of the step, one ZO step over all of them."""
        self._micro.append(zo_batch(inputs))
        if not self.accelerator.sync_gradients:
            return torch.zeros((), device=self.args.device)
        side, pad = self._padding()
        batch = join(self._micro, side, pad)
        self._micro = []
        mesh = self.engine.mesh
        if mesh.distributed:
            batch = gather({k: v.cpu() for k, v in batch.items()}, side, pad,
                           group=mesh.host_group)
        return torch.tensor(self._zo_step(batch).loss, device=self.args.device)

    def _zo_step(self, batch: dict[str, torch.Tensor]):
        """One ZO step on the step's (global) batch at the scheduler's lr; its loss goes to
        the divergence guard (every rank sees the same combined loss)."""
        result = self.engine.step(batch, telemetry=False,
                                  lr=self.optimizer.param_groups[0]["lr"])
        step = self.engine.step_index
        if not result.skipped and (mean := self.guard.observe(step, result.loss)) is not None:
            self._diverged(step, mean)
        return result

    def _diverged(self, step: int, mean: float) -> None:
        """Stop: zo2-train's one line, with the Trainer's knobs and checkpoints."""
        from zo2.trainer import diverged_message

        sane = sorted((p for p in _checkpoints(self.args.output_dir)
                       if self.guard.sane_checkpoint(int(p.rsplit("-", 1)[1]))),
                      key=lambda p: int(p.rsplit("-", 1)[1]))
        best = self.state.best_model_checkpoint
        raise TrainingError(diverged_message(
            self.guard, step, mean, lr=self.args.learning_rate, eps=self.zo2.eps,
            last=sane[-1] if sane else None, lr_key="learning_rate", eps_key="zo2['eps']",
            best=f"the best checkpoint is {best}" if best else "no best checkpoint"))

    def _determine_best_metric(self, metrics, trial) -> bool:
        """The Trainer's choice of the best checkpoint, less any evaluation whose
        ``eval_loss`` is out of the divergence guard's bound over the reference (the
        evaluation before training, else the first step's training loss)."""
        loss = metrics.get("eval_loss")
        reference = self._eval_reference if self._eval_reference is not None \
            else self.guard.first
        if loss is not None and not self.guard.sane(loss, reference):
            log.warning("step %d: eval_loss %.4g is far above the reference %.4g: not a "
                        "candidate for the best model", self.state.global_step, loss,
                        reference)
            return False
        return super()._determine_best_metric(metrics, trial)

    def _padding(self) -> tuple[str, int]:
        """(side, id) the collator pads with: TRL's collator (it has a ``pad_token_id``)
        on the right, others (``DataCollatorForLanguageModeling``, ``DataCollatorWithPadding``)
        on the tokenizer's ``padding_side``."""
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        pad = getattr(self.data_collator, "pad_token_id", None)
        if pad is None and tokenizer is not None:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
                else tokenizer.eos_token_id
        side = "right"
        if tokenizer is not None and not hasattr(self.data_collator, "pad_token_id"):
            side = getattr(tokenizer, "padding_side", "right")
        return side, int(pad or 0)

    # ---- the current weights for everything else -----------------------------------------
    def _flushed(self) -> None:
        if self.engine is not None:
            self.engine.flush()

    def evaluate(self, *args: Any, **kwargs: Any):
        self._flushed()
        metrics = super().evaluate(*args, **kwargs)
        if self.state.global_step == 0 and self._eval_reference is None:  # before training
            self._eval_reference = metrics.get("eval_loss")
        return metrics

    def predict(self, *args: Any, **kwargs: Any):
        self._flushed()
        return super().predict(*args, **kwargs)

    def save_model(self, *args: Any, **kwargs: Any) -> None:
        self._flushed()
        super().save_model(*args, **kwargs)


def _forward_only(kind: type) -> type:
    """``kind`` (an accelerate Accelerator class) preparing models in evaluation mode."""

    class ForwardOnly(kind):
        def prepare_model(self, model, device_placement=None, evaluation_mode=False):
            return super().prepare_model(model, device_placement, evaluation_mode=True)

    ForwardOnly.__name__ = ForwardOnly.__qualname__ = f"ForwardOnly{kind.__name__}"
    return ForwardOnly


def _checkpoints(folder) -> list[str]:
    """The Trainer's ``checkpoint-N`` folders in ``folder``."""
    import os

    if not folder or not os.path.isdir(folder):
        return []
    return [os.path.join(folder, name) for name in os.listdir(folder)
            if name.startswith("checkpoint-") and name.rsplit("-", 1)[1].isdigit()]


def _trainable(model) -> tuple[str, ...]:
    """The names of the parameters an optimizer would train (``"*"``: all of them)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ConfigError("ZOTrainer: no parameter of the model requires grad, so there is "
                          "nothing to train; unfreeze what to train (model.requires_grad_()) "
                          "or name it with zo2={'trainable': ['*']} (glob patterns)")
    if len(names) == sum(1 for _ in model.parameters()):
        return ("*",)
    return tuple(names)



class ZOTrainer(ZOTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` with zeroth-order steps (:class:`ZOTrainerMixin`)."""
