"""``zo2-train``: the Hydra app that every launcher runs.

Parse the config, build, train, clean up. Examples::

    zo2-train                                   # embedded default: SmolLM2-135M on tweets
    zo2-train optim.lr=5e-5 steps=200 task=drugs
    zo2-train -m optim.lr=1e-5,3e-5,1e-4         # a Hydra multirun sweep

User errors (a bad value, a missing model or data file) end with one line
``error: ...`` and exit status 2, Hydra's refusals too (an unknown key, an ill-typed
value, a missing value, no such option in a group): Hydra raises them
(``HYDRA_FULL_ERROR``) and :func:`describe` says them in one line. Hydra's own files
(``.hydra/``, ``train.log``) go in the run's directory, ``output_dir`` when set; an
attempt refused before it wrote anything leaves no trace there.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import types
import typing
from datetime import datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.errors import (  # noqa: E402
    CompactHydraException,
    ConfigCompositionException,
    MissingConfigException,
    OverrideParseException,
)
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from omegaconf.errors import (  # noqa: E402
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from zo2.config import register  # noqa: E402
from zo2.env import main as print_versions  # noqa: E402
from zo2.errors import ZO2Error  # noqa: E402
from zo2.train import run  # noqa: E402

register()


def default_run_dir() -> str:
    """Hydra's run directory: ``runs/<date>/<time>``; under torchrun one directory per
    job, ``runs/torchrun-<run id>``, shared by every rank and by every elastic restart
    (``--max-restarts``), so a restarted job finds its checkpoints and resumes."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")  # torchrun's --rdzv-id
    if run_id != "none":
        return f"runs/torchrun-{run_id}"
    return datetime.now().strftime("runs/%Y-%m-%d/%H-%M-%S")


HYDRA_FILES = (".hydra", "train.log")  # what Hydra writes into a run directory
_found: dict[str, dict[str, int] | None] = {}  # run directory -> its entries' mtimes before


def _entries(path: Path) -> dict[str, int] | None:
    """The top-level entries of a folder and their modification times (None: no folder)."""
    if not path.is_dir():
        return None
    return {entry.name: entry.stat().st_mtime_ns for entry in os.scandir(path)}


def run_dir(output_dir: str = "") -> str:
    """``hydra.run.dir``: ``output_dir`` when set (Hydra's ``.hydra/`` and log go in the
    run's own directory), else :func:`default_run_dir`. Hydra resolves it just before it
    creates the directory: what was there is noted, for :func:`_discard_attempt`."""
    folder = str(output_dir) if output_dir else default_run_dir()
    path = Path(folder).absolute()
    if str(path) not in _found:  # the first resolution, before Hydra makes the directory
        _found[str(path)] = _entries(path)
    return folder


def sweep_dir(output_dir: str = "") -> str:
    """``hydra.sweep.dir``: ``output_dir`` when set, else ``runs/multirun/<date>/<time>``;
    each job runs in a subdirectory of it (``hydra.sweep.subdir``)."""
    return str(output_dir) if output_dir else datetime.now().strftime(
        "runs/multirun/%Y-%m-%d/%H-%M-%S")


OmegaConf.register_new_resolver("zo2_run_dir", run_dir, replace=True)
OmegaConf.register_new_resolver("zo2_sweep_dir", sweep_dir, replace=True)


def _discard_attempt(folder: str) -> None:
    """After a user error: if the run wrote nothing (only Hydra's ``.hydra/`` and log
    are new or changed in its directory), remove what Hydra wrote that was not there
    before, and the directory if this attempt made it, so bad input leaves nothing
    behind. A run that wrote something (it failed midway) keeps Hydra's record."""
    path = Path(folder).absolute()
    if str(path) not in _found:
        return
    before, now = _found[str(path)] or {}, _entries(path) or {}
    if any(before.get(name) != mtime for name, mtime in now.items() if name not in HYDRA_FILES):
        return
    for name in set(HYDRA_FILES) - set(before):
        target = path / name
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
    if _found[str(path)] is None:
        try:
            path.rmdir()  # only if empty
        except OSError:
            pass


_TYPE_NAMES = {float: "a float", int: "an integer", bool: "a boolean (true or false)",
               str: "a string", list: "a list", dict: "a mapping"}


