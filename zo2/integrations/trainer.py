"""Zeroth-order steps inside the Hugging Face ``Trainer``, through its public hooks only.

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
  model.

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
from zo2.errors import ConfigError
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

    def __init__(self, engine: ZOEngine, lr: float) -> None:
        super().__init__([torch.zeros(())], {"lr": lr})
        self.engine = engine

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
        return state

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict({"state": {}, "param_groups": state["param_groups"]})
        self.engine.load_state_dict(state["zo2"])
        if self.engine.rule.stateful:
            self.engine.store.load_rule_state(self.engine.rule, state["zo2_rule"])


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
        super().__init__(*args, **kwargs)
        check_training_arguments(self.args)

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
            self.optimizer = ZOOptimizer(self.engine, self.args.learning_rate)
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
        """One ZO step on the step's (global) batch at the scheduler's lr."""
        return self.engine.step(batch, telemetry=False, lr=self.optimizer.param_groups[0]["lr"])

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
        return super().evaluate(*args, **kwargs)

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
