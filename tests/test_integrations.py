"""ZOTrainer (transformers.Trainer) and ZOSFTTrainer (TRL): their loops, zo2's steps."""

from __future__ import annotations

import copy

import datasets
import pytest
import torch
from _chat import CHATML_GENERATION, chat
from transformers import DataCollatorForLanguageModeling, TrainerCallback, TrainingArguments

from zo2.config import OptimConfig
from zo2.data.formats import encode_row
from zo2.engine import ZOEngine
from zo2.errors import ConfigError
from zo2.integrations import ZOArguments, ZOTrainer
from zo2.loss import Objective
from zo2.models import load_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def tiny():
    model, tokenizer = load_model("tiny-llama")
    return model.requires_grad_(True), tokenizer  # as from_pretrained gives it


def token_rows(tokenizer, n: int = 32) -> datasets.Dataset:
    texts = [f"review {i}: the film was {'good' if i % 3 else 'bad'}{'!' * (i % 4)}"
             for i in range(n)]
    return datasets.Dataset.from_list([{"input_ids": tokenizer(t)["input_ids"]} for t in texts])


def arguments(out, **kwargs) -> TrainingArguments:
    base = dict(max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                lr_scheduler_type="constant", report_to="none", use_cpu=True,
                save_strategy="no", max_grad_norm=0.0, seed=3, disable_tqdm=True)
    return TrainingArguments(str(out), **{**base, **kwargs})


class Recording(ZOTrainer):
    """Keeps each ZO step's batch and lr (the engine's inputs)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen = getattr(self, "seen", [])
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:
            self.seen.append((self.last_batch, self.optimizer.param_groups[0]["lr"]))
        return loss

    def _zo_step(self, batch):
        self.last_batch = {k: v.clone() for k, v in batch.items()}
        result = super()._zo_step(batch)
        self.losses = getattr(self, "losses", []) + [result.loss]
        return result


def train(out, trainer_cls=ZOTrainer, zo2=None, **kwargs):
    model, tokenizer = tiny()
    trainer = trainer_cls(model=model, args=arguments(out, **kwargs),
                          train_dataset=token_rows(tokenizer), processing_class=tokenizer,
                          data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                          zo2=zo2)
    trainer.train()
    return trainer


def weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.engine.export_state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_zotrainer_steps_are_the_engines_steps_bit_for_bit(tmp_path):
    """The weights after N Trainer steps equal zo2's engine stepped on the same batches at
    the lrs of the Trainer's scheduler (linear decay with warmup here)."""
    trainer = train(tmp_path, Recording, zo2={"eps": 1e-3, "method": "zo-momentum"},
                    lr_scheduler_type="linear", warmup_steps=1, logging_steps=1)
    lrs = [lr for _, lr in trainer.seen]
    assert len(lrs) == 4 and lrs[:2] == [0.0, 1e-3] and lrs[1] > lrs[2] > lrs[3] > 0  # HF warmup
    model, _ = tiny()
    engine = ZOEngine(model, OptimConfig(method="zo-momentum", lr=1e-3, eps=1e-3,
                                         batch_size=4), Objective("lm"), seed=3)
    for batch, lr in trainer.seen:
        engine.step(batch, lr=lr)
    assert_same(weights(trainer), {k: v.clone() for k, v in engine.export_state_dict().items()})
    assert trainer.model_wrapped is trainer.model  # never wrapped (DDP or otherwise)
    # the logged loss is each step's loss (the Trainer sums it in a float32 tensor)
    logged = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert logged == [torch.tensor(loss, dtype=torch.float32).item() for loss in trainer.losses]


def test_gradient_accumulation_is_one_batch_twice_as_large(tmp_path):
    one = train(tmp_path / "one", per_device_train_batch_size=4)
    two = train(tmp_path / "two", per_device_train_batch_size=2, gradient_accumulation_steps=2)
    assert_same(weights(one), weights(two))