def _expected(object_type: type | None, key: object) -> str | None:
    """The field's type in words (``a float``), from the schema's dataclass."""
    try:
        hint = typing.get_type_hints(object_type)[key]
    except Exception:  # not a dataclass field (a dict key, a list index)
        return None
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]  # Optional[X]
    return _TYPE_NAMES.get(typing.get_origin(hint) or hint)


def describe(err: BaseException) -> str | None:
    """The one line ``<key>: <what is wrong>`` for a config Hydra or OmegaConf refused,
    or None for an exception that is not about the config (a bug: its traceback)."""
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options:
        group, _, name = err.missing_cfg_file.rpartition("/")
        return f"{group}: no option {name!r} (options: {', '.join(sorted(err.options))})"
    cause = err.__cause__ if isinstance(err, ConfigCompositionException) else err
    if isinstance(cause, OmegaConfBaseException):
        key, owner = cause.full_key, cause.object_type
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and key:
            where = f" ({owner.__name__} has no field {cause.key!r})" if owner else ""
            return f"{key}: unknown key{where}"
        if isinstance(cause, MissingMandatoryValue) and key:
            return f"{key}: missing value"
        if isinstance(cause, ValidationError) and key:
            expected = _expected(owner, cause.key)
            if expected is not None and cause.value is None:
                return f"{key}: must not be null (needs {expected})"
            if expected is not None:
                return f"{key}: {cause.value!r} is not {expected}"
        first = str(getattr(cause, "msg", cause)).strip().splitlines()
        text = first[0] if first else type(cause).__name__
        return f"{key}: {text}" if key and not text.startswith(f"{key}:") else text
    if isinstance(err, OverrideParseException):
        return f"{err.override}: not an override ({str(err.message).splitlines()[0]})"
    if isinstance(err, CompactHydraException):  # an override Hydra cannot parse or apply
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        return "; ".join(lines[:2]) if lines else type(err).__name__
    return None


def _refuse(line: str) -> None:
    print(f"error: {line}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base=None, config_path="../configs", config_name="train")
def _app(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        try:
            conf = OmegaConf.to_object(cfg)
        except OmegaConfBaseException as err:  # a value still missing (???) or ill-typed
            line = describe(err)
            if line is None:
                raise
            raise ZO2Error(line) from err
        # a sweep's job: its own subdirectory of hydra.sweep.dir (output_dir when set)
        output_dir = hydra_cfg.runtime.output_dir if multirun else (
            conf.output_dir or hydra_cfg.runtime.output_dir)
        summary = run(conf, output_dir)
    except ZO2Error as err:
        if not multirun:
            _discard_attempt(hydra_cfg.runtime.output_dir)
        _refuse(str(err))
    if os.environ.get("RANK", "0") != "0":
        return  # the main rank reports
    print(report_line(summary, output_dir))


def report_line(summary: dict, output_dir: str) -> str:
    """``zero-shot test acc 0.5120 | tuned test acc 0.6980 (best dev 0.7000 at step 100) |
    ...``; a metric other than accuracy by its name, a missing split as ``n/a``."""
    name = "acc" if summary["eval_metric"] == "accuracy" else summary["eval_metric"]

    def score(key: str) -> str:
        return "n/a" if summary[key] is None else f"{summary[key]:.4f}"

    return (f"zero-shot test {name} {score('zero_shot_test')} | tuned test {name} "
            f"{score('tuned_test')} (best dev {score('best_dev')} at step "
            f"{summary['best_step']}) | {summary['minutes']:.1f} min | "
            f"peak RSS {summary['peak_rss_mb']:.0f} MiB | {output_dir}")


def main() -> None:
    if sys.argv[1:] == ["--version"]:  # before Hydra, which owns every other argument
        print_versions()
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight loading / shard writing bars; ours is enough
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # Hydra raises what it refuses (HYDRA_FULL_ERROR) rather than printing it and exiting
    # 1: a refused config (an unknown key, an ill-typed value, no such option) becomes
    # one line here, exit status 2, on every rank; anything else keeps its traceback.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _app()
    except (CompactHydraException, OmegaConfBaseException) as err:
        line = describe(err)
        if line is None:
            raise
        _refuse(line)


if __name__ == "__main__":
    main()
