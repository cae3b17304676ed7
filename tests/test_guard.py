"""Path rules and the integrity of protected files (checked before every run and evaluation)."""
import pytest

from agent.guard.integrity import IntegrityError, check_integrity, matches, path_violation, protected_hashes

PROTECTED = ["agent/**", "tests/**", "kernels/reference.py", "ratchet.toml"]
EDITABLE = ["nanomodel/**", "kernels/**"]


def test_path_rules():
    assert matches("nanomodel/model.py", EDITABLE) and matches("nanomodel", EDITABLE)
    assert path_violation(["nanomodel/model.py", "kernels/gelu.py"], EDITABLE, PROTECTED) is None
    assert path_violation(["kernels/reference.py"], EDITABLE, PROTECTED) == "protected path kernels/reference.py"
    assert path_violation(["setup.py"], EDITABLE, PROTECTED).startswith("not an editable path: setup.py")


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "reference.py").write_text("def ref(): ...\n")
    (tmp_path / "kernels" / "gelu.py").write_text("x = 1\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text("def test(): pass\n")
    return tmp_path


def test_only_protected_files_are_hashed(tree):
    assert set(protected_hashes(tree, PROTECTED)) == {"kernels/reference.py", "tests/test_x.py"}


@pytest.mark.parametrize("change, what", [
    (lambda t: (t / "kernels" / "reference.py").write_text("def ref(): return 0\n"), "modified: kernels/reference.py"),
    (lambda t: (t / "tests" / "test_x.py").unlink(), "missing: tests/test_x.py"),
    (lambda t: (t / "tests" / "conftest.py").write_text("import os\n"), "added: tests/conftest.py"),
    (lambda t: ((t / "kernels" / "reference.py").unlink(), (t / "kernels" / "reference.py").symlink_to(t / "kernels" / "gelu.py")),
     "modified: kernels/reference.py"),
])
def test_any_change_to_a_protected_file_stops_the_run(tree, change, what):
    expected = protected_hashes(tree, PROTECTED)
    check_integrity(tree, PROTECTED, expected)  # untouched: fine
    (tree / "kernels" / "gelu.py").write_text("x = 2\n")  # editable: still fine
    check_integrity(tree, PROTECTED, expected)
    change(tree)
    with pytest.raises(IntegrityError, match=what):
        check_integrity(tree, PROTECTED, expected)
