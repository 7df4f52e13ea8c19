"""DVC stage `extract`: the frozen base over every split -> data/features/*.npy + meta.json."""

from transferline import stagekit
from transferline.files import DataDirs, atomic_dir, write_json
from transferline.params import Params


def run(p: Params) -> None:
    from transferline import features, runtime  # noqa: PLC0415  (TensorFlow: after params)

    runtime.seed_everything(p.seed)
    with atomic_dir(stagekit.FEATURES) as tmp:
        data = DataDirs(stagekit.RAW, stagekit.SPLITS, tmp)
        metrics = features.extract_dataset(data, p.model, p.extract, p.seed)
    write_json(stagekit.METRICS / "extract.json", metrics)
    stagekit.log.info(
        "extract: %d images at %.1f img/s", metrics["images"], metrics["images_per_second"]
    )
    with stagekit.mlflow_run(p) as run:
        stagekit.log_stage_metrics(run, "extract", metrics)
        run.set_tags({**runtime.runtime_tags(), "precision": metrics["precision"]})


if __name__ == "__main__":
    raise SystemExit(stagekit.main("extract", run))
