"""DVC stage `finetune`: base + trained head, top layers unfrozen -> models/finetuned.keras.

With finetune.enabled false it writes a small skip marker instead, so the DAG stays whole.
"""

import contextlib

from transferline import stagekit
from transferline.files import atomic_path, write_csv, write_json, write_skip_marker
from transferline.params import Params

HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy"]


def run(p: Params) -> None:
    f = p.finetune
    if not f.enabled:
        write_skip_marker(stagekit.FINETUNED, "finetune.enabled is false")
        write_json(stagekit.METRICS / "finetune.json", {"skipped": True})
        write_csv(stagekit.PLOTS / "finetune_history.csv", [], header=HISTORY_COLUMNS)
        stagekit.log.info("finetune: skipped (finetune.enabled is false)")
        return
    stagekit.check_features(p)
    from transferline import finetune, runtime  # noqa: PLC0415  (TensorFlow: after params)

    runtime.seed_everything(p.seed)
    chief = runtime.is_chief()  # another machine of a TF_CONFIG cluster: the chief logs
    with stagekit.mlflow_run(p) if chief else contextlib.nullcontext() as run:
        metrics, history, model = finetune.run_finetune(
            stagekit.DATA,
            stagekit.FINETUNE_INIT,
            p.model,
            f,
            p.seed,
            on_epoch=run.epoch_logger("finetune.history.") if run else None,  # live curves
        )
        with atomic_path(stagekit.FINETUNED, suffix=".keras") as tmp:
            model.save(tmp)
        write_json(stagekit.METRICS / "finetune.json", metrics)
        write_csv(stagekit.PLOTS / "finetune_history.csv", history, header=HISTORY_COLUMNS)
        if run:
            stagekit.log_stage_metrics(run, "finetune", metrics)
            run.set_tags({"precision": metrics["precision"]})


if __name__ == "__main__":
    raise SystemExit(stagekit.main("finetune", run))
