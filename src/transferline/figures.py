"""Figures shared by evaluate and the audit: matplotlib without a display, image grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from transferline.files import atomic_path


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display), imported on first use."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def image_grid_png(
    path: Path,
    images: list[np.ndarray],
    captions: list[str],
    title: str,
    empty: str = "no misclassified test images",
) -> None:
    """A grid of captioned images, four to a row (the note `empty` when there are none).

    Args:
        path: the PNG to write.
        images, captions: the pictures and their captions.
        title: the figure's title.
        empty: what the figure says when there are no images.
    """
    plt = pyplot()
    cols = max(1, min(4, len(images)))
    rows = max(1, -(-len(images) // cols))
    # At least 6 inches wide, so the title fits over a single image.
    fig, axes = plt.subplots(
        rows, cols, figsize=(max(6.0, 2.6 * cols), 2.8 * rows + 0.4), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, text in zip(axes.flat, images, captions, strict=False):
        ax.imshow(np.clip(img, 0, 255).astype(np.uint8))
        ax.set_title(text, fontsize=8)
    if not images:
        axes[0, 0].text(0.5, 0.5, empty, ha="center", va="center")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
