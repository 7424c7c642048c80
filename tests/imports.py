"""What a piece of code imports, asked of a fresh interpreter (the import-cost tests)."""

import ast
import subprocess
import sys


def modules_loaded_by(code: str, names: tuple[str, ...]) -> list[str]:
    """Run `code` in a new Python process; which of `names` it left imported, sorted."""
    probe = f"{code}\nimport sys\nprint(sorted(m for m in {tuple(names)!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return ast.literal_eval(proc.stdout.strip().splitlines()[-1])
