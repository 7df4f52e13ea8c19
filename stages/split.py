"""DVC stage `split`: data/raw -> data/splits/ manifests + metrics/split.json.

Validates every image once, de-duplicates by content, splits stratified and seeded. The raw
folder is only read.
"""

from pathlib import Path

from transferline import dataset, sources, stagekit
from transferline.files import atomic_dir, write_json
from transferline.params import Params


def run(p: Params) -> None:
    subdir = p.data.subdir or sources.preset_subdir(p.data.dataset) or ""
    table = p.data.labels  # a CSV labelling the images, if any
    spec = dataset.SplitSpec(
        layout=p.data.layout,
        val=p.split.val,
        test=p.split.test,
        seed=p.seed,
        max_per_class=p.split.max_per_class,
        label_map=p.data.label_map,
        labels=dataset.LabelsCsv(
            stagekit.RAW / table.file, table.image_column, table.label_column, table.group_column
        )
        if table.file
        else None,
        group_pattern=p.split.group_pattern,
        exclude=p.data.exclude,
        exclude_list=dataset.read_exclude_file(Path(p.data.exclude_file))
        if p.data.exclude_file
        else None,
    )
    result = dataset.build_split(stagekit.RAW / subdir, spec, rel_to=stagekit.RAW)
    with atomic_dir(stagekit.SPLITS) as tmp:
        metrics = dataset.write_split(result, tmp)
    write_json(stagekit.METRICS / "split.json", metrics)
    stagekit.log.info(
        "split: %s; rejected %d, duplicates %d",
        # per class up to 10 classes (not three dicts of 120 dog breeds on one line)
        result.counts if len(result.classes) <= 10 else f"{len(result.classes)} classes, {metrics}",
        metrics["rejected"],
        metrics["duplicates"],
    )
    with stagekit.mlflow_run(p) as run:
        stagekit.log_stage_metrics(run, "split", metrics)
        stagekit.log_datasets(run, p.data.dataset)


if __name__ == "__main__":
    raise SystemExit(stagekit.main("split", run))
