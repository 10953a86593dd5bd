"""A run's decision rule: its temperature and its operating points, fitted on validation.

`--mode evaluate` (and the evaluation at the end of training) scores the checkpoint-selection
split of the training datasets (`config.eval.splits_from_train`) with the checkpoint it
evaluates, fits one temperature there (evaluators/calibration.py) and chooses the thresholds
of every operating point on the calibrated P(fake), at frame and at video level
(evaluators/operating_points.py), and writes them to WORKDIR/decision.json. Predict,
robustness, export and the service read that file: every P(fake) a user sees is calibrated
with it, and every label is decided at one of its thresholds, so no number a deployment acts
on was chosen on a test set.

Frame-level thresholds apply to a single image; video-level ones to a video or a folder of
frames, whose P(fake) is `config.eval.video_aggregation` of its calibrated frame
probabilities (the same aggregation the video thresholds were chosen under).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import jax
import ml_collections as mlc
import numpy as np

from fmsd_jax import atomic
from fmsd_jax.data import pipeline
from fmsd_jax.errors import BadInput, UserError
from fmsd_jax.evaluators import calibration, metrics, scoring
from fmsd_jax.evaluators import operating_points as ops
from fmsd_jax.run import workdir_files

log = logging.getLogger("fmsd_jax")

LEVELS = ("frame", "video")


@dataclasses.dataclass(frozen=True)
class Decision:
    """What decision.json holds. `thresholds[level][name]` is on the calibrated P(fake);
    a frame (video) is called fake when its P(fake) >= the threshold. `note` says in words why
    a run has T = 1 or no thresholds (a one-class validation split, no validation split)."""

    temperature: float = 1.0
    thresholds: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    fitted_on: dict[str, Any] = dataclasses.field(default_factory=dict)
    aggregation: str = "mean"
    topk: int = 4
    validation: dict[str, Any] = dataclasses.field(default_factory=dict)
    note: str | None = None

    def available(self, level: str = "video") -> tuple[str, ...]:
        return tuple(self.thresholds.get(level, {}))

    def threshold(self, operating_point: str | float, level: str = "video") -> float:
        """The threshold of a named operating point ('eer', 'fpr@0.01', 'fpr@0.05') at
        `level`, or a number given as the threshold itself."""
        point = parse_operating_point(operating_point)
        if isinstance(point, float):
            return point
        have = self.thresholds.get(level, {})
        if point not in have:
            why = f" ({self.note})" if self.note else ""
            raise BadInput(
                f"operating point {point!r} is not in this run's {workdir_files.DECISION_JSON}"
                f"{why}; it has {', '.join(have) or 'no operating points'} at {level} level: "
                "choose one of those, give a threshold as a number (e.g. "
                "--config.predict.operating_point=0.5), or run --mode evaluate to fit them")
        return float(have[point])

    def to_json(self) -> dict[str, Any]:
        return atomic.jsonable(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Decision:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in fields})


def check_config(cfg: mlc.ConfigDict) -> None:
    """The decision fields of a config, checked before any work (train ends in an
    evaluation, so it checks too)."""
    if cfg.eval.video_aggregation not in metrics.AGGREGATIONS:
        raise BadInput(f"config.eval.video_aggregation={cfg.eval.video_aggregation!r}: use one "
                       f"of {', '.join(metrics.AGGREGATIONS)}")
    if int(cfg.eval.video_topk) < 1:
        raise BadInput(f"config.eval.video_topk={cfg.eval.video_topk}: must be >= 1")
    parse_operating_point(cfg.predict.operating_point)


def parse_operating_point(value: str | float) -> str | float:
    """'eer', 'fpr@A' for an A the run chose (see operating_points.NAMES), or a threshold in
    [0, 1] given as a number or a string; anything else is a user's mistake, said before the
    model loads."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    else:
        text = str(value).strip().lower()
        if text in ops.NAMES:
            return text
        try:
            number = float(text)
        except ValueError:
            raise BadInput(f"config.predict.operating_point={value!r} is not an operating "
                           f"point: use one of {', '.join(ops.NAMES)} or a threshold on "
                           "P(fake) in [0, 1], e.g. 0.5") from None
    if not 0.0 <= number <= 1.0 or math.isnan(number):
        raise BadInput(f"config.predict.operating_point={value!r}: a threshold on P(fake) must "
                       "lie in [0, 1]")
    return number


def describe(decision: Decision, operating_point: str | float, level: str) -> str:
    """How a label was decided, in words, for predict's header and predictions.json."""
    point = parse_operating_point(operating_point)
    t = decision.threshold(point, level)
    if isinstance(point, float):
        return f"fake if P(fake) >= {t:g} (a threshold given in the config)"
    where = decision.fitted_on
    val = decision.validation.get(level, {}).get(point, {})
    realised = ""
    if val:
        realised = (f"; on validation it flagged {val['fpr']:.1%} of real and caught "
                    f"{val['tpr']:.1%} of fake {level}s")
    name = "equal error rate" if point == "eer" else f"false-alarm rate {point[4:]}"
    return (f"fake if P(fake) >= {t:.4g}: the {level}-level {name} operating point, chosen on "
            f"the {where.get('split', '?')} split of {', '.join(where.get('datasets', []))}"
            f"{realised}")


