"""DVC stage `extract`: the frozen base over every split -> data/features/*.npy + meta.json."""

from transferline import stagekit
from transferline.files import atomic_dir, write_json
from transferline.params import Params


def run(p: Params) -> None:
    from transferline import features, runtime  # noqa: PLC0415  (TensorFlow: after params)

    runtime.seed_everything(p.seed)
    with atomic_dir(stagekit.FEATURES) as tmp:
        metrics = features.extract_dataset(
            stagekit.RAW,
            stagekit.SPLITS,
            tmp,
            backbone=p.model.backbone,
            weights=p.model.weights,
            image_size=p.model.size,
            pooling=p.model.pooling,
            batch_size=p.extract.batch_size,
            dtype=p.extract.dtype,
            seed=p.seed,
            mixed_precision=p.model.mixed_precision,
            xla=p.extract.xla,
        )
    write_json(stagekit.METRICS / "extract.json", metrics)
    stagekit.log.info(
        "extract: %d images at %.1f img/s", metrics["images"], metrics["images_per_second"]
    )
    with stagekit.mlflow_run(p) as run:
        stagekit.log_stage_metrics(run, "extract", metrics)
        run.set_tags({**runtime.runtime_tags(), "precision": metrics["precision"]})


if __name__ == "__main__":
    raise SystemExit(stagekit.main("extract", run))
