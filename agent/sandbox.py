"""Where training runs execute: under bubblewrap when available (see docs/threat-model.md)."""
import shutil


def describe() -> str:
    path = shutil.which("bwrap")
    return f"bubblewrap at {path}" if path else "bubblewrap not found: runs are not sandboxed (apt-get install bubblewrap)"
