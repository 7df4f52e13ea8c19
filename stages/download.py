"""DVC stage `download`: data.dataset -> data/raw/ (written to a temporary folder, then moved)."""

from transferline import sources, stagekit
from transferline.files import atomic_dir
from transferline.params import Params


def run(p: Params) -> None:
    with atomic_dir(stagekit.RAW) as tmp:
        sources.download(p.data.dataset, tmp, sha256=p.data.sha256)


if __name__ == "__main__":
    raise SystemExit(stagekit.main("download", run, tracked=False))  # logs nothing
