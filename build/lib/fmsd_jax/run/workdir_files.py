"""Every file a run writes in WORKDIR, named once: the modes, the evaluators and the tests
read these names from here, so a file is renamed in one place.

WORKDIR/
  config.json  layer_mask.json  decomposition.json  run.json   what the run is
  checkpoints/  best/                                         orbax checkpoints
  tb/                                                         TensorBoard events
  results.json  results.md  roc.png                           --mode evaluate (and train)
  decision.json  calibration.png                              temperature, operating points
  layer_scores.png  diagnostics.json  adaptation.png          what the method did
  subspaces.png                                               what each subspace does
  robustness.json  robustness.md  robustness.png              --mode robustness
  predictions.json  plan.json  export/                        predict, plan, export
  .lock                                                       one run at a time

The demo's root (its rows, data, pretrained backbone and sweep) is named in fmsd_jax/demo/.
"""

from __future__ import annotations

# What the run is
CONFIG_JSON = "config.json"
MASK_JSON = "layer_mask.json"
SPEC_JSON = "decomposition.json"
RUN_JSON = "run.json"  # commit, data fingerprint and every mode run on the workdir
LOCK_FILE = ".lock"

# Checkpoints and logs
CHECKPOINTS_DIR = "checkpoints"  # the latest few, for resuming
BEST_DIR = "best"  # the one chosen on validation, for evaluation
TENSORBOARD_DIR = "tb"

# Results
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
ROC_PNG = "roc.png"
DECISION_JSON = "decision.json"  # temperature and thresholds fitted on validation
CALIBRATION_PNG = "calibration.png"  # reliability diagrams, before and after the temperature
LAYER_SCORES_PNG = "layer_scores.png"
DIAGNOSTICS_JSON = "diagnostics.json"  # written by evaluators.adaptation, shown in results.md
ADAPTATION_PNG = "adaptation.png"
SUBSPACES_PNG = "subspaces.png"  # the artifact-subspace ablation (evaluators/subspace_report)
ROBUSTNESS = "robustness"  # the outputs' stem; another grid goes beside as robustness-N
ROBUSTNESS_JSON = f"{ROBUSTNESS}.json"
ROBUSTNESS_MD = f"{ROBUSTNESS}.md"
ROBUSTNESS_PNG = f"{ROBUSTNESS}.png"
PREDICTIONS_JSON = "predictions.json"  # --mode predict's default --out
PLAN_JSON = "plan.json"

# --mode export's default --out, and what it holds beside the merged CLIP weights
EXPORT_DIR = "export"
HEAD_FILE = "head.safetensors"
DETECTOR_JSON = "detector.json"
