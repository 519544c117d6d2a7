"""The align stage over artifact directories: validate, load, compute, write atomically."""

from __future__ import annotations

import logging
from pathlib import Path

from loramigrate.align.activations import default_calibration, read_calibration
from loramigrate.align.core import align_models
from loramigrate.alignment import save_alignment
from loramigrate.artifacts import hash_inputs, is_up_to_date, log_start, output_lock, prepare_output, stage_output
from loramigrate.config import AlignConfig
from loramigrate.models import load_frozen, load_tokenizer, resolve_model
from loramigrate.progress import ProgressFn, no_progress
from loramigrate.report import plot_cka

log = logging.getLogger(__name__)
STAGE = "align"


def run_align(cfg: AlignConfig, out_dir: Path, progress: ProgressFn = no_progress, force: bool = False) -> bool:
    """Align ``cfg.old`` with ``cfg.new`` into ``out_dir``; a finished identical run is kept as is.

    Returns:
        True when it aligned, False when ``out_dir`` already held this alignment of the same inputs.
    """
    out_dir = Path(out_dir)
    old_ref, new_ref = resolve_model(cfg.old), resolve_model(cfg.new)
    calib_path = Path(cfg.calib) if cfg.calib else default_calibration()
    texts = read_calibration(calib_path)
    names = {"old": old_ref.path, "new": new_ref.path, "calib": str(calib_path)}
    prepare_output(out_dir, inputs=names.values())
    inputs = hash_inputs(names)
    config = cfg.model_dump()
    if not force and is_up_to_date(out_dir, STAGE, config, inputs):  # reading needs no lock: a fleet shares it
        log.info("%s is up to date; skipping align (use --force to redo)", out_dir)
        return False
    with output_lock(out_dir):
        log_start(STAGE, out_dir, cfg)
        old_tok, new_tok = load_tokenizer(old_ref), load_tokenizer(new_ref)
        old, new = load_frozen(old_ref, cfg.load), load_frozen(new_ref, cfg.load)
        with stage_output(out_dir, STAGE, config, inputs) as run:
            alignment = align_models(old, new, old_tok, new_tok, texts, cfg, progress)
            alignment.info["models"] = {"old": old_ref.path, "new": new_ref.path}
            save_alignment(alignment, run.tmp_dir)
            plot_cka(alignment.cka, alignment.layer_map, run.tmp_dir / "cka.png")
            run.extra["phase_wall_s"] = alignment.info["timings"]
            run.extra["summary"] = {"layer_map": alignment.layer_map, **alignment.info["scores"]}
    return True
