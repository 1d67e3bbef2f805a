"""A study command's output directory: whole or not at all, resumable, with a picture where one can be drawn.

Files are written into a hidden ``.NAME.partial`` directory beside the output and the directory
is renamed into place when the command finishes, so a failure or an interrupt never leaves a
half-written result under the name the user asked for. An existing output is never replaced
without ``--overwrite``; ``--resume`` picks up a partial directory (or a finished one, to extend
it) and the command decides what of it to reuse.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..errors import UserError
from ..paths import atomic_write_text, make_dir, publish_dir


class Output:
    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False, resume: bool = False):
        self.final = Path(path)
        self.tmp = self.final.parent / f".{self.final.name}.partial"
        self.pictures: list[str] = []
        self.no_pictures: str | None = None  # why there are none, once known
        if self.final.exists() and not (overwrite or resume):
            raise UserError(f"{self.final} already exists; pass --overwrite to replace it, --resume to extend it, "
                            "or choose another --out")
        if self.tmp.exists() and not resume:
            raise UserError(f"an unfinished run left {self.tmp}; pass --resume to continue it or delete it")
        if not self.tmp.exists():
            if resume and self.final.is_dir():  # extend a finished result: start from a copy of it
                shutil.copytree(self.final, self.tmp)
            else:
                make_dir(self.tmp)
        self.resumed = resume

    def __truediv__(self, name: str) -> Path:
        return self.tmp / name

    def read_json(self, name: str) -> dict | None:
        try:
            return json.loads((self.tmp / name).read_text())
        except (OSError, ValueError):
            return None

    def write_json(self, name: str, payload) -> Path:
        atomic_write_text(self.tmp / name, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
        return self.tmp / name

    def write_text(self, name: str, text: str) -> Path:
        atomic_write_text(self.tmp / name, text)
        return self.tmp / name

    def picture(self, draw, name: str, *args, **kwargs) -> str | None:
        """``draw(path, *args, **kwargs)`` into ``name``; without matplotlib, None and the reason kept."""
        from .plots import MissingExtra

        try:
            draw(self.tmp / name, *args, **kwargs)
        except MissingExtra as e:
            self.no_pictures = str(e)
            return None
        self.pictures.append(name)
        return name

    def publish(self) -> Path:
        """Rename the finished directory into place (replacing an older result, when allowed)."""
        return publish_dir(self.tmp, self.final)

    def abort(self, keep: bool = False) -> None:
        """Drop the partial directory, unless it holds finished work a ``--resume`` continues from (``keep``)."""
        if not keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