class StopAt(TrainerCallback):
    """Ends training after step ``step`` (an interrupted run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def zotrainer(out, zo2=None, callbacks=(), **kwargs) -> ZOTrainer:
    model, tokenizer = tiny()
    return ZOTrainer(model=model, args=arguments(out, **kwargs), zo2=zo2,
                     train_dataset=token_rows(tokenizer), processing_class=tokenizer,
                     data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                     callbacks=list(callbacks))


def test_resume_from_checkpoint_ends_with_the_uninterrupted_weights(tmp_path):
    """ZO-Adam (moments to restore) on a linear schedule, stopped after step 2 of 4 and
    resumed from checkpoint-2: the weights of the run that was never stopped."""
    settings = dict(zo2={"method": "zo-adam"}, lr_scheduler_type="linear",
                    save_strategy="steps", save_steps=2)
    whole = zotrainer(tmp_path / "whole", **settings)
    whole.train()
    zotrainer(tmp_path / "cut", callbacks=[StopAt(2)], **settings).train()
    checkpoint = tmp_path / "cut" / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").is_file()  # zo2's state, in the Trainer's folder
    resumed = zotrainer(tmp_path / "cut", **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.engine.step_index == 4
    assert_same(weights(resumed), weights(whole))


class Events(TrainerCallback):
    def __init__(self) -> None:
        self.names: list[str] = []

    def on_log(self, args, state, control, **kwargs):
        self.names.append("log")

    def on_evaluate(self, args, state, control, **kwargs):
        self.names.append("evaluate")

    def on_save(self, args, state, control, **kwargs):
        self.names.append("save")


def test_callbacks_evaluation_and_saving_see_the_updated_weights(tmp_path):
    model, tokenizer = tiny()
    rows = token_rows(tokenizer)
    events = Events()
    trainer = ZOTrainer(model=model, args=arguments(tmp_path, eval_strategy="steps",
                                                     eval_steps=2, save_strategy="steps",
                                                     save_steps=2, logging_steps=1),
                        train_dataset=rows, eval_dataset=rows.select(range(8)),
                        processing_class=tokenizer, callbacks=[events],
                        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
    assert {"log", "evaluate", "save"} <= set(events.names)
    # evaluate() after training: the loss of the current weights, as a plain forward gives
    batch = trainer.data_collator([rows[i] for i in range(8)])
    current = weights(trainer)
    fresh, _ = tiny()
    fresh.load_state_dict(current)
    with torch.no_grad():
        expected = fresh(**batch).loss.item()
    assert trainer.evaluate()["eval_loss"] == pytest.approx(expected, rel=0, abs=0)
    saved = tmp_path / "checkpoint-4" / "model.safetensors"
    from safetensors.torch import load_file

    on_disk = load_file(saved)
    assert all(torch.equal(on_disk[k], current[k]) for k in on_disk)


def test_report_to_wandb_offline_works(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    try:
        train(tmp_path / "run", report_to="wandb", logging_steps=1, max_steps=2)
    finally:
        wandb.finish()  # the Trainer leaves its run open in the process
    assert list((tmp_path / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize("kwargs, message", [
    ({"fp16": True}, "fp16 mixed precision: ZO has no backward pass"),
    ({"optim": "sgd"}, "optim='sgd': zo2 replaces the optimizer"),
    ({"label_smoothing_factor": 0.1}, "label_smoothing_factor"),
])
def test_arguments_without_meaning_for_zo_are_refused_with_what_zo2_does(tmp_path, kwargs,
                                                                       message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train(tmp_path, **kwargs)


def test_the_zo2_argument_names_its_own_settings_only():
    with pytest.raises(ConfigError, match=r"zo2\['lr'\]: set it in TrainingArguments "
                                          r"\(learning_rate\)"):
        ZOArguments.of({"lr": 1e-4})
    with pytest.raises(ConfigError, match="unknown setting"):
        ZOArguments.of({"epsilon": 1e-3})
    zo = ZOArguments.of({"q": 2, "offload": {"enabled": False}})
    assert zo.q == 2 and zo.parallel.dp == -1
    # every OptimConfig setting that TrainingArguments do not own is one of zo2's, with
    # the same default (the lr probe's two belong to optim.lr=auto, which is refused)
    import dataclasses

    from zo2.integrations.arguments import FROM_TRAINING_ARGUMENTS

    defaults = OptimConfig()
    own = {f.name for f in dataclasses.fields(OptimConfig)} - set(FROM_TRAINING_ARGUMENTS) \
        - {"lr_probe_batches", "lr_safety"}
    assert own <= {f.name for f in dataclasses.fields(ZOArguments)}
    assert all(getattr(ZOArguments(), name) == getattr(defaults, name) for name in own)


def test_zosfttrainer_trains_on_the_assistant_tokens_trl_labels(tmp_path):
    """TRL's assistant-only labels (its {% generation %} masks) are the labels of zo2's own
    messages format, and the ZO steps lower the loss on a fixed batch."""
    trl = pytest.importorskip("trl")
    from zo2.integrations import ZOSFTTrainer

    model, tokenizer = tiny()
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = CHATML_GENERATION
    rows = [chat(i, system=False) for i in range(8)]

    class Seen(ZOSFTTrainer):
        def _zo_step(self, batch):
            self.batches = getattr(self, "batches", []) + [batch]
            return super()._zo_step(batch)

    args = trl.SFTConfig(str(tmp_path), max_steps=12, per_device_train_batch_size=8,
                         learning_rate=3e-3, lr_scheduler_type="constant", report_to="none",
                         use_cpu=True, save_strategy="no", assistant_only_loss=True,
                         max_grad_norm=0.0, seed=0, disable_tqdm=True,
                         gradient_checkpointing=False)
    trainer = Seen(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                   processing_class=tokenizer, zo2={"eps": 1e-2})
    fixed = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    with torch.no_grad():
        before = model(**fixed).loss.item()
    trainer.train()
    ours = {tuple(e.input_ids): e.labels for e in
            (encode_row(r, i, fmt="messages", tokenizer=tokenizer, max_length=256, source="x")
             for i, r in enumerate(rows))}
    first = trainer.batches[0]
    for ids, mask, labels in zip(*(first[k].tolist() for k in
                                   ("input_ids", "attention_mask", "labels"))):
        n = sum(mask)  # right padded
        assert labels[:n] == ours[tuple(ids[:n])] and set(labels[n:]) <= {-100}
    trainer.engine.flush()
    with torch.no_grad():
        after = trainer.model(**fixed).loss.item()
    assert after < before


def test_two_ranks_under_torchrun_are_one_process_with_the_global_batch(tmp_path):
    """Each rank reads its own shard; the ZO step sees the global batch (the rows one
    process with a batch twice as large draws, in its order) and the ranks' losses are
    combined as zo2's data parallelism does: the weights equal the one-process emulation
    of 2 data-parallel ranks (``dist_job.EmulatedDP``, exact) on those batches."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from _procs import retry_on_port_clash
    from dist_job import EmulatedDP

    here = Path(__file__).parent

    def launch(ports):
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
             f"--master_port={ports[0]}", str(here / "hf_job.py"), str(tmp_path / "ddp"), "2",
             "3"], capture_output=True, text=True, timeout=600,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
        return proc, "" if proc.returncode == 0 else proc.stdout + proc.stderr

    proc = retry_on_port_clash(launch)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = torch.load(tmp_path / "ddp" / "run.pt")
    single = train(tmp_path / "single", Recording, per_device_train_batch_size=4, max_steps=3)
    for (ours, lr), (theirs, lr1) in zip(run["steps"], single.seen, strict=True):
        assert lr == lr1
        assert sorted(map(tuple, ours["input_ids"].tolist())) == \
            sorted(map(tuple, theirs["input_ids"].tolist()))  # the same rows
    model, _ = tiny()
    engine = type("EmulatedDP", (EmulatedDP,), {"dp": 2})(
        model, OptimConfig(lr=1e-3, eps=1e-3, batch_size=4), Objective("lm"), seed=3)
    for batch, lr in run["steps"]:
        engine.step(batch, lr=lr)
    assert_same(run["weights"], {k: v.clone() for k, v in engine.export_state_dict().items()})


