"""Where the demo stage puts its artifacts in a data root (read by filter, the server and evaluation)."""

from __future__ import annotations

from storage.fs import DataRoot


def metadata_path(root: DataRoot) -> str:
    return root.artifact("demo", "laion", "parquet")



def www_dir(root: DataRoot) -> str:
    return root.artifact("demo", "laion", "www")



def coco_dir(root: DataRoot) -> str:
    return root.artifact("demo", "laion", "coco")
