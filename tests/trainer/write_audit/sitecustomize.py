"""Test-only: records every file a process creates, writes, renames or deletes under `$KONTEXT_TEST_AUDIT_ROOT`.

Put this folder on PYTHONPATH and Python imports it at start-up (`site`), in torchrun's agent and in every rank it
starts. Each process appends `rank<TAB>event<TAB>path` lines to its own file in `$KONTEXT_TEST_AUDIT_LOG`, through
an audit hook (PEP 578): the `open`, `os.rename`, `os.replace`, `os.remove`, `os.rmdir`, `shutil.rmtree` and
`os.mkdir` events Python raises for its own file operations, which is how the trainer writes `file://` storage.
"""

import os
import sys

_root = os.environ.get("KONTEXT_TEST_AUDIT_ROOT")
_folder = os.environ.get("KONTEXT_TEST_AUDIT_LOG")

if _root and _folder:
    _rank = os.environ.get("RANK", "agent")
    _out = open(os.path.join(_folder, f"{os.getpid()}.log"), "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    _busy = False
    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _record(event: str, path: object) -> None:
        global _busy
        if _busy or not isinstance(path, str | bytes | os.PathLike):
            return
        full = os.path.abspath(os.fsdecode(path))
        if not full.startswith(_root):
            return
        _busy = True
        try:
            _out.write(f"{_rank}\t{event}\t{full}\n")
        finally:
            _busy = False

    def _hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
            if writes:
                _record("write", path)
        elif event in ("os.rename", "os.replace"):
            _record("rename", args[1])
        elif event in ("os.remove", "os.rmdir", "shutil.rmtree"):
            _record("delete", args[0])
        elif event == "os.mkdir":
            _record("mkdir", args[0])

    sys.addaudithook(_hook)