def test_offloaded_through_the_zo2_argument_equals_resident(tmp_path):
    resident = train(tmp_path / "resident")
    offloaded = train(tmp_path / "offloaded", zo2={"offload": {"enabled": True}})
    assert offloaded.engine.store is not resident.engine.store
    assert type(offloaded.engine.residency).__name__ == "Offloader"
    assert_same(weights(offloaded), weights(resident))


def test_a_peft_model_trains_its_adapters_and_saves_an_adapter_folder(tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny()
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = ZOTrainer(model=model, args=arguments(tmp_path), train_dataset=token_rows(tokenizer),
                        processing_class=tokenizer,
                        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert (tmp_path / "final" / "adapter_config.json").is_file()


def test_load_best_model_at_end_leaves_the_best_checkpoints_weights(tmp_path):
    """The update pending after the last step is dropped when the Trainer loads the best
    checkpoint into the model: the weights are that checkpoint's, bit for bit."""
    from safetensors.torch import load_file

    model, tokenizer = tiny()
    rows = token_rows(tokenizer)
    trainer = ZOTrainer(model=model, args=arguments(tmp_path, eval_strategy="steps",
                                                     eval_steps=1, save_strategy="steps",
                                                     save_steps=1, learning_rate=3e-2,
                                                     load_best_model_at_end=True),
                        train_dataset=rows, eval_dataset=rows.select(range(8)),
                        processing_class=tokenizer,
                        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-4")  # not simply the last
    saved = load_file(f"{best}/model.safetensors")
    current = weights(trainer)
    assert all(torch.equal(saved[k], current[k]) for k in saved)


def test_the_divergence_guard_stops_a_zotrainer_at_100x_its_working_lr(tmp_path):
    """learning_rate=1e-3 is these tests' working lr; at 1e-1 train() raises zo2's
    TrainingError with zo2-train's one line (in the Trainer's knobs) within a few steps of
    the guard's window, and no checkpoint is saved once the loss has left its bound."""
    from zo2.errors import TrainingError

    out = tmp_path / "run"
    trainer = zotrainer(out, learning_rate=1e-1, max_steps=30, save_strategy="steps",
                        save_steps=1)
    with pytest.raises(TrainingError) as caught:
        trainer.train()
    message, guard = str(caught.value), trainer.guard
    assert "\n" not in message and message.startswith("training diverged at step ")
    assert "with learning_rate=0.1 and zo2['eps']=0.001; try learning_rate=0.01" in message
    stopped = int(message.split()[4].rstrip(":"))
    assert guard.window <= stopped <= 10 and trainer.engine.step_index == stopped
    kept = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert kept and all(step < guard.left_at for step in kept)  # none after the loss left
    sane = [step for step in kept if step < guard.left_at - 1]
    assert (f"checkpoint-{sane[-1]} " if sane else "sane checkpoint is none") in message
    assert f"left its bound at step {guard.left_at}" in message


def test_the_divergence_guard_lets_a_sane_zotrainer_run_finish(tmp_path):
    trainer = zotrainer(tmp_path, max_steps=8)  # learning_rate=1e-3
    trainer.train()
    assert trainer.engine.step_index == 8 and trainer.guard.left_at is None
    assert len(trainer.guard.recent) == trainer.guard.window  # it watched every step
    assert trainer.optimizer.state_dict()["zo2_guard"] == trainer.guard.state_dict()


def test_an_evaluation_out_of_the_guards_bound_is_never_the_best_model(tmp_path):
    """The bound over the first step's loss 2.0 is max(4 x 2.0, 2.0 + 1) = 8.0: an
    eval_loss of 8.5 is not a candidate for load_best_model_at_end, even as the first
    evaluation (which the Trainer alone would take as the best so far); 8.0 is."""
    model, tokenizer = tiny()
    rows = token_rows(tokenizer)
    trainer = ZOTrainer(model=model, args=arguments(tmp_path, eval_strategy="steps",
                                                     eval_steps=1, save_strategy="steps",
                                                     save_steps=1, load_best_model_at_end=True),
                        train_dataset=rows, eval_dataset=rows.select(range(8)),
                        processing_class=tokenizer,
                        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.guard.observe(1, 2.0)
    trainer.state.global_step = 1
    assert trainer._determine_best_metric({"eval_loss": 8.5}, None) is False
    assert trainer.state.best_metric is None
    assert trainer._determine_best_metric({"eval_loss": 8.0}, None) is True
    assert trainer.state.best_metric == 8.0


def test_guard_settings_and_lr_auto_through_the_zo2_argument():
    zo = ZOArguments.of({"guard": {"window": 3, "factor": 0}})
    assert (zo.guard.window, zo.guard.factor) == (3, 0)
    with pytest.raises(ConfigError, match=r"guard.factor: must be 0 \(off\) or > 1"):
        ZOArguments.of({"guard": {"factor": 0.5}})
    with pytest.raises(ConfigError, match=r"zo2\['guard'\]: unknown setting\(s\) 'windows'"):
        ZOArguments.of({"guard": {"windows": 3}})
    # the lr probe is zo2-train's: a ZOTrainer's lr is TrainingArguments.learning_rate
    with pytest.raises(ConfigError, match=r"zo2\['lr'\]='auto': the lr probe is zo2-train's"):
        ZOArguments.of({"lr": "auto"})