def fit(margins: np.ndarray, labels: np.ndarray, video_ids: np.ndarray | None, *,
        aggregation: str = "mean", topk: int = 4, fitted_on: dict[str, Any] | None = None
        ) -> Decision:
    """Temperature by NLL on these (validation) frames, then the thresholds of every operating
    point on the calibrated P(fake), at frame level and (with video ids) at video level."""
    temperature, why = calibration.fit_temperature(margins, labels)
    probs = calibration.probs_at(margins, temperature)
    thresholds, realised, notes = {}, {}, [why] if why else []
    levels = {"frame": (probs, labels)}
    if video_ids is not None and len(video_ids):
        vp, vy, _ = metrics.aggregate_by_video(probs, labels, video_ids, how=aggregation,
                                               topk=topk)
        levels["video"] = (vp, vy)
    else:
        notes.append("no video ids: no video-level operating points")
    for level, (p, y) in levels.items():
        chosen = ops.choose_thresholds(p, y)
        if chosen is None:
            if not why:
                notes.append(f"one class at {level} level: no {level}-level operating points")
            continue
        thresholds[level] = chosen
        realised[level] = {n: ops.rates_at(p, y, t) for n, t in chosen.items()}
    return Decision(temperature=temperature, thresholds=thresholds, fitted_on=fitted_on or {},
                    aggregation=aggregation, topk=int(topk), validation=realised,
                    note="; ".join(notes) or None)


def fit_on_validation(cfg: mlc.ConfigDict, run, trainable, predict=None, *,
                      checkpoint: str | None = None, step: int | None = None) -> Decision:
    """Score the training datasets' validation split (uncalibrated), pool it and `fit`.
    A run without that split keeps T = 1 and gets no named operating points; a log line says
    so in words."""
    split = cfg.eval.splits_from_train
    margins, labels, vids, used = [], [], [], []
    for name in cfg.data.train_dataset:
        if not pipeline.has_split(cfg.data, name, split):
            continue
        acc = scoring.score_split(cfg, run, trainable, name, split, predict)
        margins.append(acc.logits())
        labels.append(acc.arrays()[1])
        ids = acc.video_ids()
        # pooled datasets may reuse a video name: key by dataset too
        vids.append(None if ids is None else
                    np.asarray([f"{name}/{v}" for v in ids], dtype=object))
        used.append(name)
    fitted_on = {"datasets": used, "split": split, "checkpoint": checkpoint, "step": step}
    if not used:
        note = (f"no training dataset has a {split!r} split: P(fake) is the uncalibrated "
                "softmax (T = 1) and only numeric thresholds can label")
        log.warning("calibration: %s", note)
        return Decision(fitted_on=fitted_on, aggregation=cfg.eval.video_aggregation,
                        topk=int(cfg.eval.video_topk), note=note)
    z = np.concatenate(margins)
    y = np.concatenate(labels)
    ids = None if any(v is None for v in vids) else np.concatenate(vids)
    fitted_on.update(frames=int(z.size), videos=0 if ids is None else len(set(ids.tolist())))
    decision = fit(z, y, ids, aggregation=cfg.eval.video_aggregation,
                   topk=int(cfg.eval.video_topk), fitted_on=fitted_on)
    before = calibration.ece(calibration.probs_at(z, 1.0), y)
    after = calibration.ece(calibration.probs_at(z, decision.temperature), y)
    if decision.note:
        log.warning("calibration: %s%s", "T stays 1: " if decision.temperature == 1.0 else "",
                    decision.note)
    if decision.temperature != 1.0:
        log.info("calibration: T = %.4f fitted by NLL on the %s split of %s (%d frames): "
                 "validation ECE %.4f -> %.4f", decision.temperature, split, ", ".join(used),
                 z.size, before, after)
    for level, chosen in decision.thresholds.items():
        log.info("operating points (%s level, on validation): %s", level, ", ".join(
            f"{n} >= {t:.4g}" for n, t in chosen.items()))
    return decision


def save(workdir: str | Path, decision: Decision) -> Path:
    path = Path(workdir) / workdir_files.DECISION_JSON
    if jax.process_index() == 0:
        atomic.write_json(path, decision.to_json())
    return path


def load_decision(workdir: str | Path) -> Decision:
    """The run's decision.json; without one (a run never evaluated since this file exists)
    T = 1 and no named operating points, and the note says so."""
    path = Path(workdir) / workdir_files.DECISION_JSON
    if not path.is_file():
        return Decision(note=f"{path} does not exist (run --mode evaluate to fit the "
                             "temperature and operating points)")
    try:
        return Decision.from_json(atomic.read_json(path))
    except (TypeError, KeyError) as e:
        raise UserError(f"{path} is not a decision file this version reads ({e}); run "
                        "--mode evaluate to rewrite it") from None
