"""The output folder of a run: what a run may write there, and what it may remove.

multisal deletes only what it wrote and never writes outside the output folder:
- The folder is new, empty, or an earlier run's (it holds that run's config.toml or manifest.jsonl).
  A folder that holds someone else's config.toml, manifest.jsonl or index.html is refused, as
  these three are the files a run writes at its top.
- Each input gets its own folder, created fresh under a name nothing on disk uses yet, or the
  folder this job's manifest recorded for it. Nothing that is there is ever removed: a folder of
  the user's that happens to share an input's name (./cats for cats.png) makes the input's
  folder cats-2. A folder that is a symbolic link, or resolves outside the output folder, is
  never written through.
- Temporary files carry the run's tag (`tag`, from the output folder's resolved path): at start a
  run removes the leftovers of its own killed writes, in its top folder and its inputs' folders,
  and no other file.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from ..errors import MultisalError
from ..files import temporary_files

RUN_FILES = ("config.toml", "manifest.jsonl", "index.html")
CONFIG_HEADER = "# The resolved configuration of this run"
# A name folder_names makes (the manifest must not steer writes outside the run).
SAFE_FOLDER = r"[A-Za-z0-9_][A-Za-z0-9_-]{0,71}"


class OutputFolder:
    def __init__(self, path):
        self.given = str(path)
        self.root = Path(os.path.abspath(os.path.expanduser(str(path))))

    # ---- before anything is written ---------------------------------------------------------------
    def check(self):
        """Refuse, in one line, an output folder a run cannot use or must not write into."""
        shown = repr(self.given)
        if self.root.is_symlink() and not self.root.exists():
            raise MultisalError(f"output folder {shown} is a broken symbolic link")
        if self.root.exists():
            if not self.root.is_dir():
                raise MultisalError(f"output folder {shown} is a file, not a folder")
            if not os.access(self.root, os.W_OK | os.X_OK):
                raise MultisalError(f"output folder {shown} is not writable")
            self._check_ownership()
            return
        ancestor = self.root.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise MultisalError(f"output folder {shown} cannot be made: {str(ancestor)!r} is a file")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise MultisalError(f"output folder {shown} cannot be made: {str(ancestor)!r} is not writable")

    def _check_ownership(self):
        for name in RUN_FILES:
            path = self.root / name
            if path.is_symlink() or (path.exists() and not path.is_file()):
                raise MultisalError(f"{str(path)!r} is not a regular file: a run writes its {name} there; "
                                    "use another output folder")
        if not self.is_run_folder() and any((self.root / name).exists() for name in RUN_FILES):
            found = next(name for name in RUN_FILES if (self.root / name).exists())
            raise MultisalError(f"output folder {self.given!r} holds a {found} that no multisal run wrote; "
                                "use an empty or new output folder")

    def is_run_folder(self) -> bool:
        """Does the folder hold an earlier run's config.toml or manifest.jsonl?"""
        config = self.root / "config.toml"
        if config.is_file():
            try:
                with open(config, "rb") as f:
                    if f.read(len(CONFIG_HEADER)).decode("utf-8", "replace") == CONFIG_HEADER:
                        return True
            except OSError:
                pass
        return (self.root / "manifest.jsonl").is_file()

    # ---- writing ----------------------------------------------------------------------------------------
    def create(self):
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise MultisalError(f"cannot make output folder {self.given!r}: {err.strerror}") from None
        self.root = self.root.resolve()

    @property
    def tag(self) -> str:
        """The tag of this run's temporary files (the same for every rerun into this folder)."""
        return "multisal-" + hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:10]

    def input_folder(self, name: str, recorded: bool) -> Path:
        """The folder of one input, made now if it is new. A recorded folder (this job's manifest
        named it) may exist already, as a real folder inside the output folder."""
        folder = self.root / name
        if not re.fullmatch(SAFE_FOLDER, name):
            raise MultisalError(f"folder name {name!r} is not one multisal makes")
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise MultisalError(f"{str(folder)!r} is not a folder of this run (a link or a file); not written")
        if folder.exists() and not recorded:
            raise MultisalError(f"{str(folder)!r} exists and is not this run's; not written")
        folder.mkdir(exist_ok=recorded)
        if folder.resolve().parent != self.root:
            raise MultisalError(f"{str(folder)!r} resolves outside the output folder; not written")
        return folder

    def taken_names(self) -> set:
        """Lower-case names of what the output folder holds (case-insensitive file systems)."""
        try:
            return {entry.name.lower() for entry in os.scandir(self.root)}
        except FileNotFoundError:
            return set()

    def is_own_folder(self, name: str) -> bool:
        """May a folder the manifest recorded be used again: a safe name, and there a real folder
        directly inside the output folder, or nothing."""
        if not re.fullmatch(SAFE_FOLDER, str(name)):
            return False
        folder = self.root / name
        if folder.is_symlink():
            return False
        return not folder.exists() or (folder.is_dir() and folder.resolve().parent == self.root.resolve())

    def remove_temporary_files(self, folders=()):
        """Remove what this run's killed writes left behind, in the top folder and the given ones."""
        for folder in (self.root, *folders):
            if folder.is_symlink():
                continue
            for path in temporary_files(folder, self.tag):
                path.unlink()

