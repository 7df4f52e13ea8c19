"""dvc.yaml as DVC itself reads it (the end-to-end tests run it for real)."""

from dvc.repo import Repo

from conftest import REPO

STAGES = {
    "download", "split", "extract", "train_head", "trunk", "finetune", "audit", "evaluate"
}  # fmt: skip


def test_every_stage_can_be_restored_from_the_run_cache():
    """DVC leaves a stage out of its run-cache when one of its plain outputs (not a metric or
    plot) has `cache: false`; then every `dvc exp run --temp/--queue` and every return to an
    earlier parameter set re-runs it instead of restoring its outputs."""
    with Repo(str(REPO)) as repo:
        stages = {stage.addressing: stage for stage in repo.index.stages}
        assert set(stages) == STAGES
        for name, stage in stages.items():
            uncached = [str(o) for o in stage.outs if not (o.use_cache or o.is_metric or o.is_plot)]
            assert not uncached, f"stage {name}: uncached plain outputs {uncached}"


def test_gitignores_cover_every_cached_output():
    """After a run `git status` shows no DVC output and no .gitignore that DVC had to extend."""
    with Repo(str(REPO)) as repo:
        for stage in repo.index.stages:
            for out in (o for o in stage.outs if o.use_cache):
                path = REPO / str(out.def_path)
                ignore = path.parent / ".gitignore"
                entries = ignore.read_text().split() if ignore.is_file() else []
                assert f"/{path.name}" in entries, f"{ignore} lacks /{path.name}"


def test_every_stage_that_builds_a_base_depends_on_the_weights_folder():
    with Repo(str(REPO)) as repo:
        deps = {s.addressing: {str(d.def_path) for d in s.deps} for s in repo.index.stages}
    assert {name for name, d in deps.items() if "weights" in d} == {
        "extract",
        "trunk",
        "finetune",
        "evaluate",
    }
    assert (REPO / "weights" / ".gitignore").is_file()  # the folder exists in a fresh clone
